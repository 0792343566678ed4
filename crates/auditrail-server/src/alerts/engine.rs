//! Rule evaluation over the stream of events, in log order. Time is the events' own
//! `occurred_at`, so windows mean what happened, not when auditrail read it (and tests replay
//! a week of attacks in a second).

use super::rules::{Hours, Key, Kind, Rule, Severity};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, VecDeque};

/// What the rules read of one event.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub seq: u64,
    pub occurred_ms: i64,
    pub category: String,
    pub action: String,
    pub outcome: String,
    pub user: Option<String>,
    pub ip: Option<String>,
    pub device: Option<String>,
    pub source: Option<String>,
    pub project: Option<String>,
    /// A keyed token of the patient, never the identifier.
    pub patient: Option<String>,
    /// The numbers in `context` (a volume rule may sum one).
    pub numbers: Vec<(String, u64)>,
}

/// The fields of a stored event the rules read; everything else is skipped unparsed, so
/// following the log costs a fraction of a full JSON parse.
#[derive(serde::Deserialize)]
struct StoredFields<'a> {
    #[serde(borrow, default)]
    occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    recorded_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    category: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    actor: Option<ActorFields<'a>>,
    #[serde(borrow, default)]
    source: Option<SourceFields<'a>>,
    #[serde(borrow, default)]
    patient: Option<PatientFields<'a>>,
    #[serde(borrow, default)]
    project: Option<Cow<'a, str>>,
    #[serde(default)]
    context: Option<serde_json::Map<String, Value>>,
}

#[derive(serde::Deserialize)]
struct ActorFields<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ip: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_agent: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct SourceFields<'a> {
    #[serde(borrow, default)]
    system: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize)]
struct PatientFields<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

impl Observed {
    /// Reads a stored (canonical JSON) event, or `None` if it is not an event object.
    /// `patient_token` turns a patient identifier into the index's keyed token.
    pub fn from_stored(
        seq: u64,
        stored: &[u8],
        patient_token: impl Fn(&str) -> String,
    ) -> Option<Observed> {
        let f: StoredFields<'_> = serde_json::from_slice(stored).ok()?;
        let owned = |v: Option<Cow<'_, str>>| v.map(Cow::into_owned);
        let time =
            |t: &Option<Cow<'_, str>>| t.as_deref().and_then(auditrail_core::time::parse_rfc3339);
        let numbers = f
            .context
            .map(|c| {
                c.into_iter()
                    .filter_map(|(k, v)| {
                        let n = v.as_u64().or_else(|| v.as_str()?.parse().ok())?;
                        Some((k, n))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (user, ip, device) = match f.actor {
            Some(a) => (owned(a.user_id), owned(a.ip), owned(a.device_id.or(a.user_agent))),
            None => (None, None, None),
        };
        Some(Observed {
            seq,
            occurred_ms: time(&f.occurred_at).or_else(|| time(&f.recorded_at)).unwrap_or(0),
            category: owned(f.category).unwrap_or_default(),
            action: owned(f.action).unwrap_or_default(),
            outcome: owned(f.outcome).unwrap_or_default(),
            user,
            ip,
            device,
            source: f.source.and_then(|s| owned(s.system)),
            project: owned(f.project),
            patient: f.patient.and_then(|p| p.id).map(|p| patient_token(&p)),
            numbers,
        })
    }

    /// auditrail's own record of an alert, which rules never see (alerts must not feed on
    /// themselves).
    pub fn is_alert_record(&self) -> bool {
        self.category == auditrail_store::retention::REPOSITORY_CATEGORY
            && self.action.starts_with("alert.")
    }

    fn key(&self, key: Key) -> Option<String> {
        match key {
            Key::User => self.user.clone(),
            Key::Ip => self.ip.clone(),
            Key::Network => self.ip.as_deref().map(network),
            Key::Device => self.device.clone(),
            Key::Source => self.source.clone(),
            Key::Project => self.project.clone(),
            Key::Patient => self.patient.clone(),
        }
    }
}

/// An address's network: /24 for IPv4, /48 for IPv6; anything else as it is.
pub fn network(ip: &str) -> String {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(a)) => {
            let o = a.octets();
            format!("{}.{}.{}.0/24", o[0], o[1], o[2])
        }
        Ok(std::net::IpAddr::V6(a)) => {
            let s = a.segments();
            format!("{:x}:{:x}:{:x}::/48", s[0], s[1], s[2])
        }
        Err(_) => ip.to_string(),
    }
}

fn matches(rule: &Rule, e: &Observed) -> bool {
    let m = &rule.matcher;
    (m.actions.is_empty() || m.actions.iter().any(|p| super::rules::glob(p, &e.action)))
        && !m.not_actions.iter().any(|p| super::rules::glob(p, &e.action))
        && (m.categories.is_empty()
            || m.categories.iter().any(|c| c.eq_ignore_ascii_case(&e.category)))
        && m.outcome.as_deref().is_none_or(|o| o == e.outcome)
}

fn after_hours(h: &Hours, occurred_ms: i64) -> bool {
    let local_ms = occurred_ms + i64::from(h.utc_offset_minutes) * 60_000;
    let days = local_ms.div_euclid(86_400_000);
    let hour = (local_ms.rem_euclid(86_400_000) / 3_600_000) as u8;
    // 1970-01-01 was a Thursday: day 0 is weekday 3 counting from Monday = 0.
    let weekday = (days + 3).rem_euclid(7);
    let weekend = weekday >= 5 && !h.weekends_open;
    weekend || hour < h.start_hour || hour >= h.end_hour
}

/// A rule that fired on an event.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    pub rule: String,
    pub severity: Severity,
    /// The `group_by` value the alert is about (empty when the rule groups nothing).
    pub key: String,
    pub summary: String,
    /// The events that made it fire (the last ones of the window, at most 50).
    pub seqs: Vec<u64>,
    pub first_occurred_ms: i64,
    pub last_occurred_ms: i64,
}

/// Seqs kept per alert (the latest).
pub const SEQS_KEPT: usize = 50;
/// Attributes remembered per user for first-seen rules (oldest forgotten first).
const SEEN_PER_GROUP_MAX: usize = 64;

#[derive(Debug, Default)]
struct Window {
    /// (occurred_ms, seq, distinct value or amount)
    events: VecDeque<(i64, u64, Counted)>,
    distinct: HashMap<String, u32>,
    sum: u64,
}

#[derive(Debug, Clone)]
enum Counted {
    One,
    Value(String),
    Amount(u64),
}

impl Window {
    fn push(&mut self, at: i64, seq: u64, counted: Counted) {
        match &counted {
            Counted::Value(v) => *self.distinct.entry(v.clone()).or_default() += 1,
            Counted::Amount(n) => self.sum += n,
            Counted::One => self.sum += 1,
        }
        self.events.push_back((at, seq, counted));
    }

