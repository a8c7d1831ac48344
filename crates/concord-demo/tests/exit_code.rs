//! The `concord-demo` binary's exit code follows the outcome: 0 when the
//! story went as expected, 1 (with each failure named) when it did not — here
//! provoked by a time limit the story cannot meet. Uncoordinated runs start
//! no coordinator (only the NATS server the system's observations go on), so
//! these stay cheap.

use std::path::Path;
use std::process::{Command, Output};

fn demo(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    Command::new(env!("CARGO_BIN_EXE_concord-demo"))
        .args(args)
        .current_dir(root)
        .output()
        .expect("running concord-demo")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_expected_outcome_exits_zero() {
    let out = demo(&["--uncoordinated", "--tick-ms", "20"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("outcome: as expected"), "{text}");
}

#[test]
fn a_story_out_of_time_exits_non_zero_naming_what_failed() {
    let out = demo(&["--uncoordinated", "--time-limit-s", "1"]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("UNEXPECTED: the story did not finish: out of time at the 1.0 s limit"),
        "{text}"
    );
    assert!(text.contains("UNEXPECTED: the run took"), "{text}");
    assert!(!text.contains("outcome: as expected"), "{text}");
}
