//! `concord`: the command-line face of concord. Each subcommand is a module
//! of its own and a thin call into the libraries.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// concord: a coordination bus for autonomous agents that operate production systems.
#[derive(Debug, Parser)]
#[command(name = "concord", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Preview a plan offline: diff, invariants, verdict (exit 0 admit, 2 needs approval, 3 reject, 1 error).
    Check(cmd::check::Args),
    /// Print the JSON Schema of intents (or of previews, or of decode errors).
    Schema(cmd::schema::Args),
}

fn main() -> ExitCode {
    // Usage errors exit 1: clap's default (2) is the code of `needs_approval`,
    // and a typo must never look like a plan waiting for a human.
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        Command::Check(a) => cmd::check::run(a),
        Command::Schema(a) => cmd::schema::run(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("concord: {e:#}");
            ExitCode::from(1)
        }
    }
}
