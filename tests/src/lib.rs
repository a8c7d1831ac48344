//! concord's end-to-end test kit: runs the real `concord` binary on the
//! example plans in `config/examples/` and checks what it prints.
//!
//! Layout: this library holds the fixtures; the tests live in `tests/tests/`
//! (`check_cli.rs`: verdicts, reasons and figures of `concord check`;
//! `determinism.rs`: byte-identical output across processes; `reports.rs`:
//! snapshots of the text reports; `schema.rs`: the committed JSON Schemas in
//! `schema/` against `concord schema`). [`schema`] is a small JSON Schema
//! validator for the keywords concord's schemas use.
//!
//! # Finding the `concord` binary
//!
//! Cargo sets `CARGO_BIN_EXE_<name>` only for binaries of the package under
//! test, and `concord` belongs to `concord-cli`. So [`concord_bin`] looks
//! next to the test executable instead: a test runs as
//! `target/<profile>/deps/<test>-<hash>`, and the binary is
//! `target/<profile>/concord`. The first call in a test process runs
//! `cargo build -q -p concord-cli` for that profile, once (behind a
//! [`OnceLock`]), even when the binary already exists: `cargo test -p
//! concord-tests` does not rebuild other packages' binaries, and a stale
//! `concord` would test yesterday's core. When everything is fresh the build
//! is a no-op. Set `CONCORD_BIN` to a binary's path to skip the build and test
//! that binary instead. [`agent_example`] builds and finds the SDK's examples
//! (`target/<profile>/examples/`) the same way.
//!
//! ```no_run
//! use concord_tests::{EXAMPLES, check};
//!
//! let seven_days = EXAMPLES.iter().find(|e| e.name == "seven-days-pool-500").unwrap();
//! let run = check(seven_days, &["--json"]);
//! assert_eq!(run.code, 3);
//! assert_eq!(run.json()["verdict"], "reject");
//! ```

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub mod live;
pub mod schema;

/// The world the examples are written against, relative to the workspace root.
pub const WORLD: &str = "config/examples/world.toml";

/// The folder of the example plans, relative to the workspace root.
pub const EXAMPLES_DIR: &str = "config/examples";

/// One example plan and how it is meant to be checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Example {
    /// File stem under `config/examples/`.
    pub name: &'static str,
    /// The agent the plan is written for.
    pub agent: &'static str,
    /// The earlier version of the plan (a file stem), passed as `--previous`.
    pub previous: Option<&'static str>,
}

impl Example {
    /// The plan's path, relative to the workspace root.
    pub fn plan(&self) -> String {
        format!("{EXAMPLES_DIR}/{}.json", self.name)
    }

    /// The arguments of `concord check` for this example (without `--json`).
    pub fn check_args(&self) -> Vec<String> {
        let mut args = vec![
            "check".to_string(),
            self.plan(),
            "--agent".into(),
            self.agent.into(),
            "--world".into(),
            WORLD.into(),
        ];
        if let Some(prev) = self.previous {
            args.push("--previous".into());
            args.push(format!("{EXAMPLES_DIR}/{prev}.json"));
        }
        args
    }
}

/// Every example plan in `config/examples/`, with the agent it is meant for.
/// `open-db-to-world` and `rotate-oidc` are proposed by `ops`, an agent the
/// policy does not list (so its autonomy is `propose`).
pub const EXAMPLES: [Example; 9] = [
    Example {
        name: "seven-days-pool-500",
        agent: "resource",
        previous: None,
    },
    Example {
        name: "pool-60",
        agent: "resource",
        previous: None,
    },
    Example {
        name: "rebalance-prefix",
        agent: "resource",
        previous: None,
    },
    Example {
        name: "deploy-v1",
        agent: "deploy",
        previous: None,
    },
    Example {
        name: "deploy-v2-grants",
        agent: "deploy",
        previous: Some("deploy-v1"),
    },
    Example {
        name: "deploy-unasked",
        agent: "deploy",
        previous: None,
    },
    Example {
        name: "restart-api",
        agent: "uptime",
        previous: None,
    },
    Example {
        name: "open-db-to-world",
        agent: "ops",
        previous: None,
    },
    Example {
        name: "rotate-oidc",
        agent: "ops",
        previous: None,
    },
];

