//! Test fixtures for concord: real `nats-server` processes, never mocks and
//! never a server that happens to run on 4222.
//!
//! [`NatsServer::start`] runs the binary on a free port with JetStream and a
//! store directory of its own, can restart it on the same port and store
//! (fault tests) or kill it, and kills it and removes its files on `Drop`.
//! [`NatsServer::with_config`] starts it from configuration text (users and
//! permissions from `concord nats-config`). [`NatsCluster::start`] runs a
//! JetStream cluster of such servers, routed to each other, whose nodes can be
//! killed and restarted one by one. A test that cannot start a server fails
//! with a one-line install hint.
//!
//! # Finding the binary
//! `NATS_SERVER_BIN` if set, then the project's `.tools/bin/nats-server`
//! (installed by `make setup`), then `nats-server` on `PATH`. Tests that need
//! a newer server than the one found skip themselves by name
//! ([`skip_unless`]), so the Debian 2.9 server runs a compatibility subset.
//!
//! ```no_run
//! let server = concord_testkit::NatsServer::start();
//! assert!(server.url().starts_with("nats://127.0.0.1:"));
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use concord_nats::server::{ServerOptions, ServerProcess, find_nats_server};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `nats-server` binary the tests use.
pub fn nats_server_bin() -> PathBuf {
    find_nats_server(Some(&workspace_root())).unwrap_or_else(|e| panic!("{e}"))
}

/// The server's version as `(major, minor, patch)`.
pub fn nats_server_version() -> (u32, u32, u32) {
    let out = Command::new(nats_server_bin())
        .arg("--version")
        .output()
        .expect("run nats-server --version");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let v = text.split_whitespace().find_map(|w| w.strip_prefix('v')).unwrap_or("0");
    let mut it = v.split('.').map(|n| n.trim().parse::<u32>().unwrap_or(0));
    (it.next().unwrap_or(0), it.next().unwrap_or(0), it.next().unwrap_or(0))
}

/// Prints why a test is skipped and returns `true` if the server is older than `major.minor`.
pub fn skip_unless(major: u32, minor: u32, test: &str) -> bool {
    let (a, b, c) = nats_server_version();
    if (a, b) >= (major, minor) {
        return false;
    }
    eprintln!("skipped {test}: needs nats-server >= {major}.{minor}, found {a}.{b}.{c}");
    true
}

/// A running `nats-server` with JetStream on a free port.
#[derive(Debug)]
pub struct NatsServer {
    inner: ServerProcess,
}

impl NatsServer {
    /// Starts a server.
    pub fn start() -> NatsServer {
        NatsServer::launch(ServerOptions::default())
    }

    /// Starts a server from configuration text.
    pub fn with_config(config: &str) -> NatsServer {
        NatsServer::launch(ServerOptions {
            config: Some(config.to_string()),
            ..ServerOptions::default()
        })
    }

    /// Starts a server with these options (the binary is filled in).
    pub fn launch(mut options: ServerOptions) -> NatsServer {
        options.bin.get_or_insert_with(nats_server_bin);
        NatsServer {
            inner: ServerProcess::start(options).unwrap_or_else(|e| panic!("{e}")),
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.inner.port()
    }

    /// A folder that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }

    /// The server's log.
    pub fn log(&self) -> String {
        self.inner.log()
    }

    /// Kills it (SIGKILL).
    pub fn kill(&mut self) {
        self.inner.kill();
    }

    /// Starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.inner.restart().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Whether it runs.
    pub fn is_running(&mut self) -> bool {
        self.inner.is_running()
    }
}

/// A JetStream cluster of `nats-server` processes on free ports, routed to
/// each other on free cluster ports, each with its own store.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, in start order.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` nodes (named `n0`, `n1`, ...) of cluster `concord-test`.
    /// JetStream needs a moment after this to elect its meta leader: clients
    /// wait for it (the coordinator retries; `wait_jetstream` in tests).
    pub fn start(n: usize) -> NatsCluster {
        let free = || concord_nats::server::free_port().unwrap_or_else(|e| panic!("no free port: {e}"));
        let routes: Vec<u16> = (0..n).map(|_| free()).collect();
        let nodes = (0..n)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                    .collect();
                let config = format!(
                    "server_name: \"n{i}\"\ncluster {{\n  name: \"concord-test\"\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                    routes[i],
                    others.join(", ")
                );
                NatsServer::launch(ServerOptions {
                    config: Some(config),
                    ..ServerOptions::default()
                })
            })
            .collect();
        NatsCluster { nodes }
    }

    /// Every node's URL, comma-separated (what clients and `concord up --nats` take).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(NatsServer::url).collect::<Vec<_>>().join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_on_a_free_port_restarts_and_stops() {
        let mut s = NatsServer::start();
        assert_ne!(s.port(), 4222);
        let port = s.port();
        s.restart();
        assert_eq!(s.port(), port);
        assert!(s.is_running());
        s.kill();
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    }
}
