//! Alerting: rules evaluated continuously on new events, alerts with a lifecycle, webhooks.
//!
//! The engine is a follower of the log, like the index: it reads every durable event once,
//! in seq order, from a cursor saved with its state, so it sees FHIR and native events,
//! imports and auditrail's own records alike. Each alert raised, acknowledged or resolved is
//! recorded in the log as a `repository` event (`alert.raised`, `alert.acknowledged`,
//! `alert.resolved`), and the engine skips those events so alerts never feed on themselves.
//! An alert is deduplicated: while one for the same rule and subject is not resolved, a new
//! firing adds to it instead of raising another.
//!
//! State (alerts, the cursor, rules changed through the API, what first-seen rules learnt) is
//! one file sealed under the master key (`alerts/state.sealed`). Windows of threshold and
//! volume rules live in memory: after a restart they start empty.

pub mod engine;
pub mod http;
pub mod rules;
pub mod webhook;

use crate::AppState;
use crate::error::ApiError;
use auditrail_core::time::format_millis;
use auditrail_store::keys::MasterKeys;
use engine::{Engine, Observed, Seen, Trigger};
use rules::{Origin, Rule, Severity};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// `[alerts]` in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertsConfig {
    /// Evaluate rules at all.
    pub enabled: bool,
    /// Start from the built-in rules (`GET /api/v1/security/alert-rules` lists them).
    pub builtin_rules: bool,
    /// Rules added, or built-in ones replaced by name (`[[alerts.rules]]`).
    pub rules: Vec<Rule>,
    /// Where alerts are delivered (`[[alerts.webhooks]]`).
    pub webhooks: Vec<WebhookConfig>,
    /// The first wait before retrying a failed delivery; it doubles up to `retry_max_ms`.
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    /// Deliveries tried this many times are given up (and stay visible as failed).
    pub attempts_max: u32,
}

