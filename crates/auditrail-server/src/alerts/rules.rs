//! Alert rules: what a rule says (config file and API share one shape), the built-in set, and
//! how rules from the three places are layered.

use serde::{Deserialize, Serialize};

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

impl Severity {
    pub const ALL: [Severity; 4] =
        [Severity::Low, Severity::Medium, Severity::High, Severity::Critical];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Low => "low",
            Severity::Medium => "medium",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `threshold` events matching within `window_secs`, per `group_by` value.
    Threshold,
    /// `threshold` distinct `distinct` values (or a `sum` of a context number) within
    /// `window_secs`, per `group_by` value: patients opened, accounts tried, events exported.
    Volume,
    /// A `group_by` value (a user) seen with an `attribute` (a network, a device) it was never
    /// seen with before. The first attribute of a new user is learnt silently.
    FirstSeen,
    /// Any single matching event (optionally only outside business `hours`).
    Condition,
}

/// A value of an event that rules group by or count: read from the canonical fields, which
/// FHIR AuditEvents are mapped onto too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Key {
    /// `actor.user_id`
    User,
    /// `actor.ip`
    Ip,
    /// `actor.ip` cut to its network: /24 for IPv4, /48 for IPv6.
    Network,
    /// `actor.device_id`, else `actor.user_agent`.
    Device,
    /// `source.system`
    Source,
    Project,
    /// The patient, as a keyed token (rules never hold patient identifiers).
    Patient,
}

/// Which events a rule looks at. Every list given must match; an empty list matches all.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Matcher {
    /// Action patterns; `*` stands for any run of characters (`*login*`, `patient.*`).
    pub actions: Vec<String>,
    /// Action patterns left out even when `actions` match (auditrail's read traces are
    /// `read.<path>`: reading the security status changes nothing).
    pub not_actions: Vec<String>,
    pub categories: Vec<String>,
    /// `success` or `failure`.
    pub outcome: Option<String>,
}

/// Business hours: events outside them (and, unless `weekends_open`, on Saturday and Sunday)
/// are "after hours".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Hours {
    /// First hour inside business hours (0-23), local time.
    pub start_hour: u8,
    /// First hour after business hours (1-24), local time.
    pub end_hour: u8,
    /// The local time's offset from UTC, in minutes (`-300` for US Eastern standard time).
    #[serde(default)]
    pub utc_offset_minutes: i32,
    #[serde(default)]
    pub weekends_open: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Lowercase letters, digits and dashes; unique.
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub kind: Kind,
    pub severity: Severity,
    #[serde(default = "enabled")]
    pub enabled: bool,
    #[serde(rename = "match", default)]
    pub matcher: Matcher,
    /// What one alert is about (threshold, volume, first_seen; for condition, what duplicates
    /// are merged by).
    #[serde(default)]
    pub group_by: Option<Key>,
    /// Events (threshold) or distinct values / sum (volume) that raise the alert.
    #[serde(default)]
    pub threshold: u64,
    #[serde(default)]
    pub window_secs: u64,
    /// Volume: the value counted distinctly.
    #[serde(default)]
    pub distinct: Option<Key>,
    /// Volume: a numeric `context` field summed instead (an event without it counts 1).
    #[serde(default)]
    pub sum: Option<String>,
    /// First-seen: the attribute remembered per `group_by` value.
    #[serde(default)]
    pub attribute: Option<Key>,
    /// Condition: only events outside these hours.
    #[serde(default)]
    pub outside_hours: Option<Hours>,
}

fn enabled() -> bool {
    true
}

