//! Resource paths, identifiers and bounded strings: the validated atoms of an intent.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Rule, rule_error};
use crate::limits::{ID_BYTES_MAX, PATH_BYTES_MAX, PATH_DEPTH_MAX};

/// A hierarchical name in the world model, e.g. `db/primary/pool_size`.
///
/// Segments are separated by `/`, are non-empty, and use `[A-Za-z0-9_.:-]`
/// (no `.` or `..` alone). A path covers its descendants: a lease on
/// `db/primary` covers `db/primary/pool_size`.
///
/// Its text is shared: a clone (the coordinator keeps a plan's paths in
/// several tables) costs a reference count, not a copy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourcePath(Arc<str>);

impl ResourcePath {
    /// Parses and validates a path.
    pub fn parse(s: &str) -> Result<Self, (Rule, String)> {
        if s.len() > PATH_BYTES_MAX {
            return Err((
                Rule::PathBytesMax,
                format!("path is {} bytes; at most {PATH_BYTES_MAX} allowed", s.len()),
            ));
        }
        if s.is_empty() {
            return Err((Rule::PathSyntax, "path is empty".into()));
        }
        let mut depth = 0;
        for (i, seg) in s.split('/').enumerate() {
            depth += 1;
            if seg.is_empty() {
                return Err((
                    Rule::PathSyntax,
                    format!(
                        "segment {} of `{s}` is empty (no leading, trailing or doubled `/`)",
                        i + 1
                    ),
                ));
            }
            if seg == "." || seg == ".." {
                return Err((Rule::PathSyntax, format!("segment `{seg}` of `{s}` is not allowed")));
            }
            if let Some(c) = seg.chars().find(|c| !is_path_char(*c)) {
                return Err((
                    Rule::PathSyntax,
                    format!("character {c:?} in `{s}` is not allowed (use A-Z a-z 0-9 _ . : -)"),
                ));
            }
        }
        if depth > PATH_DEPTH_MAX {
            return Err((
                Rule::PathDepthMax,
                format!("path has {depth} segments; at most {PATH_DEPTH_MAX} allowed"),
            ));
        }
        Ok(ResourcePath(Arc::from(s)))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path's segments.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }

    /// Number of segments.
    pub fn depth(&self) -> usize {
        self.segments().count()
    }

    /// `self` is `other` or one of its ancestors.
    pub fn covers(&self, other: &ResourcePath) -> bool {
        other.0 == self.0 || (other.0.starts_with(&*self.0) && other.0.as_bytes()[self.0.len()] == b'/')
    }

    /// `self` and `other` are equal or one covers the other.
    pub fn overlaps(&self, other: &ResourcePath) -> bool {
        self.covers(other) || other.covers(self)
    }

    /// The path `self/name` (a `name` of several segments adds them all), if it is a valid path.
    pub fn child(&self, name: &str) -> Result<ResourcePath, (Rule, String)> {
        let mut text = String::with_capacity(self.0.len() + 1 + name.len());
        text.push_str(&self.0);
        text.push('/');
        text.push_str(name);
        // `self` is valid, so the child is when `name` is a valid segment and
        // the whole fits the limits; anything else (a `name` of several
        // segments included) is left to `parse`, which decides as before.
        let valid = text.len() <= PATH_BYTES_MAX
            && !name.is_empty()
            && name != "."
            && name != ".."
            && name.chars().all(is_path_char)
            && self.depth() < PATH_DEPTH_MAX;
        if valid {
            Ok(ResourcePath(Arc::from(text)))
        } else {
            ResourcePath::parse(&text)
        }
    }

    /// The parent path, or `None` for a one-segment path.
    pub fn parent(&self) -> Option<ResourcePath> {
        self.0.rfind('/').map(|i| ResourcePath(Arc::from(&self.0[..i])))
    }

    /// The last segment.
    pub fn name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }

