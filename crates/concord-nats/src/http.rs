//! The coordinator's HTTP endpoints: `/metrics` (Prometheus text),
//! `/livez` (the loop turns) and `/readyz` (connected, log writable, state
//! recovered). Three fixed GET routes on a loopback or internal address: a
//! few lines over a TCP listener rather than an HTTP framework.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::runtime::Health;

/// The loop must have turned within this long for `/livez` to answer 200.
pub const LIVENESS_WINDOW_MS: u64 = 5_000;

/// Installs the Prometheus recorder (once per process) and returns its handle.
pub fn install_metrics() -> Option<PrometheusHandle> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .ok()
}

/// Serves the endpoints on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Option<PrometheusHandle>, health: Arc<Health>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let head = String::from_utf8_lossy(&buf[..n]);
            let path = head.split_whitespace().nth(1).unwrap_or("/");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let (code, body) = match path {
                "/metrics" => (200, metrics.map(|m| m.render()).unwrap_or_default()),
                "/livez" => {
                    let beat = health.beat_ms.load(Ordering::Relaxed);
                    if now.saturating_sub(beat) <= LIVENESS_WINDOW_MS {
                        (200, "live\n".to_string())
                    } else {
                        (
                            503,
                            format!("the loop last turned {} ms ago\n", now.saturating_sub(beat)),
                        )
                    }
                }
                "/readyz" => {
                    if health.ready.load(Ordering::Relaxed) {
                        (200, "ready\n".to_string())
                    } else {
                        (
                            503,
                            "not ready: connecting, recovering, or the log is not writable\n".to_string(),
                        )
                    }
                }
                _ => (404, "not found\n".to_string()),
            };
            let reason = match code {
                200 => "OK",
                404 => "Not Found",
                _ => "Service Unavailable",
            };
            let resp = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
