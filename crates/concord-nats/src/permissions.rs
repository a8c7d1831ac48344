//! `concord nats-config`: a nats-server configuration with one user per
//! agent, operator and executor, and one for the coordinator, each an nkey
//! whose permissions confine it to its own subjects.
//!
//! - an agent publishes only on its own `intent`, `lease`, `observe`, `sync`
//!   and `query` subjects and subscribes only to its own inbox prefix
//!   (`_INBOX_<name>.>`), replica and `notify` subjects: it cannot speak as another
//!   agent, cannot send operators' commands, and has no JetStream or KV API;
//! - an operator sends commands and questions on its own `ctl` / `query`
//!   subjects and may read the log (consumers on the log stream);
//! - an executor receives its own `exec` subject, answers the requests it
//!   receives, may read the halts and keep its fencing tokens in KV, and its
//!   members ask each other about their claims on `exec.<name>.member.*`;
//! - the coordinator may do everything.

use serde::{Deserialize, Serialize};

use crate::subjects::{Subjects, valid_token};

/// `config/agents.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentsFile {
    /// The domain (`default` if unset).
    #[serde(default = "default_domain")]
    pub domain: String,
    /// The coordinator's user name.
    #[serde(default = "default_coordinator")]
    pub coordinator: String,
    /// The log stream (for operators' read rights).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Agents.
    #[serde(default)]
    pub agents: Vec<Named>,
    /// Operators.
    #[serde(default)]
    pub operators: Vec<Named>,
    /// Executors.
    #[serde(default)]
    pub executors: Vec<Named>,
}

/// A name.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Named {
    /// The identity (one subject token).
    pub name: String,
}

fn default_domain() -> String {
    "default".into()
}
fn default_coordinator() -> String {
    "concord".into()
}
fn default_stream() -> String {
    "CONCORD_LOG".into()
}

/// A generated user: its role, name and nkey seed.
#[derive(Clone, Debug)]
pub struct User {
    /// `coordinator`, `agent`, `operator` or `executor`.
    pub role: &'static str,
    /// Its identity.
    pub name: String,
    /// Its seed (secret; written to `<dir>/<role>-<name>.nk`).
    pub seed: String,
    /// Its public key.
    pub public: String,
}

/// Why the file is refused.
#[derive(Debug, thiserror::Error)]
pub enum PermissionsError {
    /// A name is not one subject token or is used twice.
    #[error("{field}: {message}")]
    Invalid {
        /// Where.
        field: String,
        /// The rule.
        message: String,
    },
}

fn quote_list(items: &[String]) -> String {
    items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ")
}

