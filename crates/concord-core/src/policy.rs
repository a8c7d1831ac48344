//! Policy: per-agent autonomy and allowlists, the built-in invariants'
//! settings, and user rules in CEL. Parsed from TOML, compiled once.

use std::collections::BTreeMap;
use std::sync::Arc;

use concord_proto::{StepKind, Verdict};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

/// Longest CEL expression a rule or figure may have, in bytes.
pub const CEL_EXPR_BYTES_MAX: usize = 4096;

/// Why a policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The TOML does not parse or does not fit the policy's shape.
    #[error("policy: {0}")]
    Parse(String),
    /// A path glob does not compile.
    #[error("policy: rule `{rule}`: glob `{glob}`: {detail}")]
    Glob {
        /// The rule.
        rule: String,
        /// The glob.
        glob: String,
        /// What is wrong.
        detail: String,
    },
    /// A CEL expression does not compile.
    #[error("policy: rule `{rule}`: CEL `{expr}`: {detail}")]
    Cel {
        /// The rule.
        rule: String,
        /// The expression.
        expr: String,
        /// What is wrong.
        detail: String,
    },
    /// A setting is out of range or inconsistent.
    #[error("policy: rule `{rule}`: {detail}")]
    Invalid {
        /// The rule.
        rule: String,
        /// What is wrong.
        detail: String,
    },
}

/// What a rule's failure leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A human decides.
    NeedsApproval,
    /// Refused.
    Reject,
}

impl Outcome {
    /// As a verdict.
    pub fn verdict(self) -> Verdict {
        match self {
            Outcome::NeedsApproval => Verdict::NeedsApproval,
            Outcome::Reject => Verdict::Reject,
        }
    }
}

/// How much an agent may do alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Autonomy {
    /// May only report observations: every plan is rejected.
    Observe,
    /// Every plan waits for a human (read-only plus review queue).
    Propose,
    /// Plans within policy are admitted.
    Bounded,
}

impl Autonomy {
    /// The wire name.
    pub fn name(self) -> &'static str {
        match self {
            Autonomy::Observe => "observe",
            Autonomy::Propose => "propose",
            Autonomy::Bounded => "bounded",
        }
    }
}

/// One allowlist entry: these kinds on paths matching these globs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// Step kinds.
    pub kinds: Vec<StepKind>,
    /// Path globs (`*` within a segment, `**` across segments).
    pub paths: Vec<String>,
}

/// An agent's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Autonomy level.
    pub autonomy: Autonomy,
    /// If present, every step (and every compensation step) must match an entry.
    #[serde(default)]
    pub allow: Option<Vec<AllowEntry>>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        // An agent nobody configured gets a human in the loop.
        AgentConfig {
            autonomy: Autonomy::Propose,
            allow: None,
        }
    }
}

/// Paths plus an outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathsRule {
    /// Path globs the rule watches.
    pub paths: Vec<String>,
    /// What failure leads to.
    pub outcome: Outcome,
}

/// An outcome only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutcomeRule {
    /// What failure leads to.
    pub outcome: Outcome,
}

/// Network rule settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Paths holding network rule lists.
    pub paths: Vec<String>,
    /// What a widening leads to.
    pub outcome: Outcome,
    /// What a failed or missing preflight leads to.
    pub preflight_outcome: Outcome,
}

/// A protected prefix.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectedConfig {
    /// Rule id, e.g. `protected.auth`.
    pub id: String,
    /// Path globs nothing may change.
    pub paths: Vec<String>,
    /// What a change leads to.
    pub outcome: Outcome,
}

/// Allowlisted deploy artifacts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArtifactsConfig {
    /// Artifact globs, e.g. `registry/*:v[0-9]*`.
    pub allow: Vec<String>,
    /// What an unlisted artifact leads to.
    pub outcome: Outcome,
}

/// A numeric ceiling with two thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CeilingConfig {
    /// Rule id.
    pub id: String,
    /// Path globs.
    pub paths: Vec<String>,
    /// Above this a human decides.
    pub approve_above: Option<f64>,
    /// Above this the plan is rejected.
    pub reject_above: Option<f64>,
}

