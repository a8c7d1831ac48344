//! Virtual time: durations written the way people write them (`7d`,
//! `1d10h`, `30m`, `90s`, `250ms`), and their rendering in reports.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration or a point in simulated time, in milliseconds since the start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub u64);

/// Longest duration a scenario may name: a year of simulated time.
pub const DURATION_MS_MAX: u64 = 366 * 86_400_000;

impl Dur {
    /// Milliseconds.
    pub fn ms(self) -> u64 {
        self.0
    }

    /// Parses `1d10h30m`, `90s`, `250ms`; units `d h m s ms`, each at most once, largest first.
    pub fn parse(text: &str) -> Result<Dur, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("a duration needs a number and a unit, e.g. `30m`".into());
        }
        let mut total: u64 = 0;
        let mut rest = t;
        let mut last_rank = usize::MAX;
        while !rest.is_empty() {
            let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return Err(format!("`{text}`: expected a number at `{rest}`"));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("`{text}`: number too large"))?;
            rest = &rest[digits..];
            let (unit_ms, len, rank) = if rest.starts_with("ms") {
                (1, 2, 4)
            } else if rest.starts_with('d') {
                (86_400_000, 1, 0)
            } else if rest.starts_with('h') {
                (3_600_000, 1, 1)
            } else if rest.starts_with('m') {
                (60_000, 1, 2)
            } else if rest.starts_with('s') {
                (1_000, 1, 3)
            } else {
                return Err(format!("`{text}`: a number needs a unit (d, h, m, s or ms)"));
            };
            if last_rank != usize::MAX && rank <= last_rank {
                return Err(format!("`{text}`: units go largest first, each once"));
            }
            last_rank = rank;
            rest = &rest[len..];
            total = n
                .checked_mul(unit_ms)
                .and_then(|x| total.checked_add(x))
                .ok_or_else(|| format!("`{text}`: too large"))?;
        }
        if total > DURATION_MS_MAX {
            return Err(format!("`{text}` is longer than a year"));
        }
        Ok(Dur(total))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Dur {
    /// The shortest exact form: `1d10h`, `30m`, `1m30s`, `250ms`, `0s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.0;
        for (unit, name) in [
            (86_400_000, "d"),
            (3_600_000, "h"),
            (60_000, "m"),
            (1_000, "s"),
            (1, "ms"),
        ] {
            if rest >= unit {
                write!(f, "{}{name}", rest / unit)?;
                rest %= unit;
            }
        }
        Ok(())
    }
}

/// A point in simulated time as `d+HH:MM:SS.mmm` (days since the start).
pub fn stamp(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{}d+{:02}:{:02}:{:02}.{:03}",
        s / 86_400,
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!(
            Dur::parse("1d10h30m").unwrap().ms(),
            86_400_000 + 10 * 3_600_000 + 30 * 60_000
        );
        assert_eq!(Dur::parse("250ms").unwrap().ms(), 250);
        assert_eq!(Dur::parse("1m30s").unwrap().to_string(), "1m30s");
        assert_eq!(Dur(90_061_001).to_string(), "1d1h1m1s1ms");
        assert!(Dur::parse("10").unwrap_err().contains("unit"));
        assert!(Dur::parse("5m1h").unwrap_err().contains("largest first"));
        assert!(Dur::parse("400d").unwrap_err().contains("year"));
        assert_eq!(stamp(86_400_000 + 3_723_004), "1d+01:02:03.004");
    }
}