    fn expire(&mut self, before: i64) {
        while self.events.front().is_some_and(|e| e.0 < before) {
            let (_, _, counted) = self.events.pop_front().expect("checked");
            match counted {
                Counted::Value(v) => {
                    if let Some(n) = self.distinct.get_mut(&v) {
                        *n -= 1;
                        if *n == 0 {
                            self.distinct.remove(&v);
                        }
                    }
                }
                Counted::Amount(n) => self.sum -= n,
                Counted::One => self.sum -= 1,
            }
        }
    }

    fn measure(&self) -> u64 {
        if self.distinct.is_empty() { self.sum } else { self.distinct.len() as u64 }
    }
}

/// What first-seen rules remember: per rule, per group value, the attributes seen (kept
/// across restarts with the alert state).
pub type Seen = BTreeMap<String, BTreeMap<String, Vec<String>>>;

#[derive(Debug, Default)]
pub struct Engine {
    rules: Vec<Rule>,
    windows: HashMap<(String, String), Window>,
    pub seen: Seen,
    /// The newest `occurred_at` observed, to drop idle windows.
    newest_ms: i64,
    observed: u64,
}

impl Engine {
    pub fn new(rules: Vec<Rule>, seen: Seen) -> Engine {
        Engine { rules, seen, ..Engine::default() }
    }

    /// Replaces the rules; the windows of rules that changed start over.
    pub fn set_rules(&mut self, rules: Vec<Rule>) {
        let unchanged: Vec<String> = rules
            .iter()
            .filter(|r| self.rules.iter().any(|old| old == *r))
            .map(|r| r.name.clone())
            .collect();
        self.windows.retain(|(rule, _), _| unchanged.contains(rule));
        self.rules = rules;
    }