impl Default for AlertsConfig {
    fn default() -> AlertsConfig {
        AlertsConfig {
            enabled: true,
            builtin_rules: true,
            rules: Vec::new(),
            webhooks: Vec::new(),
            retry_initial_ms: 1_000,
            retry_max_ms: 300_000,
            attempts_max: 10,
        }
    }
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Signs every body: `X-Auditrail-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
    pub secret: String,
    /// Alerts below this severity are not sent.
    #[serde(default = "lowest")]
    pub min_severity: Severity,
}

fn lowest() -> Severity {
    Severity::Low
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("name", &self.name)
            .field("url", &self.url)
            .field("min_severity", &self.min_severity)
            .finish_non_exhaustive()
    }
}

impl AlertsConfig {
    pub fn check(&self) -> Result<(), String> {
        for r in &self.rules {
            r.check().map_err(|e| format!("[[alerts.rules]]: {e}"))?;
        }
        for w in &self.webhooks {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!(
                    "[[alerts.webhooks]] {}: url must be http:// or https://",
                    w.name
                ));
            }
            if w.secret.len() < 16 {
                return Err(format!(
                    "[[alerts.webhooks]] {}: secret must be at least 16 characters",
                    w.name
                ));
            }
        }
        if self.retry_initial_ms == 0 || self.retry_initial_ms > self.retry_max_ms {
            return Err("alerts: need 0 < retry_initial_ms <= retry_max_ms".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Open,
    Acknowledged,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Open => "open",
            Status::Acknowledged => "acknowledged",
            Status::Resolved => "resolved",
        }
    }

    pub fn parse(s: &str) -> Option<Status> {
        Some(match s {
            "open" => Status::Open,
            "acknowledged" => Status::Acknowledged,
            "resolved" => Status::Resolved,
            _ => return None,
        })
    }
}

/// Who moved an alert on, when, and why.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transition {
    pub by: String,
    pub at: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Delivery {
    pub webhook: String,
    /// `pending`, `delivered` or `failed` (given up after `attempts_max`).
    pub state: String,
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    /// Milliseconds since the epoch of the next attempt, while pending.
    #[serde(default)]
    pub next_attempt_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Alert {
    pub id: String,
    pub rule: String,
    pub severity: Severity,
    pub status: Status,
    /// What the alert is about: the rule's `group_by` value (a user, an address).
    pub subject: String,
    pub summary: String,
    /// Times the rule fired for this subject while the alert was unresolved.
    pub occurrences: u64,
    /// Seqs of the events behind it (the latest 50).
    pub seqs: Vec<u64>,
    pub first_occurred_at: String,
    pub last_occurred_at: String,
    pub raised_at: String,
    pub updated_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledged: Option<Transition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Transition>,
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
}

/// What is saved.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// The next seq the engine reads.
    cursor: u64,
    alerts: Vec<Alert>,
    api_rules: Vec<Rule>,
    removed: Vec<String>,
    seen: Seen,
}

struct Inner {
    saved: Saved,
    engine: Engine,
    dirty: bool,
    /// Where each unresolved alert is in `saved.alerts`, by (rule, subject): a firing finds
    /// the alert it adds to without a scan.
    unresolved: HashMap<(String, String), usize>,
}

fn unresolved_positions(alerts: &[Alert]) -> HashMap<(String, String), usize> {
    let unresolved = alerts.iter().enumerate().filter(|(_, a)| a.status != Status::Resolved);
    unresolved.map(|(i, a)| ((a.rule.clone(), a.subject.clone()), i)).collect()
}

pub const STATE: auditrail_store::keys::SealedFile = auditrail_store::keys::ALERTS;

pub struct Alerts {
    config: AlertsConfig,
    path: PathBuf,
    keys: MasterKeys,
    inner: Mutex<Inner>,
    /// Set when the rules changed through the API, for the engine thread.
    rules_changed: AtomicBool,
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts").field("path", &self.path).finish_non_exhaustive()
    }
}

/// Most alerts kept; the oldest resolved ones go first.
const ALERTS_KEPT_MAX: usize = 10_000;

impl Alerts {
    /// Loads the state, or starts one whose cursor is `log_end` (a server that gains alerting
    /// does not replay years of history as new alerts).
    pub fn open(
        data: &std::path::Path,
        keys: MasterKeys,
        config: AlertsConfig,
        log_end: u64,
    ) -> Result<Alerts, String> {
        let path = data.join(STATE.path);
        let saved = match std::fs::read(&path) {
            Ok(sealed) => {
                let plain = keys
                    .open_blob(STATE.purpose, &sealed)
                    .map_err(|e| format!("{}: {e} (wrong master key?)", path.display()))?;
                serde_json::from_slice(&plain)
                    .map_err(|e| format!("{}: not an alert state: {e}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Saved { cursor: log_end, ..Saved::default() }
            }
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let alerts = Alerts {
            path,
            keys,
            inner: Mutex::new(Inner {
                unresolved: unresolved_positions(&saved.alerts),
                saved,
                engine: Engine::default(),
                dirty: true,
            }),
            rules_changed: AtomicBool::new(false),
            config,
        };
        {
            let mut inner = alerts.lock();
            let rules = alerts.rules_in_force(&inner.saved);
            let seen = std::mem::take(&mut inner.saved.seen);
            inner.engine = Engine::new(rules, seen);
        }
        Ok(alerts)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config(&self) -> &AlertsConfig {
        &self.config
    }

    fn rules_in_force(&self, saved: &Saved) -> Vec<Rule> {
        self.rules(saved).into_iter().map(|(r, _)| r).collect()
    }

    fn rules(&self, saved: &Saved) -> Vec<(Rule, Origin)> {
        rules::effective(
            self.config.builtin_rules,
            &self.config.rules,
            &saved.api_rules,
            &saved.removed,
        )
    }

    pub fn effective_rules(&self) -> Vec<(Rule, Origin)> {
        self.rules(&self.lock().saved)
    }

    pub fn cursor(&self) -> u64 {
        self.lock().saved.cursor
    }

    /// Writes the state if it changed (sealed, atomically, durably).
    pub fn save(&self) -> Result<(), String> {
        let plain = {
            let mut inner = self.lock();
            if !inner.dirty {
                return Ok(());
            }
            inner.dirty = false;
            let Inner { saved, engine, .. } = &mut *inner;
            // The engine owns what first-seen rules learnt; it is saved along.
            saved.seen = std::mem::take(&mut engine.seen);
            let plain = serde_json::to_vec(&*saved).map_err(|e| e.to_string());
            engine.seen = std::mem::take(&mut saved.seen);
            plain?
        };
        crate::auth::accounts::write_private_file(
            &self.path,
            &self.keys.seal_blob(STATE.purpose, &plain),
        )
    }

    /// Feeds events `[cursor, ...)` read from the log; returns the alerts to record as raised.
    fn observe(&self, events: &[Observed], next_cursor: u64) -> Vec<Alert> {
        let mut inner = self.lock();
        if self.rules_changed.swap(false, Ordering::SeqCst) {
            let rules = self.rules_in_force(&inner.saved);
            inner.engine.set_rules(rules);
        }
        let mut raised = Vec::new();
        for e in events {
            for trigger in inner.engine.observe(e) {
                if let Some(alert) = self.merge_or_raise(&mut inner, trigger) {
                    raised.push(alert);
                }
            }
        }
        // Every event read moves the cursor; what it changed (alerts, first-seen) goes with it.
        if next_cursor != inner.saved.cursor {
            inner.dirty = true;
        }
        inner.saved.cursor = next_cursor;
        raised
    }

    fn merge_or_raise(&self, inner: &mut Inner, t: Trigger) -> Option<Alert> {
        let severity = t.severity;
        let now = format_millis(crate::now_ms());
        let Inner { saved, unresolved, .. } = inner;
        if let Some(&i) = unresolved.get(&(t.rule.clone(), t.key.clone())) {
            let a = &mut saved.alerts[i];
            a.occurrences += 1;
            a.summary = t.summary;
            a.seqs.extend(t.seqs);
            let excess = a.seqs.len().saturating_sub(engine::SEQS_KEPT);
            a.seqs.drain(..excess);
            a.last_occurred_at = format_millis(t.last_occurred_ms);
            a.updated_at = now;
            return None;
        }
        let deliveries = self
            .config
            .webhooks
            .iter()
            .filter(|w| severity >= w.min_severity)
            .map(|w| Delivery {
                webhook: w.name.clone(),
                state: "pending".into(),
                attempts: 0,
                last_error: None,
                delivered_at: None,
                next_attempt_ms: 0,
            })
            .collect();
        let alert = Alert {
            id: uuid::Uuid::now_v7().to_string(),
            rule: t.rule,
            severity,
            status: Status::Open,
            subject: t.key,
            summary: t.summary,
            occurrences: 1,
            seqs: t.seqs,
            first_occurred_at: format_millis(t.first_occurred_ms),
            last_occurred_at: format_millis(t.last_occurred_ms),
            raised_at: now.clone(),
            updated_at: now,
            acknowledged: None,
            resolved: None,
            deliveries,
        };
        unresolved.insert((alert.rule.clone(), alert.subject.clone()), saved.alerts.len());
        saved.alerts.push(alert.clone());
        if saved.alerts.len() > ALERTS_KEPT_MAX
            && let Some(i) = saved.alerts.iter().position(|a| a.status == Status::Resolved)
        {
            saved.alerts.remove(i);
            *unresolved = unresolved_positions(&saved.alerts);
        }
        Some(alert)
    }

    /// Alerts matching the filters, newest first.
    pub fn list(&self, filter: impl Fn(&Alert) -> bool) -> Vec<Alert> {
        self.lock().saved.alerts.iter().rev().filter(|a| filter(a)).cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<Alert> {
        self.lock().saved.alerts.iter().find(|a| a.id == id).cloned()
    }

    /// Moves an alert to `to` (acknowledged or resolved). Returns it before and after.
    pub fn transition(
        &self,
        id: &str,
        to: Status,
        by: &str,
        note: String,
    ) -> Result<(Alert, Alert), ApiError> {
        let mut inner = self.lock();
        let alert = inner
            .saved
            .alerts
            .iter_mut()
            .find(|a| a.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no alert {id}")))?;
        let allowed = match to {
            Status::Acknowledged => alert.status == Status::Open,
            Status::Resolved => alert.status != Status::Resolved,
            Status::Open => false,
        };
        if !allowed {
            return Err(ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "alert_state",
                format!("the alert is {:?}; it cannot become {:?}", alert.status, to)
                    .to_lowercase(),
            ));
        }
        let before = alert.clone();
        let now = format_millis(crate::now_ms());
        let t = Transition { by: by.to_string(), at: now.clone(), note };
        match to {
            Status::Acknowledged => alert.acknowledged = Some(t),
            _ => alert.resolved = Some(t),
        }
        alert.status = to;
        alert.updated_at = now;
        let after = alert.clone();
        if to == Status::Resolved {
            inner.unresolved.remove(&(after.rule.clone(), after.subject.clone()));
        }
        inner.dirty = true;
        Ok((before, after))
    }

    /// Adds or replaces a rule through the API. Returns the rule it replaced, if any.
    pub fn put_rule(&self, rule: Rule) -> Option<Rule> {
        let mut inner = self.lock();
        let before =
            self.rules(&inner.saved).into_iter().find(|(r, _)| r.name == rule.name).map(|(r, _)| r);
        inner.saved.removed.retain(|n| n != &rule.name);
        inner.saved.api_rules.retain(|r| r.name != rule.name);
        inner.saved.api_rules.push(rule);
        inner.dirty = true;
        self.rules_changed.store(true, Ordering::SeqCst);
        before
    }

    /// Removes a rule in force, whatever its origin. Returns it.
    pub fn remove_rule(&self, name: &str) -> Option<Rule> {
        let mut inner = self.lock();
        let before =
            self.rules(&inner.saved).into_iter().find(|(r, _)| r.name == name).map(|(r, _)| r)?;
        inner.saved.api_rules.retain(|r| r.name != name);
        inner.saved.removed.push(name.to_string());
        inner.dirty = true;
        self.rules_changed.store(true, Ordering::SeqCst);
        Some(before)
    }

    /// Open and acknowledged alerts by severity.
    pub fn unresolved_by_severity(&self) -> Value {
        let inner = self.lock();
        let mut counts = serde_json::Map::new();
        for s in Severity::ALL {
            let n = inner
                .saved
                .alerts
                .iter()
                .filter(|a| a.severity == s && a.status != Status::Resolved)
                .count();
            counts.insert(s.as_str().into(), json!(n));
        }
        Value::Object(counts)
    }

    /// Deliveries due now: (alert, webhook index).
    fn due_deliveries(&self, now_ms: i64) -> Vec<(Alert, usize)> {
        let inner = self.lock();
        let mut out = Vec::new();
        for a in &inner.saved.alerts {
            for d in &a.deliveries {
                if d.state == "pending"
                    && d.next_attempt_ms <= now_ms
                    && let Some(i) = self.config.webhooks.iter().position(|w| w.name == d.webhook)
                {
                    out.push((a.clone(), i));
                }
            }
        }
        out
    }

    fn delivered(&self, alert_id: &str, webhook: &str, result: Result<(), String>, now_ms: i64) {
        let mut inner = self.lock();
        let Some(d) = inner
            .saved
            .alerts
            .iter_mut()
            .find(|a| a.id == alert_id)
            .and_then(|a| a.deliveries.iter_mut().find(|d| d.webhook == webhook))
        else {
            return;
        };
        d.attempts += 1;
        match result {
            Ok(()) => {
                d.state = "delivered".into();
                d.delivered_at = Some(format_millis(now_ms));
                d.last_error = None;
            }
            Err(e) => {
                d.last_error = Some(e);
                if d.attempts >= self.config.attempts_max {
                    d.state = "failed".into();
                } else {
                    let exp = d.attempts.saturating_sub(1).min(30);
                    let wait = self
                        .config
                        .retry_initial_ms
                        .saturating_mul(1 << exp)
                        .min(self.config.retry_max_ms);
                    d.next_attempt_ms = now_ms + wait as i64;
                }
            }
        }
        inner.dirty = true;
    }

    /// Per webhook: delivered, pending, failed, and the last error.
    pub fn webhook_status(&self) -> Vec<Value> {
        let inner = self.lock();
        self.config
            .webhooks
            .iter()
            .map(|w| {
                let mut counts = [0u64; 3];
                let mut last_error = None;
                for d in inner.saved.alerts.iter().flat_map(|a| &a.deliveries).filter(|d| d.webhook == w.name) {
                    match d.state.as_str() {
                        "delivered" => counts[0] += 1,
                        "pending" => counts[1] += 1,
                        _ => counts[2] += 1,
                    }
                    if d.last_error.is_some() {
                        last_error.clone_from(&d.last_error);
                    }
                }
                json!({"name": w.name, "delivered": counts[0], "pending": counts[1], "failed": counts[2], "last_error": last_error})
            })
            .collect()
    }
}

/// The actor of what auditrail records on its own behalf.
fn system_actor() -> Value {
    json!({"user_id": "auditrail", "name": "auditrail"})
}

/// Records an alert's raise in the log.
fn record_raised(state: &AppState, alert: &Alert) -> Result<(), ApiError> {
    let seqs: Vec<String> = alert.seqs.iter().map(u64::to_string).collect();
    state.auth.record(
        &system_actor(),
        "alert.raised",
        "success",
        json!({
            "alert_id": alert.id,
            "rule": alert.rule,
            "severity": alert.severity.as_str(),
            "subject": alert.subject,
            "summary": alert.summary,
            "seqs": seqs.join(","),
        }),
        vec![],
    )
}

/// Events the index follower decoded, `(seq, stored bytes)` in seq order, passed on so the
/// engine need not decrypt and decompress the same blocks again.
pub type Decoded = Vec<(u64, Vec<u8>)>;

/// How many decoded batches may wait for the engine; past that the index follower drops them
/// (it never waits for alerting) and the engine reads those events from the log itself.
pub const DECODED_IN_FLIGHT: usize = 32;

/// How long the engine waits for the index follower before reading what the index has read
/// from the log itself: at start (its cursor behind the index's) or after dropped batches.
const FEED_PATIENCE: std::time::Duration = std::time::Duration::from_millis(200);

/// How long the engine waits for the index follower before reading past it: the index is
/// stuck or rebuilding. Longer than the index's usual lag, so the engine does not get ahead
/// of it (and decode every block again) while it merely flushes.
const INDEX_STUCK: std::time::Duration = std::time::Duration::from_secs(2);

/// Where the engine reads events: the batches the index follower passes on, and the log for
/// whatever they do not cover. Both in seq order from `cursor`.
struct Source<'a> {
    state: &'a AppState,
    decoded: std::sync::mpsc::Receiver<Decoded>,
    cursor: u64,
    /// Positioned at `cursor` when the log was last read; dropped when a batch moves on.
    tail: Option<auditrail_store::tail::LogTail>,
    last_fed: std::time::Instant,
}

impl Source<'_> {
    fn observe(&self, seq: u64, stored: &[u8], out: &mut Vec<Observed>) {
        let token = |p: &str| hex(&self.state.index.patients().term(p));
        if let Some(e) = Observed::from_stored(seq, stored, token)
            && !e.is_alert_record()
        {
            out.push(e);
        }
    }

    /// Reads durable events from the log, from the cursor up to `end`, 64 blocks at most.
    fn read_log(&mut self, end: u64, out: &mut Vec<Observed>) -> Result<u64, String> {
        let store = &self.state.store;
        let cursor = self.cursor;
        let tail = self.tail.get_or_insert_with(|| store.tail(cursor));
        // Retention purged what lies ahead: nothing there to evaluate.
        if tail.skip_purged(&store.purged()).is_some() {
            self.cursor = tail.next_seq();
            return Ok(1);
        }
        let end = end.min(store.stages().sequenced);
        let mut observed = Vec::new();
        let n = tail
            .read(end, 64, |_, seq, record| {
                observed.push((seq, record.canonical.to_vec()));
                Ok(())
            })
            .map_err(|e| e.to_string())?;
        self.cursor = tail.next_seq();
        for (seq, bytes) in &observed {
            self.observe(*seq, bytes, out);
        }
        Ok(n)
    }

    /// The next events to evaluate; how many seqs the cursor moved (0: nothing new).
    fn next(&mut self, out: &mut Vec<Observed>) -> Result<u64, String> {
        use std::sync::mpsc::RecvTimeoutError;
        let before = self.cursor;
        let received = self.decoded.recv_timeout(std::time::Duration::from_millis(20));
        // Events evaluated already (an index being rebuilt replays the log from the start) do
        // not count as being fed.
        let useful = received.as_ref().ok().and_then(|batch| {
            let (first, last) = (batch.first()?.0, batch.last()?.0);
            (last >= self.cursor).then_some((first, last + 1))
        });
        match (received, useful) {
            (Ok(batch), Some((first, end))) => {
                self.last_fed = std::time::Instant::now();
                // Batches were dropped while the engine was behind: the gap first, from the log.
                while self.cursor < first {
                    if self.read_log(first, out)? == 0 {
                        return Err(format!(
                            "cannot read seqs {}..{first} from the log",
                            self.cursor
                        ));
                    }
                }
                for (seq, bytes) in batch.iter().filter(|e| e.0 >= self.cursor) {
                    self.observe(*seq, bytes, out);
                }
                self.cursor = end;
                self.tail = None;
            }
            // The index follower has stopped: the log only.
            (Err(RecvTimeoutError::Disconnected), _) => {
                if self.read_log(u64::MAX, out)? == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
            }
            // Nothing useful passed on for a while. Behind the index (at start, or batches were
            // dropped): catch up to it from the log. Not behind, and still nothing after a
            // longer wait (the index is stuck, or rebuilding from the start): go on from the
            // log without it.
            _ => {
                let waited = self.last_fed.elapsed();
                let indexed = self.state.index.indexed_through();
                if self.cursor < indexed && waited >= FEED_PATIENCE {
                    self.read_log(indexed, out)?;
                } else if waited >= INDEX_STUCK {
                    self.read_log(u64::MAX, out)?;
                }
            }
        }
        Ok(self.cursor - before)
    }
}

/// The engine's loop: take what is durable past the cursor (from the index follower, else from
/// the log), evaluate, raise, save.
pub fn follow(state: &AppState, stop: &AtomicBool, decoded: std::sync::mpsc::Receiver<Decoded>) {
    let alerts = &state.alerts;
    let mut source = Source {
        state,
        decoded,
        cursor: alerts.cursor(),
        tail: None,
        last_fed: std::time::Instant::now(),
    };
    let mut last_save = std::time::Instant::now();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut events = Vec::new();
        match source.next(&mut events) {
            Ok(moved) => {
                if moved > 0 {
                    let raised = alerts.observe(&events, source.cursor);
                    for alert in &raised {
                        if let Err(e) = record_raised(state, alert) {
                            eprintln!(
                                "auditrail: alerts: cannot record alert {}: {}",
                                alert.id, e.message
                            );
                        }
                    }
                }
                if last_save.elapsed() >= std::time::Duration::from_millis(500) || stopping {
                    if let Err(e) = alerts.save() {
                        eprintln!("auditrail: alerts: {e}");
                    }
                    last_save = std::time::Instant::now();
                }
                // Stopping: once everything durable has been evaluated.
                if stopping && moved == 0 && source.cursor >= state.store.stages().sequenced {
                    break;
                }
            }
            Err(e) => {
                eprintln!("auditrail: alerts: cannot read the log: {e}");
                source.tail = None;
                if stopping {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    }
    if let Err(e) = alerts.save() {
        eprintln!("auditrail: alerts: {e}");
    }
}

use auditrail_core::hex::encode as hex;
