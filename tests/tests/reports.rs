//! Snapshots of the text report `concord check` prints for every example.
//!
//! Review a changed report by eye: `cargo insta review`, or run with
//! `INSTA_UPDATE=always` and read the diff of `tests/tests/snapshots/`.

use concord_tests::{EXAMPLES, Example, check, example};

fn report(e: &Example) -> String {
    let run = check(e, &[]);
    assert!(
        [0, 2, 3].contains(&run.code),
        "{}: exit {} is no verdict\n{}",
        e.name,
        run.code,
        run.stderr
    );
    assert_eq!(run.stderr, "", "{}", e.name);
    run.stdout
}

#[test]
fn text_report_of_every_example() {
    for e in &EXAMPLES {
        insta::with_settings!({ description => e.check_args().join(" ") }, {
            insta::assert_snapshot!(e.name, report(e));
        });
    }
}

#[test]
fn text_report_of_other_agents() {
    for agent in ["newcomer", "metrics"] {
        let e = Example {
            agent,
            ..example("pool-60")
        };
        insta::with_settings!({ description => e.check_args().join(" ") }, {
            insta::assert_snapshot!(format!("pool-60-as-{agent}"), report(&e));
        });
    }
}