    /// Feeds one event; returns the rules it made fire.
    pub fn observe(&mut self, e: &Observed) -> Vec<Trigger> {
        self.newest_ms = self.newest_ms.max(e.occurred_ms);
        self.observed += 1;
        if self.observed.is_multiple_of(65_536) {
            self.drop_idle_windows();
        }
        let mut out = Vec::new();
        for rule in &self.rules {
            if !rule.enabled || !matches(rule, e) {
                continue;
            }
            let group = rule.group_by.and_then(|k| e.key(k));
            if rule.group_by.is_some() && group.is_none() {
                continue;
            }
            let group = group.unwrap_or_default();
            let about = if group.is_empty() { String::new() } else { format!(" ({group})") };
            let single = |summary: String| Trigger {
                rule: rule.name.clone(),
                severity: rule.severity,
                key: group.clone(),
                summary,
                seqs: vec![e.seq],
                first_occurred_ms: e.occurred_ms,
                last_occurred_ms: e.occurred_ms,
            };
            match rule.kind {
                Kind::Condition => {
                    if rule.outside_hours.as_ref().is_none_or(|h| after_hours(h, e.occurred_ms)) {
                        out.push(single(format!("{}: {}{about}", rule.description, e.action)));
                    }
                }
                Kind::FirstSeen => {
                    let Some(value) = rule.attribute.and_then(|k| e.key(k)) else { continue };
                    let known = self
                        .seen
                        .entry(rule.name.clone())
                        .or_default()
                        .entry(group.clone())
                        .or_default();
                    if known.contains(&value) {
                        continue;
                    }
                    let first_ever = known.is_empty();
                    known.push(value.clone());
                    if known.len() > SEEN_PER_GROUP_MAX {
                        known.remove(0);
                    }
                    if !first_ever {
                        out.push(single(format!("{}{about}: {value}", rule.description)));
                    }
                }
                Kind::Threshold | Kind::Volume => {
                    let counted = match (rule.kind, rule.distinct, &rule.sum) {
                        (Kind::Volume, Some(k), _) => match e.key(k) {
                            Some(v) => Counted::Value(v),
                            None => continue,
                        },
                        (Kind::Volume, None, Some(field)) => Counted::Amount(
                            e.numbers.iter().find(|(k, _)| k == field).map_or(1, |(_, n)| *n),
                        ),
                        _ => Counted::One,
                    };
                    let window =
                        self.windows.entry((rule.name.clone(), group.clone())).or_default();
                    window.push(e.occurred_ms, e.seq, counted);
                    window.expire(e.occurred_ms - rule.window_secs as i64 * 1000);
                    let measure = window.measure();
                    if measure >= rule.threshold {
                        let seqs: Vec<u64> =
                            window.events.iter().rev().take(SEQS_KEPT).map(|e| e.1).rev().collect();
                        out.push(Trigger {
                            rule: rule.name.clone(),
                            severity: rule.severity,
                            key: group.clone(),
                            summary: format!(
                                "{}{about}: {measure} within {} s",
                                rule.description, rule.window_secs
                            ),
                            seqs,
                            first_occurred_ms: window.events.front().map_or(e.occurred_ms, |f| f.0),
                            last_occurred_ms: e.occurred_ms,
                        });
                        // The next alert for this group needs a full window of its own.
                        *window = Window::default();
                    }
                }
            }
        }
        out
    }