/// Generates the users and the server configuration text. `sync_always`
/// adds `jetstream { sync_interval: always }` (every write reaches the disk
/// before it is acknowledged; see the README on durability).
pub fn generate(file: &AgentsFile, sync_always: bool) -> Result<(Vec<User>, String), PermissionsError> {
    let mut seen = std::collections::BTreeSet::new();
    let check = |field: &str, name: &str, seen: &mut std::collections::BTreeSet<String>| {
        if !valid_token(name) {
            return Err(PermissionsError::Invalid {
                field: field.to_string(),
                message: format!("`{name}` is not one subject token ([A-Za-z0-9_-], at most 128)"),
            });
        }
        if !seen.insert(format!("{field}:{name}")) {
            return Err(PermissionsError::Invalid {
                field: field.to_string(),
                message: format!("`{name}` appears twice"),
            });
        }
        Ok(())
    };
    for (field, list) in [
        ("agents", &file.agents),
        ("operators", &file.operators),
        ("executors", &file.executors),
    ] {
        for n in list {
            check(field, &n.name, &mut seen)?;
        }
    }
    check("domain", &file.domain, &mut seen)?;
    check("coordinator", &file.coordinator, &mut seen)?;
    let s = Subjects::new(&file.domain);
    let mut users = Vec::new();
    let mut blocks = Vec::new();
    let mut add = |role: &'static str, name: &str, publish: Vec<String>, subscribe: Vec<String>, responses: bool| {
        let kp = nkeys::KeyPair::new_user();
        let user = User {
            role,
            name: name.to_string(),
            seed: kp.seed().expect("a new key has a seed"),
            public: kp.public_key(),
        };
        let perms = if role == "coordinator" {
            "{ publish: \">\", subscribe: \">\" }".to_string()
        } else {
            format!(
                "{{ publish: {{ allow: [{}] }}, subscribe: {{ allow: [{}] }}{} }}",
                quote_list(&publish),
                quote_list(&subscribe),
                if responses { ", allow_responses: true" } else { "" }
            )
        };
        blocks.push(format!(
            "    # {role} {name}\n    {{ nkey: \"{}\", permissions: {perms} }}",
            user.public
        ));
        users.push(user);
    };
    add("coordinator", &file.coordinator, Vec::new(), Vec::new(), false);
    for a in &file.agents {
        let n = &a.name;
        add(
            "agent",
            n,
            vec![s.intent(n), s.lease(n), s.observe(n), s.sync(n), s.query(n)],
            vec![format!("_INBOX_{n}.>"), s.world(n), s.notify(n)],
            false,
        );
    }
    let js = &file.stream;
    for o in &file.operators {
        let n = &o.name;
        add(
            "operator",
            n,
            vec![
                s.ctl(n),
                s.query(n),
                format!("$JS.API.INFO"),
                format!("$JS.API.STREAM.INFO.{js}"),
                format!("$JS.API.CONSUMER.CREATE.{js}"),
                format!("$JS.API.CONSUMER.CREATE.{js}.>"),
                format!("$JS.API.CONSUMER.INFO.{js}.>"),
                format!("$JS.API.CONSUMER.DELETE.{js}.>"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{js}.>"),
                format!("$JS.API.STREAM.INFO.KV_{}", crate::store::CHAIN_BUCKET),
                format!("$JS.API.DIRECT.GET.KV_{}.>", crate::store::CHAIN_BUCKET),
                "$JS.FC.>".to_string(),
            ],
            vec![format!("_INBOX_{n}.>")],
            false,
        );
    }
    for e in &file.executors {
        let n = &e.name;
        add(
            "executor",
            n,
            vec![
                format!("$JS.API.INFO"),
                format!("$JS.API.STREAM.INFO.KV_{}", crate::store::HALT_BUCKET),
                format!("$JS.API.DIRECT.GET.KV_{}.>", crate::store::HALT_BUCKET),
                format!("$JS.API.STREAM.INFO.KV_CONCORD_FENCING_{n}"),
                format!("$JS.API.STREAM.CREATE.KV_CONCORD_FENCING_{n}"),
                format!("$JS.API.DIRECT.GET.KV_CONCORD_FENCING_{n}.>"),
                format!("$KV.CONCORD_FENCING_{n}.>"),
                format!("{}.member.*", s.exec(n)),
            ],
            vec![s.exec(n), format!("{}.member.*", s.exec(n)), format!("_INBOX_{n}.>")],
            true,
        );
    }
    let mut conf = String::from("# generated by `concord nats-config`: one nkey user per identity.\n");
    if sync_always {
        conf.push_str("jetstream { sync_interval: always }\n");
    }
    conf.push_str("authorization {\n  users = [\n");
    conf.push_str(&blocks.join(",\n"));
    conf.push_str("\n  ]\n}\n");
    Ok((users, conf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_identity_gets_its_own_subjects_only() {
        let file: AgentsFile = toml::from_str(
            r#"
            [[agents]]
            name = "deploy"
            [[operators]]
            name = "alice"
            [[executors]]
            name = "db"
            "#,
        )
        .unwrap();
        let (users, conf) = generate(&file, true).unwrap();
        assert_eq!(users.len(), 4);
        assert!(conf.contains("\"concord.v1.default.intent.deploy\""));
        assert!(conf.contains("\"_INBOX_deploy.>\""));
        assert!(conf.contains("\"concord.v1.default.notify.deploy\""));
        // The agent's world replica: it sends sync state on its own `sync`
        // and reads only its own `world`.
        assert!(conf.contains("\"concord.v1.default.sync.deploy\""));
        assert!(conf.contains("\"concord.v1.default.world.deploy\""));
        assert!(!conf.contains("world.*") && !conf.contains("world.>") && !conf.contains("sync.*"));
        assert!(conf.contains("\"concord.v1.default.ctl.alice\""));
        // An executor's members ask each other about their claims.
        assert!(conf.contains("\"concord.v1.default.exec.db.member.*\""));
        assert!(conf.contains("sync_interval: always"));
        assert!(!conf.contains("intent.alice"));
        let bad: AgentsFile = toml::from_str("[[agents]]\nname = \"a.b\"\n").unwrap();
        assert!(generate(&bad, false).unwrap_err().to_string().starts_with("agents:"));
    }
}