/// A per-step rate-of-change limit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateConfig {
    /// Rule id.
    pub id: String,
    /// Path globs.
    pub paths: Vec<String>,
    /// Largest allowed after/before ratio in one step (e.g. 2.0).
    pub max_factor: f64,
    /// What a larger step leads to.
    pub outcome: Outcome,
}

/// A user rule in CEL.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CelConfig {
    /// Rule id.
    pub id: String,
    /// For people.
    #[serde(default)]
    pub description: String,
    /// Path globs the expression reads; only these are bound in `before` and `after`.
    pub reads: Vec<String>,
    /// A CEL expression that must be `true`.
    pub expr: String,
    /// What `false` (or an error) leads to.
    pub outcome: Outcome,
    /// Named CEL expressions whose values the report shows.
    #[serde(default)]
    pub figures: BTreeMap<String, String>,
}

/// The built-in invariants' settings and the user rules.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RulesConfig {
    /// `permissions.no_increase`.
    #[serde(default = "default_permissions")]
    pub permissions: PathsRule,
    /// `network.no_widen` and `network.preflight`.
    #[serde(default = "default_network")]
    pub network: NetworkConfig,
    /// `delete.confirmed`.
    #[serde(default = "reject")]
    pub delete: OutcomeRule,
    /// `agent.allowlist`.
    #[serde(default = "reject")]
    pub allowlist: OutcomeRule,
    /// `plan.assumptions`.
    #[serde(default = "reject")]
    pub assumptions: OutcomeRule,
    /// `replan.scope_expansion`.
    #[serde(default = "needs_approval")]
    pub scope_expansion: OutcomeRule,
    /// `deploy.artifacts`.
    #[serde(default)]
    pub artifacts: Option<ArtifactsConfig>,
    /// Protected prefixes.
    #[serde(default)]
    pub protected: Vec<ProtectedConfig>,
    /// Numeric ceilings.
    #[serde(default)]
    pub ceiling: Vec<CeilingConfig>,
    /// Rate-of-change limits.
    #[serde(default)]
    pub rate: Vec<RateConfig>,
    /// User rules.
    #[serde(default)]
    pub cel: Vec<CelConfig>,
    /// How many distinct operators must approve plans touching some paths.
    #[serde(default)]
    pub approvals: Vec<ApprovalsConfig>,
    /// Budgets: sums of products under a fraction of a limit (native coupling rules).
    #[serde(default)]
    pub budget: Vec<crate::budget::BudgetConfig>,
    /// Cumulative drift limits (compounding over a window).
    #[serde(default)]
    pub drift: Vec<DriftConfig>,
    /// Remediation that may mask another agent's recent change.
    #[serde(default)]
    pub masking: Option<MaskingConfig>,
    /// Remediation loops: the circuit breaker.
    #[serde(default, rename = "loop")]
    pub loops: Option<LoopConfig>,
}

/// Plans touching these paths need this many distinct approvers (e.g. two under `auth/`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// Path globs.
    pub paths: Vec<String>,
    /// Distinct operators required (at least 1).
    pub approvers: u32,
}

/// Cumulative drift: the change of a numeric path against its value at the
/// start of a sliding window. Many small steps that together exceed the
/// limit are caught at the step that crosses it (salami slicing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftConfig {
    /// Rule id, e.g. `drift.pool_size`.
    pub id: String,
    /// Path globs.
    pub paths: Vec<String>,
    /// The window, in milliseconds (e.g. 24 h).
    pub window_ms: u64,
    /// Largest allowed ratio of the new value to the value at the window's start.
    pub max_factor: f64,
    /// What crossing it leads to.
    pub outcome: Outcome,
}

/// A remediation (scale up, a raised numeric setting, a restart) on a
/// service or its declared dependency soon after another agent deployed there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskingConfig {
    /// How long after a deploy a remediation is suspect, in milliseconds.
    pub window_ms: u64,
    /// What the finding leads to.
    pub outcome: Outcome,
}

