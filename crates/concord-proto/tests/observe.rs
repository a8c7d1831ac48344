//! Decoding observations.

use concord_proto::{ObservationKind, Rule, Value, decode_observation};

#[test]
fn health_and_metrics_decode() {
    let o = decode_observation(br#"{"protocol":1,"path":"svc/api/health/app","kind":"app_health","value":"degraded"}"#)
        .unwrap();
    assert_eq!(o.kind, ObservationKind::AppHealth);
    assert_eq!(o.value, Value::Str("degraded".into()));
    let m = decode_observation(
        br#"{"protocol":1,"path":"svc/api/queue_depth","kind":"metric","value":1250,"observed_at_ms":17}"#,
    )
    .unwrap();
    assert_eq!((m.value, m.observed_at_ms), (Value::Int(1250), Some(17)));
}

#[test]
fn bad_observations_name_the_field_and_rule() {
    let cases: [(&[u8], &str, Rule); 6] = [
        (
            br#"{"protocol":1,"path":"svc/api/up","kind":"liveness","value":"fine"}"#,
            "value",
            Rule::Type,
        ),
        (
            br#"{"protocol":1,"path":"svc/api/q","kind":"metric","value":"high"}"#,
            "value",
            Rule::Type,
        ),
        (
            br#"{"protocol":2,"path":"svc/api/q","kind":"metric","value":1}"#,
            "protocol",
            Rule::ProtocolVersion,
        ),
        (
            br#"{"protocol":1,"path":"svc//q","kind":"metric","value":1}"#,
            "path",
            Rule::PathSyntax,
        ),
        (
            br#"{"protocol":1,"path":"svc/q","kind":"metric","value":1,"agent":"x"}"#,
            "agent",
            Rule::UnknownField,
        ),
        (
            br#"{"protocol":1,"path":"svc/q","kind":"gauge","value":1}"#,
            "kind",
            Rule::UnknownVariant,
        ),
    ];
    for (bytes, field, rule) in cases {
        let e = decode_observation(bytes).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.rule),
            (field, rule),
            "{}",
            String::from_utf8_lossy(bytes)
        );
    }
}
