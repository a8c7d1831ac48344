//! The bus: every subject concord uses, under `concord.v1.<domain>.`.
//!
//! For `intent`, `lease`, `observe`, `sync`, `ctl` and `query` the last token
//! is the caller's identity (NATS permissions confine each user to its own);
//! for `exec` it is the executor being called; for `world` and `notify` the
//! agent whose read-only replica or notices it carries. The log stream
//! captures `log.>`.

/// Subjects of one domain.
#[derive(Clone, Debug)]
pub struct Subjects {
    prefix: String,
}

/// What a subject addresses, with its caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addressed {
    /// `intent.<agent>`.
    Intent(String),
    /// `lease.<agent>`.
    Lease(String),
    /// `observe.<agent>`.
    Observe(String),
    /// `ctl.<operator>`.
    Control(String),
    /// `query.<caller>`.
    Query(String),
    /// `sync.<agent>`: the agent's world replica sends sync state (never changes).
    Sync(String),
}

impl Subjects {
    /// The subjects of `domain`.
    pub fn new(domain: &str) -> Subjects {
        Subjects {
            prefix: format!("concord.v1.{domain}"),
        }
    }

    /// `concord.v1.<domain>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Where `agent` proposes intents.
    pub fn intent(&self, agent: &str) -> String {
        format!("{}.intent.{agent}", self.prefix)
    }

    /// Where `agent` asks for leases.
    pub fn lease(&self, agent: &str) -> String {
        format!("{}.lease.{agent}", self.prefix)
    }

    /// Where `agent` publishes observations.
    pub fn observe(&self, agent: &str) -> String {
        format!("{}.observe.{agent}", self.prefix)
    }

    /// Where `operator` sends commands.
    pub fn ctl(&self, operator: &str) -> String {
        format!("{}.ctl.{operator}", self.prefix)
    }

    /// Where `caller` asks read-only questions (pending plans, sagas, leases, world, status).
    pub fn query(&self, caller: &str) -> String {
        format!("{}.query.{caller}", self.prefix)
    }

    /// Where `agent` sends its replica's sync state.
    pub fn sync(&self, agent: &str) -> String {
        format!("{}.sync.{agent}", self.prefix)
    }

    /// Where the coordinator sends `agent`'s replica its sync messages.
    pub fn world(&self, agent: &str) -> String {
        format!("{}.world.{agent}", self.prefix)
    }

    /// Where the coordinator pushes `agent` notices about its plans and
    /// leases (approved, rejected, expired, saga ended, lease lapsed).
    pub fn notify(&self, agent: &str) -> String {
        format!("{}.notify.{agent}", self.prefix)
    }

    /// Where the coordinator dispatches steps to `executor`.
    pub fn exec(&self, executor: &str) -> String {
        format!("{}.exec.{executor}", self.prefix)
    }

    /// A log message's subject: `log.<kind>.<who>`.
    pub fn log(&self, kind: &str, who: &str) -> String {
        format!("{}.log.{kind}.{who}", self.prefix)
    }

    /// Every log subject (the stream's filter).
    pub fn log_all(&self) -> String {
        format!("{}.log.>", self.prefix)
    }

    /// The wildcard the coordinator subscribes to for `domain` (e.g. `intent`).
    pub fn all(&self, domain: &str) -> String {
        format!("{}.{domain}.*", self.prefix)
    }

    /// What `subject` addresses, if it is one of the callers' subjects.
    pub fn parse(&self, subject: &str) -> Option<Addressed> {
        let rest = subject.strip_prefix(&self.prefix)?.strip_prefix('.')?;
        let (domain, who) = rest.split_once('.')?;
        if who.is_empty() || who.contains('.') {
            return None;
        }
        let who = who.to_string();
        Some(match domain {
            "intent" => Addressed::Intent(who),
            "lease" => Addressed::Lease(who),
            "observe" => Addressed::Observe(who),
            "ctl" => Addressed::Control(who),
            "query" => Addressed::Query(who),
            "sync" => Addressed::Sync(who),
            _ => return None,
        })
    }
}

/// Whether `name` can stand as one subject token (an agent, operator or executor name).
pub fn valid_token(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_name_the_caller_last() {
        let s = Subjects::new("default");
        assert_eq!(s.intent("deploy"), "concord.v1.default.intent.deploy");
        assert_eq!(
            s.parse("concord.v1.default.intent.deploy"),
            Some(Addressed::Intent("deploy".into()))
        );
        assert_eq!(
            s.parse("concord.v1.default.ctl.alice"),
            Some(Addressed::Control("alice".into()))
        );
        assert_eq!(
            s.parse("concord.v1.default.sync.deploy"),
            Some(Addressed::Sync("deploy".into()))
        );
        // What the coordinator sends is nobody's request.
        assert_eq!(s.parse(&s.world("deploy")), None);
        assert_eq!(s.parse("concord.v1.other.intent.deploy"), None);
        assert_eq!(s.parse("concord.v1.default.intent.a.b"), None);
        assert_eq!(s.parse("concord.v1.default.nope.a"), None);
        assert!(valid_token("resource-agent_1"));
        assert!(!valid_token("a.b") && !valid_token("") && !valid_token("a*"));
    }
}
