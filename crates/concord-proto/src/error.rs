//! Decoding errors: every one names the field path and the rule it broke.

use serde::{Deserialize, Serialize};

/// The rule a rejected payload broke. Programs match on these ids; the
/// `detail` of a [`DecodeError`] is for people.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The bytes are not valid JSON.
    JsonSyntax,
    /// The payload is larger than [`crate::limits::INTENT_BYTES_MAX`].
    PayloadBytesMax,
    /// A required field is missing.
    Required,
    /// A field the schema does not define is present (requests are strict).
    UnknownField,
    /// A field has the wrong JSON type.
    Type,
    /// A tag (step kind, operator, mode, ...) names no known variant.
    UnknownVariant,
    /// The protocol version is not one this build speaks.
    ProtocolVersion,
    /// An identifier has characters outside `[A-Za-z0-9_.:@-]` or is empty.
    IdSyntax,
    /// A string is longer than its limit.
    StringBytesMax,
    /// A resource path is malformed (empty segment, bad character, leading or trailing `/`).
    PathSyntax,
    /// A resource path has too many segments.
    PathDepthMax,
    /// A resource path is too long.
    PathBytesMax,
    /// A list has too many items (steps, assumptions, unknowns, args, value items).
    ItemsMax,
    /// A list that must not be empty is empty.
    ItemsMin,
    /// A value nests deeper than its limit.
    ValueDepthMax,
    /// A number is outside its allowed range.
    NumericRange,
    /// A number is NaN or infinite.
    NotFinite,
    /// `null` is not a value in concord; remove the path with a `delete` step.
    NullValue,
    /// Two steps share one id.
    DuplicateId,
    /// A `delete` step's confirmation does not repeat the path it deletes.
    Confirmation,
    /// The compensation is not allowed for this kind of step.
    Compensation,
    /// A `network` step's preflight evidence is missing or incomplete.
    Preflight,
    /// An `exec` program is a shell string rather than one program name.
    ExecProgram,
    /// A network address range is not valid CIDR notation.
    Cidr,
    /// A port range is empty or outside 1..=65535.
    PortRange,
}