impl Rule {
    /// Checks that the rule says everything its kind needs.
    pub fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !name_ok {
            return Err(format!(
                "rule name {:?}: 1-64 lowercase letters, digits and dashes",
                self.name
            ));
        }
        let fail = |what: &str| Err(format!("rule {}: {what}", self.name));
        if self.matcher.outcome.as_deref().is_some_and(|o| o != "success" && o != "failure") {
            return fail("match.outcome must be success or failure");
        }
        if self.matcher.actions.iter().any(|a| a.is_empty() || a.len() > 128) {
            return fail("match.actions entries must be 1-128 characters");
        }
        match self.kind {
            Kind::Threshold | Kind::Volume => {
                if self.group_by.is_none() {
                    return fail("needs group_by");
                }
                if self.threshold == 0 || self.window_secs == 0 {
                    return fail("needs threshold and window_secs of at least 1");
                }
                if self.kind == Kind::Volume && self.distinct.is_some() == self.sum.is_some() {
                    return fail("a volume rule needs exactly one of distinct or sum");
                }
            }
            Kind::FirstSeen => {
                if self.group_by.is_none() || self.attribute.is_none() {
                    return fail("needs group_by and attribute");
                }
            }
            Kind::Condition => {}
        }
        if let Some(h) = &self.outside_hours {
            if self.kind != Kind::Condition {
                return fail("outside_hours applies to condition rules only");
            }
            if h.start_hour > 23 || h.end_hour == 0 || h.end_hour > 24 || h.start_hour >= h.end_hour
            {
                return fail("outside_hours needs 0 <= start_hour < end_hour <= 24");
            }
            if h.utc_offset_minutes.abs() > 14 * 60 {
                return fail("outside_hours.utc_offset_minutes must be within +-840");
            }
        }
        Ok(())
    }
}

/// Where an effective rule comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Builtin,
    Config,
    Api,
}

/// The rules in force: the built-in set (unless turned off), replaced by name by the config
/// file's, then by the API's; names the API removed are left out.
pub fn effective(
    builtin: bool,
    config: &[Rule],
    api: &[Rule],
    removed: &[String],
) -> Vec<(Rule, Origin)> {
    let mut out: Vec<(Rule, Origin)> = Vec::new();
    let layers = [
        (if builtin { builtin_rules() } else { Vec::new() }, Origin::Builtin),
        (config.to_vec(), Origin::Config),
        (api.to_vec(), Origin::Api),
    ];
    for (rules, origin) in layers {
        for rule in rules {
            match out.iter_mut().find(|(r, _)| r.name == rule.name) {
                Some(slot) => *slot = (rule, origin),
                None => out.push((rule, origin)),
            }
        }
    }
    out.retain(|(r, _)| !removed.contains(&r.name));
    out
}