/// The same agent applying the same kind of step to the same path more than
/// `max_repeats` times in a window trips a breaker that halts that agent on
/// that path until an operator resumes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoopConfig {
    /// The window, in milliseconds.
    pub window_ms: u64,
    /// Most repeats allowed in the window.
    pub max_repeats: u32,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            permissions: default_permissions(),
            network: default_network(),
            delete: reject(),
            allowlist: reject(),
            assumptions: reject(),
            scope_expansion: needs_approval(),
            artifacts: None,
            protected: Vec::new(),
            ceiling: Vec::new(),
            rate: Vec::new(),
            cel: Vec::new(),
            approvals: Vec::new(),
            budget: Vec::new(),
            drift: Vec::new(),
            masking: None,
            loops: None,
        }
    }
}

fn default_permissions() -> PathsRule {
    PathsRule {
        paths: vec!["iam/**".into(), "**/grants".into()],
        outcome: Outcome::Reject,
    }
}
fn default_network() -> NetworkConfig {
    NetworkConfig {
        paths: vec!["**/ingress".into(), "**/egress".into()],
        outcome: Outcome::Reject,
        preflight_outcome: Outcome::Reject,
    }
}
fn reject() -> OutcomeRule {
    OutcomeRule {
        outcome: Outcome::Reject,
    }
}
fn needs_approval() -> OutcomeRule {
    OutcomeRule {
        outcome: Outcome::NeedsApproval,
    }
}

/// The policy file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Settings for agents not listed under `agents`.
    #[serde(default)]
    pub defaults: AgentConfig,
    /// Per-agent settings.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// Rules.
    #[serde(default)]
    pub rules: RulesConfig,
}

/// A set of path globs, with the literal prefixes used to find candidates
/// without scanning the whole world.
#[derive(Clone, Debug)]
pub struct Globs {
    set: GlobSet,
    /// The globs made only of literal segments and whole-segment `*`
    /// (`svc/*/pool_size`), matched segment by segment; `complex` holds the
    /// others (`**`, `?`, classes, alternatives, `*` inside a segment), left
    /// to the glob set. Most rules' globs are simple, and a regex match per
    /// path cost more than the rest of evaluating the rule.
    simple: Vec<Vec<Segment>>,
    complex: Option<GlobSet>,
    /// Per glob: the literal text a match must start with and end with (a
    /// necessary condition, checked before the glob set: most paths a rule
    /// is asked about fail it on their first or last bytes).
    bounds: Vec<(String, String)>,
    /// Literal text each glob starts with, deduplicated (`""` means the whole world).
    pub prefixes: Vec<String>,
    /// The globs as written.
    pub patterns: Vec<String>,
}

impl Globs {
    /// Compiles globs; `*` stays within a segment, `**` crosses segments.
    pub fn new(rule: &str, patterns: &[String]) -> Result<Globs, PolicyError> {
        let mut b = GlobSetBuilder::new();
        let mut complex: Vec<Glob> = Vec::new();
        let mut simple = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut bounds: Vec<(String, String)> = Vec::new();
        for p in patterns {
            let g = glob(rule, p)?;
            match simple_segments(p) {
                Some(segs) => simple.push(segs),
                None => complex.push(g.clone()),
            }
            b.add(g);
            bounds.push(literal_bounds(p));
            let lit: String = p
                .chars()
                .take_while(|c| !matches!(c, '*' | '?' | '[' | '{' | '\\'))
                .collect();
            prefixes.push(lit);
        }
        prefixes.sort();
        // A prefix covered by a shorter one adds nothing.
        let mut kept: Vec<String> = Vec::new();
        for p in prefixes {
            if !kept.iter().any(|k| p.starts_with(k.as_str())) {
                kept.push(p);
            }
        }
        let set = b.build().map_err(|e| PolicyError::Glob {
            rule: rule.to_string(),
            glob: patterns.join(", "),
            detail: e.to_string(),
        })?;
        let complex = if complex.is_empty() {
            None
        } else {
            let mut b = GlobSetBuilder::new();
            for g in complex {
                b.add(g);
            }
            Some(b.build().map_err(|e| PolicyError::Glob {
                rule: rule.to_string(),
                glob: patterns.join(", "),
                detail: e.to_string(),
            })?)
        };
        Ok(Globs {
            set,
            simple,
            complex,
            bounds,
            prefixes: kept,
            patterns: patterns.to_vec(),
        })
    }

