//! One module per subcommand.

pub mod bench;
pub mod bus;
pub mod check;
pub mod live;
pub mod natsconfig;
pub mod replay;
pub mod schema;
pub mod sim;
pub mod tail;
pub mod up;

use std::io::Write;

/// Writes `text` to stdout. A closed pipe (`concord schema | head`) ends the
/// output quietly instead of panicking as `print!` would.
pub fn out(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