impl Rule {
    /// The rule's wire id, e.g. `path_depth_max`.
    pub fn id(self) -> &'static str {
        match self {
            Rule::JsonSyntax => "json_syntax",
            Rule::PayloadBytesMax => "payload_bytes_max",
            Rule::Required => "required",
            Rule::UnknownField => "unknown_field",
            Rule::Type => "type",
            Rule::UnknownVariant => "unknown_variant",
            Rule::ProtocolVersion => "protocol_version",
            Rule::IdSyntax => "id_syntax",
            Rule::StringBytesMax => "string_bytes_max",
            Rule::PathSyntax => "path_syntax",
            Rule::PathDepthMax => "path_depth_max",
            Rule::PathBytesMax => "path_bytes_max",
            Rule::ItemsMax => "items_max",
            Rule::ItemsMin => "items_min",
            Rule::ValueDepthMax => "value_depth_max",
            Rule::NumericRange => "numeric_range",
            Rule::NotFinite => "not_finite",
            Rule::NullValue => "null_value",
            Rule::DuplicateId => "duplicate_id",
            Rule::Confirmation => "confirmation",
            Rule::Compensation => "compensation",
            Rule::Preflight => "preflight",
            Rule::ExecProgram => "exec_program",
            Rule::Cidr => "cidr",
            Rule::PortRange => "port_range",
        }
    }

    const ALL: [Rule; 25] = [
        Rule::JsonSyntax,
        Rule::PayloadBytesMax,
        Rule::Required,
        Rule::UnknownField,
        Rule::Type,
        Rule::UnknownVariant,
        Rule::ProtocolVersion,
        Rule::IdSyntax,
        Rule::StringBytesMax,
        Rule::PathSyntax,
        Rule::PathDepthMax,
        Rule::PathBytesMax,
        Rule::ItemsMax,
        Rule::ItemsMin,
        Rule::ValueDepthMax,
        Rule::NumericRange,
        Rule::NotFinite,
        Rule::NullValue,
        Rule::DuplicateId,
        Rule::Confirmation,
        Rule::Compensation,
        Rule::Preflight,
        Rule::ExecProgram,
        Rule::Cidr,
        Rule::PortRange,
    ];

    fn from_id(id: &str) -> Option<Rule> {
        Rule::ALL.into_iter().find(|r| r.id() == id)
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

/// A payload that concord refused, with the field that broke a rule.
///
/// `field` is a path into the payload such as `steps[2].args.confirm`
/// (empty for the payload as a whole).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize, schemars::JsonSchema)]
#[error("{}{rule}: {detail}", if field.is_empty() { String::new() } else { format!("{field}: ") })]
pub struct DecodeError {
    /// Where in the payload, e.g. `steps[0].path`.
    pub field: String,
    /// Which rule the field broke.
    pub rule: Rule,
    /// What was wrong, for people.
    pub detail: String,
}

impl DecodeError {
    /// A new error at `field`.
    pub fn new(field: impl Into<String>, rule: Rule, detail: impl Into<String>) -> Self {
        DecodeError {
            field: field.into(),
            rule,
            detail: detail.into(),
        }
    }
}

/// Builds a serde error that carries a rule id and an optional sub-path, so
/// that [`classify`] can turn it back into a [`DecodeError`] after serde has
/// stringified it. Format: `@sub.path rule_id: detail` (the `@` part optional).
pub(crate) fn rule_error<E: serde::de::Error>(at: &str, rule: Rule, detail: impl std::fmt::Display) -> E {
    if at.is_empty() {
        E::custom(format_args!("{}: {detail}", rule.id()))
    } else {
        E::custom(format_args!("@{at} {}: {detail}", rule.id()))
    }
}

/// Turns a serde error message found at `path` into a [`DecodeError`].
pub(crate) fn classify(path: &str, message: &str) -> DecodeError {
    // Drop serde_json's " at line L column C" suffix: the field path says where.
    let message = match message.rfind(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    let mut field = path.trim_start_matches('.').to_string();
    if field == "." {
        field.clear();
    }
    let mut rest = message;
    if let Some(tail) = rest.strip_prefix('@') {
        let (at, tail) = tail.split_once(' ').unwrap_or((tail, ""));
        field = join(&field, at);
        rest = tail;
    }
    if let Some((id, detail)) = rest.split_once(": ")
        && let Some(rule) = Rule::from_id(id)
    {
        return DecodeError::new(field, rule, detail);
    }
    // serde's own messages.
    let quoted = |s: &str| s.split('`').nth(1).map(str::to_string);
    if let Some(tail) = rest.strip_prefix("missing field ") {
        let name = quoted(tail).unwrap_or_default();
        return DecodeError::new(join(&field, &name), Rule::Required, format!("missing field `{name}`"));
    }
    if let Some(tail) = rest.strip_prefix("unknown field ") {
        // serde_path_to_error already puts the offending key on the path when
        // the key itself fails; join it only when it is not there yet.
        let name = quoted(tail).unwrap_or_default();
        let named = field == name || field.ends_with(&format!(".{name}"));
        let field = if named { field } else { join(&field, &name) };
        return DecodeError::new(field, Rule::UnknownField, rest);
    }
    if rest.starts_with("unknown variant") {
        return DecodeError::new(field, Rule::UnknownVariant, rest);
    }
    if rest.starts_with("invalid type") || rest.starts_with("invalid value") || rest.starts_with("invalid length") {
        return DecodeError::new(field, Rule::Type, rest);
    }
    if rest.starts_with("number out of range") {
        return DecodeError::new(field, Rule::NumericRange, rest);
    }
    if let Some(tail) = rest.strip_prefix("duplicate field ") {
        let name = quoted(tail).unwrap_or_default();
        return DecodeError::new(join(&field, &name), Rule::UnknownField, rest);
    }
    DecodeError::new(field, Rule::JsonSyntax, rest)
}

/// The field path of a serde_path_to_error path, e.g. `steps[0].args.value`
/// (empty for the payload as a whole). Unknown segments (a key that could not
/// be read, e.g. at the end of truncated input) are left out rather than
/// shown as `?`.
pub(crate) fn field_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut field = String::new();
    for segment in path {
        match segment {
            Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            Segment::Map { key } => field = join(&field, key),
            Segment::Enum { variant } => field = join(&field, variant),
            Segment::Unknown => {}
        }
    }
    field
}

pub(crate) fn join(base: &str, tail: &str) -> String {
    match (base.is_empty(), tail.is_empty()) {
        (_, true) => base.to_string(),
        (true, false) => tail.to_string(),
        (false, false) if tail.starts_with('[') => format!("{base}{tail}"),
        (false, false) => format!("{base}.{tail}"),
    }
}

/// Parses JSON bytes into `T`, turning any serde error into a [`DecodeError`]
/// that names the field path and the rule. Trailing bytes are an error.
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    // Most input is good: decode it without tracking the path, and decode
    // again, tracking it, only to name the field of an error.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let inner = e.inner();
        let message = inner.to_string();
        // serde_json counts a number literal beyond f64 (`1e999`) as a syntax
        // error; concord calls it what it is, a number out of range.
        if (inner.is_syntax() && !message.starts_with("number out of range")) || inner.is_eof() {
            DecodeError::new(field_of(e.path()), Rule::JsonSyntax, message)
        } else {
            classify(&field_of(e.path()), &message)
        }
    })?;
    de.end()
        .map_err(|e| DecodeError::new("", Rule::JsonSyntax, e.to_string()))?;
    Ok(value)
}