/// The example called `name`; panics if there is none.
pub fn example(name: &str) -> Example {
    EXAMPLES
        .iter()
        .copied()
        .find(|e| e.name == name)
        .unwrap_or_else(|| panic!("no example `{name}` in concord_tests::EXAMPLES"))
}

/// The workspace root: the CLI runs there, so `config/policy.toml` is the
/// policy it finds by default, as for a developer at the root.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests package lives in the workspace root")
}

/// Path of the `concord` binary, built once per test process (see the crate docs).
pub fn concord_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("CONCORD_BIN") {
            return PathBuf::from(bin);
        }
        let bin = profile_dir().join(format!("concord{}", std::env::consts::EXE_SUFFIX));
        cargo_build(&["-p", "concord-cli"]);
        assert!(
            bin.exists(),
            "`cargo build -p concord-cli` succeeded but {} does not exist; set CONCORD_BIN to the binary",
            bin.display()
        );
        bin
    })
}

/// Path of the `concord-agent` example `name` (`crates/concord-agent/examples/`),
/// built with the others once per test process, as [`concord_bin`] builds the
/// CLI: `cargo test -p concord-tests` builds no other package's examples.
pub fn agent_example(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        cargo_build(&["-p", "concord-agent", "--examples"]);
        profile_dir().join("examples")
    });
    let bin = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "`cargo build -p concord-agent --examples` succeeded but {} does not exist",
        bin.display()
    );
    bin
}

/// The running test's profile directory: a test runs as
/// `target/<profile>/deps/<test>-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("the test executable lives in target/<profile>/deps")
        .to_path_buf()
}

/// What cargo sets for the package under test (prefixes).
const PACKAGE_VARS: [&str; 7] = [
    "CARGO_MANIFEST_",
    "CARGO_PKG_",
    "CARGO_BIN_",
    "CARGO_CRATE_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_TARGET_TMPDIR",
    "CARGO_RUSTC_CURRENT_DIR",
];

/// Runs `cargo build -q <args>` for the running test's profile.
fn cargo_build(args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "-q"]).args(args).current_dir(workspace_root());
    // Not the variables cargo set for this test's own package: build scripts
    // that watch one (ring watches CARGO_MANIFEST_DIR) would see a change,
    // rebuild, and the next `cargo test` would rebuild them back.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if PACKAGE_VARS.iter().any(|p| name.starts_with(p)) {
            cmd.env_remove(&*name);
        }
    }
    // `cargo test` builds tests into `debug` (profile `test`) and `--release`
    // tests into `release`; any other directory is a custom profile.
    match profile_dir().file_name().and_then(OsStr::to_str) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().expect("running cargo");
    assert!(
        status.success(),
        "`cargo build -q {}` failed ({status}); the tests need what it builds",
        args.join(" ")
    );
}

/// The outcome of one `concord` process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Run {
    /// The exit code (0 admit, 2 needs approval, 3 reject, 1 usage or input error).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    /// Standard output parsed as JSON; panics with the output if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }
}

/// Runs `concord` with `args` in the workspace root.
pub fn concord<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_os_string()).collect();
    let out = Command::new(concord_bin())
        .args(&args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", concord_bin().display()));
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("concord {args:?} was killed by a signal ({})", out.status));
    Run {
        code,
        stdout: String::from_utf8(out.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(out.stderr).expect("stderr is UTF-8"),
    }
}

/// Runs `concord check` on an example, with `extra` arguments (e.g. `--json`).
pub fn check(example: &Example, extra: &[&str]) -> Run {
    let mut args = example.check_args();
    args.extend(extra.iter().map(|s| s.to_string()));
    concord(args)
}