    /// The prefix under which every descendant's text starts (`self/`).
    pub fn descendant_prefix(&self) -> String {
        let mut prefix = String::with_capacity(self.0.len() + 1);
        prefix.push_str(&self.0);
        prefix.push('/');
        prefix
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')
}

// Paths order exactly as their text does, so maps keyed by paths can be
// range-scanned by a text prefix.
impl std::borrow::Borrow<str> for ResourcePath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Serialize for ResourcePath {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for ResourcePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for ResourcePath {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ResourcePath::parse(s).map_err(|(rule, detail)| format!("{rule}: {detail}"))
    }
}

impl<'de> Deserialize<'de> for ResourcePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        ResourcePath::parse(&s).map_err(|(rule, detail)| rule_error("", rule, detail))
    }
}

impl schemars::JsonSchema for ResourcePath {
    fn schema_name() -> Cow<'static, str> {
        "ResourcePath".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A hierarchical resource path such as `db/primary/pool_size`: 1 to 16 non-empty segments of [A-Za-z0-9_.:-], at most 256 bytes.",
            "type": "string",
            "minLength": 1,
            "maxLength": PATH_BYTES_MAX,
            "pattern": "^[A-Za-z0-9_.:-]+(/[A-Za-z0-9_.:-]+){0,15}$"
        })
    }
}

/// An identifier: lineage ids, step ids, principals, roles, idempotency keys.
/// 1 to 128 bytes of `[A-Za-z0-9_.:@-]`.
///
/// Its text is shared, as a [`ResourcePath`]'s is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Id(Arc<str>);

impl Id {
    /// Parses and validates an identifier.
    pub fn parse(s: &str) -> Result<Self, (Rule, String)> {
        if s.len() > ID_BYTES_MAX {
            return Err((
                Rule::StringBytesMax,
                format!("identifier is {} bytes; at most {ID_BYTES_MAX} allowed", s.len()),
            ));
        }
        if s.is_empty() {
            return Err((Rule::IdSyntax, "identifier is empty".into()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '@' | '-')))
        {
            return Err((
                Rule::IdSyntax,
                format!("character {c:?} in `{s}` is not allowed (use A-Z a-z 0-9 _ . : @ -)"),
            ));
        }
        Ok(Id(Arc::from(s)))
    }

    /// The identifier as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        Id::parse(&s).map_err(|(rule, detail)| rule_error("", rule, detail))
    }
}

impl schemars::JsonSchema for Id {
    fn schema_name() -> Cow<'static, str> {
        "Id".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "An identifier: 1 to 128 bytes of [A-Za-z0-9_.:@-].",
            "type": "string",
            "minLength": 1,
            "maxLength": ID_BYTES_MAX,
            "pattern": "^[A-Za-z0-9_.:@-]+$"
        })
    }
}

/// A string of at most `MAX` bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Default)]
#[serde(transparent)]
pub struct Bounded<const MAX: usize>(String);

impl<const MAX: usize> Bounded<MAX> {
    /// Checks the length.
    pub fn parse(s: &str) -> Result<Self, (Rule, String)> {
        if s.len() > MAX {
            return Err((
                Rule::StringBytesMax,
                format!("string is {} bytes; at most {MAX} allowed", s.len()),
            ));
        }
        Ok(Bounded(s.to_string()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<const MAX: usize> fmt::Display for Bounded<MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de, const MAX: usize> Deserialize<'de> for Bounded<MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        Bounded::parse(&s).map_err(|(rule, detail)| rule_error("", rule, detail))
    }
}

impl<const MAX: usize> schemars::JsonSchema for Bounded<MAX> {
    fn schema_name() -> Cow<'static, str> {
        format!("String{MAX}").into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": format!("A string of at most {MAX} bytes (UTF-8); the schema checks characters, concord checks bytes."),
            "type": "string",
            "maxLength": MAX,
        })
    }
}

/// A short string: versions, artifacts, programs, arguments, reasons.
pub type Short = Bounded<{ crate::limits::STRING_BYTES_MAX }>;
/// Free text: goals, rationales, unknowns.
pub type Text = Bounded<{ crate::limits::TEXT_BYTES_MAX }>;
