//! The examples run against `concord dev`, as their docs say to: the real
//! `concord dev` process (its own nats-server), the URL read from what it
//! prints, then the SDK's `executor` and `propose` examples
//! (`crates/concord-agent/examples/`) and the Python agent
//! (`examples/python/agent.py`) as separate processes. Each exits 0 and
//! prints the verdict the plan gets; a held plan is approved by an operator
//! with `concord approve`, and the waiting `propose` hears it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use concord_tests::{agent_example, concord, concord_bin, workspace_root};

/// How long any one wait in these tests may take.
const WAIT_MAX: Duration = Duration::from_secs(30);

/// A process's standard output, line by line, as it prints it.
struct Lines {
    rx: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(stdout: ChildStdout) -> Lines {
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen: Vec::new() }
    }

    /// The first line (from now on) that `f` accepts; panics naming `what`
    /// if none comes within [`WAIT_MAX`] or the output ends.
    fn wait_for(&mut self, what: &str, f: impl Fn(&str) -> bool) -> String {
        let end = Instant::now() + WAIT_MAX;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if f(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {what} within {WAIT_MAX:?}; printed:\n{:#?}", self.seen),
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("no {what}: the output ended; printed:\n{:#?}", self.seen)
                }
            }
        }
    }
}

/// A child process stopped with SIGINT (as Ctrl-C would) when dropped, so
/// `concord dev` stops its own nats-server.
struct Proc {
    child: Child,
    lines: Lines,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .current_dir(workspace_root())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
        let lines = Lines::of(child.stdout.take().expect("piped stdout"));
        Proc { child, lines }
    }

    /// Sends SIGINT and waits for the exit.
    fn interrupt(&mut self) -> ExitStatus {
        let sent = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(sent.success(), "kill -INT {}", self.child.id());
        self.wait()
    }

    /// Waits for the exit (at most [`WAIT_MAX`]).
    fn wait(&mut self) -> ExitStatus {
        let end = Instant::now() + WAIT_MAX;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for a child") {
                return status;
            }
            assert!(Instant::now() < end, "still running after {WAIT_MAX:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-INT", &self.child.id().to_string()])
                .status();
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A file in the temporary folder, removed when dropped (a failing test too).
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        // Tests run in parallel threads of one process: a counter keeps their files apart.
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("concord-examples-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `concord dev` with the shipped policy and world, and its URL.
struct Dev {
    proc: Proc,
    url: String,
    _config: TempFile,
}

impl Dev {
    fn start() -> Dev {
        let root = workspace_root();
        // The shipped configuration with a small log: JetStream reserves a
        // stream's bound on disk and a test needs little.
        let config = TempFile::new(
            "dev.toml",
            &format!(
                "policy = \"{}\"\nworld = \"{}\"\n[log]\nmax_bytes = 268435456\n",
                root.join("config/policy.toml").display(),
                root.join("config/examples/world.toml").display()
            ),
        );
        let mut proc = Proc::spawn(
            Command::new(concord_bin())
                .arg("dev")
                .arg("--config")
                .arg(&config.0)
                .env("RUST_LOG", "warn"),
        );
        let line = proc
            .lines
            .wait_for("URL from `concord dev`", |l| l.contains("JetStream at "));
        let url = line
            .rsplit("JetStream at ")
            .next()
            .expect("a URL after `JetStream at`")
            .trim()
            .to_string();
        let dev = Dev {
            proc,
            url,
            _config: config,
        };
        dev.wait_ready();
        dev
    }

    /// Until the coordinator answers `status` (it starts after the server).
    fn wait_ready(&self) {
        let end = Instant::now() + WAIT_MAX;
        loop {
            let run = concord(["status", "--nats", &self.url]);
            if run.code == 0 {
                return;
            }
            assert!(
                Instant::now() < end,
                "the coordinator of `concord dev` never answered `status`:\n{}{}",
                run.stdout,
                run.stderr
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `cmd` in the workspace root to its end: exit status and stdout.
fn run(cmd: &mut Command) -> (ExitStatus, String) {
    let out = cmd
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

#[test]
fn the_rust_examples_propose_and_execute_against_concord_dev() {
    let mut dev = Dev::start();
    let mut executor = Proc::spawn(Command::new(agent_example("executor")).args([&dev.url, "default"]));
    executor
        .lines
        .wait_for("`serving` from the executor", |l| l.starts_with("serving"));

    // A bounded nudge: admitted, and the saga runs on the example executor.
    let (status, out) =
        run(Command::new(agent_example("propose")).args([&dev.url, "resource", "config/examples/pool-60.json"]));
    assert!(status.success(), "propose exited {status}:\n{out}");
    assert!(out.contains("resource-pool-nudge v1: admit"), "{out}");
    executor.lines.wait_for("the executor applying pool 60", |l| {
        l.ends_with("svc/api/pool_size = 60")
    });

    // More than twice the worker's pool: held; `propose` waits for a human,
    // who approves with `concord approve`; the saga then runs.
    let plan = TempFile::new(
        "worker-pool.json",
        r#"{"protocol": 1, "lineage": "example-worker-pool", "version": 1,
            "goal": "more database headroom for the worker",
            "steps": [{"id": "raise", "kind": "set", "path": "svc/worker/pool_size", "args": {"value": 45},
                       "confidence": 0.9, "compensation": {"mode": "restore"}}]}"#,
    );
    let mut held = Proc::spawn(
        Command::new(agent_example("propose"))
            .arg(&dev.url)
            .arg("resource")
            .arg(&plan.0),
    );
    held.lines
        .wait_for("the held verdict", |l| l == "example-worker-pool v1: needs_approval");
    held.lines
        .wait_for("`waiting for a human`", |l| l.starts_with("waiting for a human"));
    let approve = concord([
        "approve",
        "--nats",
        &dev.url,
        "--as",
        "alice",
        "example-worker-pool",
        "--reason",
        "looked at the preview",
    ]);
    assert_eq!(
        approve.code, 0,
        "concord approve:\n{}{}",
        approve.stdout, approve.stderr
    );
    held.lines
        .wait_for("the approval", |l| l == "approved by alice: looked at the preview");
    let status = held.wait();
    assert!(status.success(), "the held propose exited {status}");
    executor.lines.wait_for("the executor applying the approved plan", |l| {
        l.ends_with("svc/worker/pool_size = 45")
    });

    let status = executor.interrupt();
    assert!(status.success(), "the executor exited {status} on Ctrl-C");
    let status = dev.proc.interrupt();
    assert!(status.success(), "`concord dev` exited {status} on Ctrl-C");
}

#[test]
fn the_python_agent_example_proposes_against_concord_dev() {
    let python_path = workspace_root().join(".tools/python");
    let (status, out) = run(Command::new("python3")
        .args(["-c", "import nats, jsonschema"])
        .env("PYTHONPATH", &python_path));
    assert!(
        status.success(),
        "the Python agent needs nats-py and jsonschema in {} (run `make setup`):\n{out}",
        python_path.display()
    );
    let mut dev = Dev::start();
    // The story's pool increase: refused, with the coupling rule among the reasons.
    let (status, out) = run(Command::new("python3")
        .args([
            "examples/python/agent.py",
            &dev.url,
            "resource",
            "config/examples/seven-days-pool-500.json",
        ])
        .env("PYTHONPATH", &python_path));
    assert!(status.success(), "agent.py exited {status}:\n{out}");
    assert!(out.contains("resource-drain-queue v1: reject"), "{out}");
    assert!(out.contains("coupling.db_connections (reject)"), "{out}");
    let status = dev.proc.interrupt();
    assert!(status.success(), "`concord dev` exited {status} on Ctrl-C");
}
