//! `concord`: the command-line face of concord. Each subcommand is a module
//! of its own and a thin call into the libraries.

mod cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc (`concord_alloc`): decisions and previews make many short-lived
/// allocations, and glibc's malloc spent a third of their time.
#[global_allocator]
static GLOBAL: concord_alloc::Alloc = concord_alloc::Alloc;

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
    /// Run the coordinator against a NATS server with JetStream.
    Up(cmd::up::UpArgs),
    /// Run a local nats-server (temporary store, free port) and the coordinator on it.
    Dev(cmd::up::DevArgs),
    /// Send a plan as an agent and print the decision (exit codes as `check`).
    Propose(cmd::live::ProposeArgs),
    /// Operators' commands: approve, reject, halt, resume, cancel, saga.
    #[command(flatten)]
    Control(cmd::live::ControlCmd),
    /// Plans waiting for a human, with their age and expiry.
    Pending(cmd::live::QueryArgs),
    /// Every live plan: pending, queued, running sagas.
    Sagas(cmd::live::QueryArgs),
    /// Leases held.
    Leases(cmd::live::QueryArgs),
    /// The coordinator's status: incarnation, log head, halts.
    Status(cmd::live::QueryArgs),
    /// World values and the latest observations.
    World(cmd::live::WorldArgs),
    /// A live plan's preview, as `check` prints it.
    Show(cmd::live::ShowArgs),
    /// Read the coordination log.
    Tail(cmd::tail::TailArgs),
    /// The log's integrity: `concord log verify`.
    Log(cmd::tail::LogArgs),
    /// Generate a nats-server configuration: one nkey user per agent, operator and executor.
    NatsConfig(cmd::natsconfig::Args),
    /// Measure the live bus beside its physical floors (docs/BENCHMARKS.md).
    Bench(cmd::bench::Args),
    /// Run a scenario in virtual time, coordinated and uncoordinated (exit 4 if an expectation or checker fails).
    Sim(cmd::sim::Args),
    /// Re-decide a recorded log and check it reproduces; with --policy, what-if.
    Replay(cmd::replay::Args),
    /// Write the coordination log, from its genesis up to --until, as a recording `concord replay` re-decides
    Record(cmd::tail::RecordArgs),
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
        Command::Up(a) => cmd::up::up(a),
        Command::Dev(a) => cmd::up::dev(a),
        Command::Propose(a) => cmd::live::propose(a),
        Command::Control(c) => cmd::live::control(c),
        Command::Pending(a) => cmd::live::query(cmd::live::Asked::Pending, a),
        Command::Sagas(a) => cmd::live::query(cmd::live::Asked::Plans, a),
        Command::Leases(a) => cmd::live::query(cmd::live::Asked::Leases, a),
        Command::Status(a) => cmd::live::query(cmd::live::Asked::Status, a),
        Command::World(a) => cmd::live::world(a),
        Command::Show(a) => cmd::live::show(a),
        Command::Tail(a) => cmd::tail::tail(a),
        Command::Log(a) => cmd::tail::log(a),
        Command::NatsConfig(a) => cmd::natsconfig::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Sim(a) => cmd::sim::run(a),
        Command::Replay(a) => cmd::replay::run(a),
        Command::Record(a) => cmd::tail::record(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("concord: {e:#}");
            ExitCode::from(1)
        }
    }
}