    /// Whether any key of `map` matches a glob: one ordered scan per literal prefix.
    pub(crate) fn any_key<V>(&self, map: &BTreeMap<concord_proto::ResourcePath, V>) -> bool {
        self.prefixes
            .iter()
            .any(|prefix| crate::world::scan_prefix(map, prefix).any(|(p, _)| self.matches(p.as_str())))
    }

    /// Whether `text` matches any glob.
    pub fn matches(&self, text: &str) -> bool {
        self.may_match(text)
            && (self.simple.iter().any(|segs| segments_match(segs, text))
                || self.complex.as_ref().is_some_and(|set| set.is_match(text)))
    }

    /// The first glob `text` matches, as written.
    pub fn first_match(&self, text: &str) -> Option<&str> {
        if !self.may_match(text) {
            return None;
        }
        self.set.matches(text).first().map(|&i| self.patterns[i].as_str())
    }

    /// Whether some glob's literal head and tail fit `text`: false means no
    /// glob matches it.
    fn may_match(&self, text: &str) -> bool {
        self.bounds
            .iter()
            .any(|(head, tail)| text.starts_with(head.as_str()) && text.ends_with(tail.as_str()))
    }
}

/// The literal text before a glob's first special character and after its
/// last, without a `/` next to the special part (`svc/**` also matches
/// `svc`, `**/grants` also matches `grants`). Every match starts with the
/// first and ends with the second.
fn literal_bounds(pattern: &str) -> (String, String) {
    match (pattern.find(glob_special), pattern.rfind(glob_special)) {
        (Some(first), Some(last)) => (
            pattern[..first].trim_end_matches('/').to_string(),
            pattern[last + 1..].trim_start_matches('/').to_string(),
        ),
        // No special character: the glob is its own text.
        _ => (pattern.to_string(), pattern.to_string()),
    }
}

/// A character with a meaning in a glob.
fn glob_special(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\')
}

/// One segment of a simple glob.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Segment {
    /// Exactly this text.
    Literal(String),
    /// `*`: any one segment.
    Any,
}

/// A glob's segments, if each is literal text or exactly `*`; `None` for
/// globs that need the glob engine.
pub(crate) fn simple_segments(pattern: &str) -> Option<Vec<Segment>> {
    pattern
        .split('/')
        .map(|seg| match seg {
            "*" => Some(Segment::Any),
            "" => None,
            s if s.contains(glob_special) => None,
            s => Some(Segment::Literal(s.to_string())),
        })
        .collect()
}

/// Whether `text` has as many segments as `segs` and each fits: what the
/// glob engine answers for a simple glob (`*` does not cross `/`).
pub(crate) fn segments_match(segs: &[Segment], text: &str) -> bool {
    let mut rest = Some(text);
    for seg in segs {
        let Some(t) = rest else { return false };
        // This segment of the text, and what follows its separator.
        let (part, next) = match t.as_bytes().iter().position(|&b| b == b'/') {
            Some(i) => (&t[..i], Some(&t[i + 1..])),
            None => (t, None),
        };
        if let Segment::Literal(l) = seg
            && l != part
        {
            return false;
        }
        rest = next;
    }
    rest.is_none()
}

fn glob(rule: &str, pattern: &str) -> Result<Glob, PolicyError> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| PolicyError::Glob {
            rule: rule.to_string(),
            glob: pattern.to_string(),
            detail: e.to_string(),
        })
}

/// A compiled agent entry.
#[derive(Clone, Debug)]
pub struct AgentRules {
    /// Autonomy level.
    pub autonomy: Autonomy,
    /// Allowlist: kinds and their path globs.
    pub allow: Option<Vec<(Vec<StepKind>, Globs)>>,
}