fn rule(name: &str, kind: Kind, severity: Severity, description: &str) -> Rule {
    Rule {
        name: name.into(),
        description: description.into(),
        kind,
        severity,
        enabled: true,
        matcher: Matcher::default(),
        group_by: None,
        threshold: 0,
        window_secs: 0,
        distinct: None,
        sum: None,
        attribute: None,
        outside_hours: None,
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Login attempts, by applications (`login.failure`, `user.login`) and by auditrail itself
/// (`auth.login`).
const LOGIN_ACTIONS: &[&str] = &["*login*", "*logon*", "*signin*", "*sign-in*", "*authenticate*"];
/// Access to patient data.
const PHI_CATEGORIES: &[&str] = &["phi_access", "phi_modify"];

/// The defaults that cover what security teams ask for first. Each can be replaced by name
/// (config file or API) or removed through the API.
pub fn builtin_rules() -> Vec<Rule> {
    let mut out = Vec::new();

    let mut r = rule(
        "failed-logins",
        Kind::Threshold,
        Severity::High,
        "Brute force: 5 failed logins for one account within 10 minutes.",
    );
    r.matcher.actions = strings(LOGIN_ACTIONS);
    r.matcher.outcome = Some("failure".into());
    (r.group_by, r.threshold, r.window_secs) = (Some(Key::User), 5, 600);
    out.push(r);

    let mut r = rule(
        "password-spraying",
        Kind::Volume,
        Severity::High,
        "Password spraying: failed logins for 10 different accounts from one address within 10 minutes.",
    );
    r.matcher.actions = strings(LOGIN_ACTIONS);
    r.matcher.outcome = Some("failure".into());
    (r.group_by, r.distinct, r.threshold, r.window_secs) =
        (Some(Key::Ip), Some(Key::User), 10, 600);
    out.push(r);

    let mut r = rule(
        "phi-access-new-network",
        Kind::FirstSeen,
        Severity::Medium,
        "A user reached patient data from a network they were never seen on before.",
    );
    r.matcher.categories = strings(PHI_CATEGORIES);
    (r.group_by, r.attribute) = (Some(Key::User), Some(Key::Network));
    out.push(r);

    let mut r = rule(
        "mfa-disabled",
        Kind::Condition,
        Severity::High,
        "Multi-factor authentication was turned off or reset for an account.",
    );
    r.matcher.actions = strings(&["*mfa*remove*", "*mfa*disable*", "*mfa*reset*", "*mfa*delete*"]);
    r.matcher.outcome = Some("success".into());
    r.group_by = Some(Key::User);
    out.push(r);

    let mut r = rule(
        "security-settings-changed",
        Kind::Condition,
        Severity::Medium,
        "A security setting was changed (governance, roles, security configuration, alert rules).",
    );
    r.matcher.actions =
        strings(&["settings.governance.*", "*security*", "role.*", "alerts.rule.*", "api_key.*"]);
    r.matcher.not_actions = strings(&["read.*"]);
    r.matcher.outcome = Some("success".into());
    r.group_by = Some(Key::User);
    out.push(r);

    let mut r = rule(
        "break-glass-used",
        Kind::Condition,
        Severity::High,
        "Emergency access (break-glass) was used.",
    );
    r.matcher.actions = strings(&["*break-glass*", "*break_glass*", "*breakglass*", "emergency.*"]);
    r.group_by = Some(Key::User);
    out.push(r);

    let mut r = rule(
        "integrity-check-failed",
        Kind::Condition,
        Severity::Critical,
        "A verification of the log found a problem.",
    );
    r.matcher.actions = strings(&["integrity.verify*"]);
    r.matcher.outcome = Some("failure".into());
    out.push(r);

    let mut r = rule(
        "bulk-patient-access",
        Kind::Volume,
        Severity::High,
        "Possible exfiltration: one user opened 200 different patients within 10 minutes.",
    );
    r.matcher.categories = strings(PHI_CATEGORIES);
    r.matcher.outcome = Some("success".into());
    (r.group_by, r.distinct, r.threshold, r.window_secs) =
        (Some(Key::User), Some(Key::Patient), 200, 600);
    out.push(r);

    let mut r = rule(
        "bulk-export",
        Kind::Volume,
        Severity::High,
        "Possible exfiltration: one user exported 10,000 events or records within an hour.",
    );
    // Exports, evidence bundles (`events.export`) and compliance reports (`report.run`): each
    // hands events out of the repository, and each records how many in `context.events`.
    r.matcher.actions = strings(&["*export*", "report.run"]);
    r.matcher.outcome = Some("success".into());
    (r.group_by, r.sum, r.threshold, r.window_secs) =
        (Some(Key::User), Some("events".into()), 10_000, 3600);
    out.push(r);

    let mut r = rule(
        "after-hours-phi-access",
        Kind::Condition,
        Severity::Low,
        "Patient data reached outside business hours (07:00-19:00 UTC on weekdays unless configured).",
    );
    r.matcher.categories = strings(PHI_CATEGORIES);
    r.matcher.outcome = Some("success".into());
    r.group_by = Some(Key::User);
    r.outside_hours =
        Some(Hours { start_hour: 7, end_hour: 19, utc_offset_minutes: 0, weekends_open: false });
    out.push(r);
    out
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("*login*", "auth.login", true),
            ("*login*", "login.failure", true),
            ("*login*", "logout", false),
            ("patient.*", "patient.read", true),
            ("patient.*", "patients.read", false),
            ("*mfa*remove*", "user.mfa.remove", true),
            ("*mfa*remove*", "user.mfa.enrol", false),
            ("a*b*a", "aba", true),
            ("a*a", "a", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(p, t), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn built_in_rules_are_valid_and_layering_replaces_by_name() {
        for r in builtin_rules() {
            r.check().unwrap();
        }
        let mut mine = builtin_rules()[0].clone();
        mine.threshold = 3;
        let rules = effective(true, &[mine.clone()], &[], &["mfa-disabled".into()]);
        let found = rules.iter().find(|(r, _)| r.name == "failed-logins").unwrap();
        assert_eq!((found.0.threshold, found.1), (3, Origin::Config));
        assert!(rules.iter().all(|(r, _)| r.name != "mfa-disabled"));
        assert!(effective(false, &[], &[], &[]).is_empty());
    }

    #[test]
    fn incomplete_rules_are_refused() {
        let mut r = builtin_rules()[0].clone();
        r.group_by = None;
        assert!(r.check().unwrap_err().contains("group_by"));
        let mut r = builtin_rules()[1].clone();
        r.sum = Some("events".into());
        assert!(r.check().unwrap_err().contains("exactly one"));
        let mut r = builtin_rules()[0].clone();
        r.name = "Bad Name".into();
        assert!(r.check().is_err());
    }
}
