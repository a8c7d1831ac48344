//! A local `nats-server` child process with JetStream, for `concord dev` and
//! the tests: a free port, a store directory of its own, restart on the same
//! port and store, killed on drop.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a server could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// No binary was found.
    #[error(
        "nats-server not found: run `make setup` (installs it into .tools/bin), put it on PATH, or set NATS_SERVER_BIN"
    )]
    NotFound,
    /// The process could not be run or its files written.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It exited or did not listen in time.
    #[error("nats-server did not start on port {port}: {detail}; its log:\n{log}")]
    NotListening {
        /// The port.
        port: u16,
        /// What happened.
        detail: String,
        /// Its log.
        log: String,
    },
}

/// Finds the `nats-server` binary: `NATS_SERVER_BIN`, then `.tools/bin`
/// under `project_root` (if given), then `PATH`.
pub fn find_nats_server(project_root: Option<&Path>) -> Result<PathBuf, ServerError> {
    if let Some(p) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(root) = project_root {
        let tools = root.join(".tools/bin/nats-server");
        if tools.exists() {
            return Ok(tools);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("nats-server");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(ServerError::NotFound)
}

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How to start a server.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    /// The binary (found with [`find_nats_server`] if unset).
    pub bin: Option<PathBuf>,
    /// Configuration text (users, permissions, `jetstream { sync_interval }`).
    pub config: Option<String>,
    /// More arguments.
    pub args: Vec<String>,
    /// The port (a free one if unset).
    pub port: Option<u16>,
    /// Where the store and files go (a temporary folder if unset).
    pub dir: Option<PathBuf>,
}

/// A running server.
#[derive(Debug)]
pub struct ServerProcess {
    child: Option<Child>,
    bin: PathBuf,
    port: u16,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    options: ServerOptions,
}

impl ServerProcess {
    /// Starts a server and waits until it listens.
    pub fn start(options: ServerOptions) -> Result<ServerProcess, ServerError> {
        let bin = match &options.bin {
            Some(b) => b.clone(),
            None => find_nats_server(None)?,
        };
        let (dir, temp) = match &options.dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("concord-nats-")
                    .tempdir()
                    .map_err(|source| ServerError::Spawn {
                        bin: bin.clone(),
                        source,
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let port = match options.port {
            Some(p) => p,
            None => free_port().map_err(|source| ServerError::Spawn {
                bin: bin.clone(),
                source,
            })?,
        };
        let mut s = ServerProcess {
            child: None,
            bin,
            port,
            dir,
            _temp: temp,
            options,
        };
        s.spawn()?;
        Ok(s)
    }

    fn spawn(&mut self) -> Result<(), ServerError> {
        let io = |source| ServerError::Spawn {
            bin: self.bin.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(io)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(self.dir.join("store"))
            .args(&self.options.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if let Some(text) = &self.options.config {
            let path = self.dir.join("nats.conf");
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .map_err(io)?;
            cmd.arg("-c").arg(path);
        }
        self.child = Some(cmd.spawn().map_err(io)?);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> Result<(), ServerError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
                .map(|s| format!("exited ({s})"));
            if let Some(detail) = exited.or_else(|| (Instant::now() > deadline).then(|| "timed out".to_string())) {
                return Err(ServerError::NotListening {
                    port: self.port,
                    detail,
                    log: self.log(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The folder of its store and files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) -> Result<(), ServerError> {
        self.kill();
        self.spawn()
    }

    /// Whether the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