/// A compiled CEL rule.
#[derive(Debug)]
pub struct CelRule {
    /// The configuration.
    pub config: CelConfig,
    /// What it reads.
    pub reads: Globs,
    /// The compiled expression.
    pub program: cel::Program,
    /// Compiled figures, in name order.
    pub figures: Vec<(String, cel::Program)>,
    /// Whether the expression or a figure references `plan` or `agent` (then it is never skipped).
    pub reads_plan_or_agent: bool,
    /// Which variables the expression and figures reference: only those are bound.
    pub vars: CelVars,
    /// Results of its expression and figures remembered by what of the plan
    /// they read, for those that read neither `before` nor `after` and allow it.
    pub(crate) memo: Option<crate::celmemo::Memo>,
}

/// The variables a CEL rule references.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CelVars {
    /// `before`.
    pub before: bool,
    /// `after`.
    pub after: bool,
    /// `plan`.
    pub plan: bool,
    /// `agent`.
    pub agent: bool,
}

/// A compiled policy: what previews evaluate.
pub struct Policy {
    /// The configuration it was compiled from.
    pub config: PolicyConfig,
    /// BLAKE3 of the canonical JSON of `config`.
    pub hash: String,
    pub(crate) defaults: AgentRules,
    pub(crate) agents: BTreeMap<String, AgentRules>,
    pub(crate) permissions: Globs,
    pub(crate) network: Globs,
    pub(crate) protected: Vec<(ProtectedConfig, Globs)>,
    pub(crate) artifacts: Option<(ArtifactsConfig, Globs)>,
    pub(crate) ceilings: Vec<(CeilingConfig, Globs)>,
    pub(crate) rates: Vec<(RateConfig, Globs)>,
    pub(crate) cel: Vec<CelRule>,
    pub(crate) drifts: Vec<(DriftConfig, Globs)>,
    pub(crate) budgets: Vec<crate::budget::Budget>,
    pub(crate) approvals: Vec<(u32, Globs)>,
    pub(crate) env: Arc<cel::Env>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("hash", &self.hash)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Policy {
    /// Parses and compiles a TOML policy.
    pub fn from_toml_str(s: &str) -> Result<Policy, PolicyError> {
        let config: PolicyConfig = toml::from_str(s).map_err(|e| PolicyError::Parse(e.to_string()))?;
        Policy::compile(config)
    }

    /// Compiles a policy configuration.
    pub fn compile(config: PolicyConfig) -> Result<Policy, PolicyError> {
        let canonical = serde_json::to_vec(&config).map_err(|e| PolicyError::Parse(e.to_string()))?;
        let hash = blake3::hash(&canonical).to_hex().to_string();
        let agent = |name: &str, a: &AgentConfig| -> Result<AgentRules, PolicyError> {
            let allow = match &a.allow {
                None => None,
                Some(entries) => Some(
                    entries
                        .iter()
                        .map(|e| Ok((e.kinds.clone(), Globs::new(&format!("agents.{name}.allow"), &e.paths)?)))
                        .collect::<Result<Vec<_>, PolicyError>>()?,
                ),
            };
            Ok(AgentRules {
                autonomy: a.autonomy,
                allow,
            })
        };
        let r = &config.rules;
        let mut ids = std::collections::BTreeSet::new();
        let mut unique = |id: &str| -> Result<(), PolicyError> {
            if id.trim().is_empty() || !ids.insert(id.to_string()) {
                return Err(PolicyError::Invalid {
                    rule: id.to_string(),
                    detail: "rule ids must be non-empty and unique".into(),
                });
            }
            Ok(())
        };
        for c in &r.ceiling {
            unique(&c.id)?;
            if c.approve_above.is_none() && c.reject_above.is_none() {
                return Err(PolicyError::Invalid {
                    rule: c.id.clone(),
                    detail: "a ceiling needs `approve_above`, `reject_above`, or both".into(),
                });
            }
            if let (Some(a), Some(b)) = (c.approve_above, c.reject_above)
                && a > b
            {
                return Err(PolicyError::Invalid {
                    rule: c.id.clone(),
                    detail: format!("approve_above ({a}) is above reject_above ({b})"),
                });
            }
        }
        for c in &r.rate {
            unique(&c.id)?;
            if !(c.max_factor.is_finite() && c.max_factor >= 1.0) {
                return Err(PolicyError::Invalid {
                    rule: c.id.clone(),
                    detail: format!("max_factor must be a finite number >= 1, not {}", c.max_factor),
                });
            }
        }
        for c in &r.protected {
            unique(&c.id)?;
        }
        for c in &r.budget {
            unique(&c.id)?;
        }
        for c in &r.drift {
            unique(&c.id)?;
            if !(c.max_factor.is_finite() && c.max_factor >= 1.0) || c.window_ms == 0 {
                return Err(PolicyError::Invalid {
                    rule: c.id.clone(),
                    detail: "a drift limit needs max_factor >= 1 and a window_ms above 0".into(),
                });
            }
        }
        let env = Arc::new(crate::celx::env());
        let mut cel_rules = Vec::new();
        for c in &r.cel {
            unique(&c.id)?;
            let compile = |expr: &str| {
                if expr.len() > CEL_EXPR_BYTES_MAX {
                    return Err(PolicyError::Cel {
                        rule: c.id.clone(),
                        expr: expr.chars().take(40).collect::<String>() + "...",
                        detail: format!("expression is {} bytes; at most {CEL_EXPR_BYTES_MAX}", expr.len()),
                    });
                }
                let program = env.compile(expr).map_err(|e| PolicyError::Cel {
                    rule: c.id.clone(),
                    expr: expr.to_string(),
                    detail: e.to_string(),
                })?;
                if crate::celx::iterates_map_literal(program.expression()) {
                    return Err(PolicyError::Cel {
                        rule: c.id.clone(),
                        expr: expr.to_string(),
                        detail: "a macro may iterate a map literal, whose order differs from process to process \
                                 (previews would not replay); iterate a list, or `keys(..)` of the map, which is sorted"
                            .into(),
                    });
                }
                Ok(program)
            };
            let program = compile(&c.expr)?;
            let figures = c
                .figures
                .iter()
                .map(|(name, expr)| Ok((name.clone(), compile(expr)?)))
                .collect::<Result<Vec<_>, PolicyError>>()?;
            let programs: Vec<&cel::Program> = std::iter::once(&program)
                .chain(figures.iter().map(|(_, p)| p))
                .collect();
            let mut vars = CelVars::default();
            for p in &programs {
                let refs = p.references();
                vars.before |= refs.has_variable("before");
                vars.after |= refs.has_variable("after");
                vars.plan |= refs.has_variable("plan");
                vars.agent |= refs.has_variable("agent");
            }
            let reads_plan_or_agent = vars.plan || vars.agent;
            let memo = crate::celmemo::Memo::for_programs(programs);
            cel_rules.push(CelRule {
                config: c.clone(),
                reads: Globs::new(&c.id, &c.reads)?,
                program,
                figures,
                reads_plan_or_agent,
                vars,
                memo,
            });
        }
        Ok(Policy {
            hash,
            defaults: agent("defaults", &config.defaults)?,
            agents: config
                .agents
                .iter()
                .map(|(n, a)| Ok((n.clone(), agent(n, a)?)))
                .collect::<Result<_, PolicyError>>()?,
            permissions: Globs::new("permissions.no_increase", &r.permissions.paths)?,
            network: Globs::new("network.no_widen", &r.network.paths)?,
            protected: r
                .protected
                .iter()
                .map(|p| Ok((p.clone(), Globs::new(&p.id, &p.paths)?)))
                .collect::<Result<_, PolicyError>>()?,
            artifacts: match &r.artifacts {
                None => None,
                Some(a) => Some((a.clone(), Globs::new("deploy.artifacts", &a.allow)?)),
            },
            ceilings: r
                .ceiling
                .iter()
                .map(|c| Ok((c.clone(), Globs::new(&c.id, &c.paths)?)))
                .collect::<Result<_, PolicyError>>()?,
            rates: r
                .rate
                .iter()
                .map(|c| Ok((c.clone(), Globs::new(&c.id, &c.paths)?)))
                .collect::<Result<_, PolicyError>>()?,
            cel: cel_rules,
            approvals: r
                .approvals
                .iter()
                .map(|a| Ok((a.approvers.max(1), Globs::new("approvals", &a.paths)?)))
                .collect::<Result<_, PolicyError>>()?,
            budgets: r
                .budget
                .iter()
                .map(|c| crate::budget::Budget::new(c.clone()))
                .collect::<Result<_, PolicyError>>()?,
            drifts: r
                .drift
                .iter()
                .map(|c| Ok((c.clone(), Globs::new(&c.id, &c.paths)?)))
                .collect::<Result<_, PolicyError>>()?,
            env,
            config,
        })
    }

    /// How many distinct approvers a plan touching `paths` needs (at least 1).
    pub fn approvers_required<'a>(&self, paths: impl Iterator<Item = &'a concord_proto::ResourcePath>) -> u32 {
        let mut n = 1;
        for p in paths {
            for (k, g) in &self.approvals {
                if g.matches(p.as_str()) {
                    n = n.max(*k);
                }
            }
        }
        n
    }