    fn drop_idle_windows(&mut self) {
        let rules = &self.rules;
        let newest = self.newest_ms;
        self.windows.retain(|(name, _), w| {
            let span =
                rules.iter().find(|r| &r.name == name).map_or(0, |r| r.window_secs as i64 * 1000);
            w.events.back().is_some_and(|last| last.0 >= newest - span)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::rules::builtin_rules;
    use super::*;

    const MONDAY_NOON: i64 = 1_796_040_000_000; // 2026-11-30T12:00:00Z

    fn ev(
        seq: u64,
        at: i64,
        category: &str,
        action: &str,
        outcome: &str,
        user: &str,
        ip: &str,
    ) -> Observed {
        Observed {
            seq,
            occurred_ms: at,
            category: category.into(),
            action: action.into(),
            outcome: outcome.into(),
            user: Some(user.into()),
            ip: Some(ip.into()),
            ..Observed::default()
        }
    }

    fn fired(engine: &mut Engine, events: &[Observed]) -> Vec<String> {
        events
            .iter()
            .flat_map(|e| engine.observe(e))
            .map(|t| format!("{}:{}", t.rule, t.key))
            .collect()
    }

    #[test]
    fn stored_events_are_read_for_the_fields_rules_use() {
        let stored = br#"{"action":"data.export","actor":{"ip":"10.1.2.3","roles":["x"],"user_agent":"curl","user_id":"u\u00e9"},"category":"export","context":{"events":"1200","note":"n","rows":7},"entities":[{"id":"1","type":"t"}],"occurred_at":"2026-11-30T12:00:00Z","outcome":"success","patient":{"id":"MRN1"},"project":"p","recorded_at":"2026-11-30T12:00:01Z","seq":9,"source":{"system":"ehr"}}"#;
        let e = Observed::from_stored(9, stored, |p| format!("token-of-{p}")).unwrap();
        assert_eq!(e.occurred_ms, MONDAY_NOON);
        assert_eq!(
            (e.category.as_str(), e.action.as_str(), e.outcome.as_str()),
            ("export", "data.export", "success")
        );
        assert_eq!(e.user.as_deref(), Some("u\u{e9}"));
        assert_eq!((e.ip.as_deref(), e.device.as_deref()), (Some("10.1.2.3"), Some("curl")));
        assert_eq!((e.source.as_deref(), e.project.as_deref()), (Some("ehr"), Some("p")));
        assert_eq!(e.patient.as_deref(), Some("token-of-MRN1"));
        assert_eq!(e.numbers, [("events".to_string(), 1200), ("rows".to_string(), 7)]);
        assert!(!e.is_alert_record());
        let own = br#"{"action":"alert.raised","category":"repository","recorded_at":"2026-11-30T12:00:01Z"}"#;
        let e = Observed::from_stored(10, own, |p| p.to_string()).unwrap();
        assert!(e.is_alert_record());
        assert_eq!(e.occurred_ms, MONDAY_NOON + 1000, "recorded_at stands in for occurred_at");
        assert!(Observed::from_stored(11, b"[1]", |p| p.to_string()).is_none());
    }

    #[test]
    fn monday_noon_is_a_weekday_inside_hours() {
        let h = Hours { start_hour: 7, end_hour: 19, utc_offset_minutes: 0, weekends_open: false };
        assert!(!after_hours(&h, MONDAY_NOON));
        assert!(after_hours(&h, MONDAY_NOON + 8 * 3_600_000)); // 20:00
        assert!(after_hours(&h, MONDAY_NOON - 2 * 86_400_000)); // Saturday noon
        let eastern = Hours { utc_offset_minutes: -300, ..h };
        assert!(!after_hours(&eastern, MONDAY_NOON + 6 * 3_600_000)); // 13:00 in New York
    }

    #[test]
    fn threshold_fires_once_per_full_window() {
        let mut engine = Engine::new(builtin_rules(), Seen::default());
        let fails: Vec<Observed> = (0..12)
            .map(|i| {
                ev(
                    i,
                    MONDAY_NOON + i as i64 * 1000,
                    "authentication",
                    "login.failure",
                    "failure",
                    "alice",
                    "10.0.0.1",
                )
            })
            .collect();
        assert_eq!(fired(&mut engine, &fails), ["failed-logins:alice", "failed-logins:alice"]);
        // Spread over more than the window: never five within ten minutes.
        let mut engine = Engine::new(builtin_rules(), Seen::default());
        let slow: Vec<Observed> = (0..12)
            .map(|i| {
                ev(
                    i,
                    MONDAY_NOON + i as i64 * 180_000,
                    "authentication",
                    "login.failure",
                    "failure",
                    "bob",
                    "10.0.0.1",
                )
            })
            .collect();
        assert!(fired(&mut engine, &slow).is_empty());
    }

    #[test]
    fn first_seen_learns_the_first_network_silently() {
        let mut engine = Engine::new(builtin_rules(), Seen::default());
        let read =
            |seq, ip| ev(seq, MONDAY_NOON, "phi_access", "patient.read", "success", "carol", ip);
        assert!(fired(&mut engine, &[read(1, "10.1.2.3"), read(2, "10.1.2.77")]).is_empty());
        assert_eq!(fired(&mut engine, &[read(3, "203.0.113.9")]), ["phi-access-new-network:carol"]);
        assert!(fired(&mut engine, &[read(4, "203.0.113.10")]).is_empty());
    }

    #[test]
    fn volume_counts_distinct_values() {
        let mut engine = Engine::new(builtin_rules(), Seen::default());
        let mut events = Vec::new();
        for i in 0..250u64 {
            let mut e = ev(
                i,
                MONDAY_NOON + i as i64 * 1000,
                "phi_access",
                "patient.read",
                "success",
                "dave",
                "10.0.0.5",
            );
            e.patient = Some(format!("p{}", i % 150)); // only 150 different patients
            events.push(e);
        }
        assert!(fired(&mut engine, &events).is_empty());
        let mut e = ev(
            999,
            MONDAY_NOON + 300_000,
            "phi_access",
            "patient.read",
            "success",
            "dave",
            "10.0.0.5",
        );
        let mut more = Vec::new();
        for i in 0..60u64 {
            e.seq = 1000 + i;
            e.patient = Some(format!("q{i}"));
            more.push(e.clone());
        }
        assert_eq!(fired(&mut engine, &more), ["bulk-patient-access:dave"]);
    }

    #[test]
    fn reports_count_towards_bulk_export_like_exports() {
        let mut engine = Engine::new(builtin_rules(), Seen::default());
        let handed_out = |seq: u64, action: &str, events: u64| {
            let mut e = ev(
                seq,
                MONDAY_NOON + seq as i64 * 60_000,
                "repository",
                action,
                "success",
                "erin",
                "10.0.0.9",
            );
            e.numbers = vec![("events".into(), events)];
            e
        };
        let quiet = [handed_out(1, "report.run", 4_000), handed_out(2, "events.export", 4_000)];
        assert!(fired(&mut engine, &quiet).is_empty());
        assert_eq!(fired(&mut engine, &[handed_out(3, "report.run", 2_500)]), ["bulk-export:erin"]);
    }
}