    /// The settings that apply to `agent`.
    pub fn agent(&self, agent: &str) -> &AgentRules {
        self.agents.get(agent).unwrap_or(&self.defaults)
    }

    /// Number of rules the policy evaluates (built-ins plus configured ones).
    pub fn rule_count(&self) -> usize {
        // autonomy, allowlist, permissions, network widen, network preflight,
        // delete, assumptions, scope expansion, plan.applies (+ artifacts).
        9 + usize::from(self.artifacts.is_some())
            + self.protected.len()
            + self.ceilings.len()
            + self.rates.len()
            + self.budgets.len()
            + self.cel.len()
    }

    /// The compounding rules the coordinator applies besides: drift rules,
    /// the masking rule and the remediation-loop breaker, as configured.
    pub fn compounding_rule_count(&self) -> usize {
        self.drifts.len()
            + usize::from(self.config.rules.masking.is_some())
            + usize::from(self.config.rules.loops.is_some())
    }
}

#[cfg(test)]
mod glob_tests {
    use globset::GlobSetBuilder;
    use proptest::prelude::*;

    use super::{Globs, glob};

    /// A glob segment: literal, `*`, or something only the glob engine
    /// reads (`**`, `?`, a class, an alternative, `*` inside a segment).
    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[ab]{1,2}",
            3 => Just("*".to_string()),
            1 => Just("**".to_string()),
            1 => Just("a?".to_string()),
            1 => Just("[ab]".to_string()),
            1 => Just("{a,bb}".to_string()),
            1 => Just("a*".to_string()),
            1 => Just(String::new()),
        ]
    }

    fn text() -> impl Strategy<Value = String> {
        prop::collection::vec("[ab]{0,2}", 0..5).prop_map(|s| s.join("/"))
    }

    proptest! {
        /// Every glob set answers as the glob engine alone does, whether its
        /// globs take the segment path, the engine, or both.
        #[test]
        fn globs_match_as_the_glob_engine(
            patterns in prop::collection::vec(prop::collection::vec(segment(), 1..5).prop_map(|s| s.join("/")), 1..4),
            texts in prop::collection::vec(text(), 1..20),
        ) {
            let globs = Globs::new("r", &patterns).unwrap();
            let mut b = GlobSetBuilder::new();
            for p in &patterns {
                b.add(glob("r", p).unwrap());
            }
            let engine = b.build().unwrap();
            for t in &texts {
                prop_assert_eq!(globs.matches(t), engine.is_match(t), "{:?} against {:?}", t, patterns);
            }
        }
    }

    #[test]
    fn simple_globs_match_by_segment() {
        let g = Globs::new("r", &["svc/*/pool_size".to_string(), "db/primary/max".to_string()]).unwrap();
        assert!(g.matches("svc/api/pool_size"));
        assert!(g.matches("db/primary/max"));
        assert!(!g.matches("svc/api/x/pool_size"));
        assert!(!g.matches("svc/pool_size"));
        assert!(!g.matches("db/primary/max/x"));
        assert!(g.complex.is_none());
    }
}
