//! What each forwarder reports: progress, lag and failures, for `/metrics` and the JSON
//! status (`GET /api/v1/security/status`, section `forwarding`).

use crate::limits::{ERROR_BYTES_MAX, FAILURES_KEPT};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use utoipa::ToSchema;

/// The `forwarding` section of the security status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwardingStatus {
    /// The configured forwarders (none when forwarding is off).
    pub forwarders: Vec<ForwarderStatus>,
}

/// One forwarder's progress and failures.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForwarderStatus {
    /// `elasticsearch` or `syslog`.
    pub name: String,
    /// Where it sends (URL or host:port; never credentials).
    pub destination: String,
    /// `ok` (delivering or caught up), `retrying` (the last attempt failed; backing off) or
    /// `stopped`.
    pub state: String,
    /// The next seq to send: every event before it has been delivered (or permanently refused).
    pub next_seq: u64,
    /// Events durable in the log (`sequenced`).
    pub log_end: u64,
    /// Durable events not yet delivered.
    pub lag_events: u64,
    /// Age of the oldest undelivered event (from its `recorded_at`), 0 when caught up.
    pub lag_seconds: f64,
    /// Events delivered since start.
    pub sent_total: u64,
    /// Events the destination refused for good since start (skipped; see `recent_failures`).
    pub failed_total: u64,
    /// Failed attempts (outages, 429/5xx items) since start; each was retried.
    pub retries_total: u64,
    /// The newest error, if any attempt has failed since start.
    pub last_error: Option<String>,
    /// When it happened (RFC 3339).
    pub last_error_at: Option<String>,
    /// The newest permanently refused events, newest last.
    pub recent_failures: Vec<FailedEvent>,
}

/// An event the destination refused for good.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FailedEvent {
    pub seq: u64,
    pub id: String,
    /// The destination's status code for the item.
    pub status: u16,
    /// The destination's reason (truncated).
    pub reason: String,
}

/// The live counters one forwarder updates and the status reads.
#[derive(Debug)]
pub struct Progress {
    pub name: &'static str,
    pub destination: String,
    pub next_seq: AtomicU64,
    pub log_end: AtomicU64,
    /// `recorded_at` (Unix ms) of the oldest undelivered event, 0 when caught up or unknown.
    pub oldest_pending_ms: AtomicU64,
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    /// 0 ok, 1 retrying, 2 stopped.
    pub state: AtomicU64,
    errors: Mutex<Errors>,
}

#[derive(Debug, Default)]
struct Errors {
    last: Option<(String, u64)>,
    recent: VecDeque<FailedEvent>,
}

pub(crate) const STATE_OK: u64 = 0;
pub(crate) const STATE_RETRYING: u64 = 1;
pub(crate) const STATE_STOPPED: u64 = 2;

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

impl Progress {
    pub fn new(name: &'static str, destination: String, next_seq: u64) -> Progress {
        Progress {
            name,
            destination,
            next_seq: AtomicU64::new(next_seq),
            log_end: AtomicU64::new(0),
            oldest_pending_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            state: AtomicU64::new(STATE_OK),
            errors: Mutex::new(Errors::default()),
        }
    }

    fn errors(&self) -> std::sync::MutexGuard<'_, Errors> {
        self.errors.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A failed attempt that will be retried.
    pub fn retrying(&self, error: &str) {
        eprintln!("auditrail: forward {}: {error}; retrying", self.name);
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.state.store(STATE_RETRYING, Ordering::Relaxed);
        self.errors().last = Some((truncate(error.to_string(), ERROR_BYTES_MAX), now_ms()));
    }

    /// Events refused for good: logged with their seqs, counted, remembered.
    pub fn refused(&self, failed: &[FailedEvent]) {
        if failed.is_empty() {
            return;
        }
        let mut errors = self.errors();
        for f in failed {
            eprintln!(
                "auditrail: forward {}: seq {} (id {:?}) refused with {}: {}; skipped",
                self.name, f.seq, f.id, f.status, f.reason
            );
            if errors.recent.len() == FAILURES_KEPT {
                errors.recent.pop_front();
            }
            let mut f = f.clone();
            f.reason = truncate(f.reason, ERROR_BYTES_MAX);
            errors.recent.push_back(f);
        }
        let last = failed.last().expect("not empty");
        errors.last = Some((
            format!("seq {} refused with {}: {}", last.seq, last.status, last.reason),
            now_ms(),
        ));
        self.failed.fetch_add(failed.len() as u64, Ordering::Relaxed);
    }

    pub fn status(&self) -> ForwarderStatus {
        let next_seq = self.next_seq.load(Ordering::Relaxed);
        let log_end = self.log_end.load(Ordering::Relaxed).max(next_seq);
        let lag_events = log_end - next_seq;
        let oldest = self.oldest_pending_ms.load(Ordering::Relaxed);
        let lag_seconds = if lag_events == 0 || oldest == 0 {
            0.0
        } else {
            now_ms().saturating_sub(oldest) as f64 / 1000.0
        };
        let errors = self.errors();
        ForwarderStatus {
            name: self.name.to_string(),
            destination: self.destination.clone(),
            state: match self.state.load(Ordering::Relaxed) {
                STATE_OK => "ok",
                STATE_RETRYING => "retrying",
                _ => "stopped",
            }
            .to_string(),
            next_seq,
            log_end,
            lag_events,
            lag_seconds,
            sent_total: self.sent.load(Ordering::Relaxed),
            failed_total: self.failed.load(Ordering::Relaxed),
            retries_total: self.retries.load(Ordering::Relaxed),
            last_error: errors.last.as_ref().map(|(e, _)| e.clone()),
            last_error_at: errors
                .last
                .as_ref()
                .map(|&(_, at)| auditrail_core::time::format_millis(at as i64)),
            recent_failures: errors.recent.iter().cloned().collect(),
        }
    }
}

/// Appends the forwarders' Prometheus series to `out`.
pub fn prometheus(statuses: &[ForwarderStatus], out: &mut String) {
    type Get = fn(&ForwarderStatus) -> f64;
    let series: [(&str, &str, &str, Get); 6] = [
        ("auditrail_forward_next_seq", "gauge", "Next seq to deliver.", |s| s.next_seq as f64),
        ("auditrail_forward_lag_events", "gauge", "Durable events not yet delivered.", |s| {
            s.lag_events as f64
        }),
        ("auditrail_forward_lag_seconds", "gauge", "Age of the oldest undelivered event.", |s| {
            s.lag_seconds
        }),
        ("auditrail_forward_sent_total", "counter", "Events delivered.", |s| s.sent_total as f64),
        (
            "auditrail_forward_failed_total",
            "counter",
            "Events refused for good and skipped.",
            |s| s.failed_total as f64,
        ),
        ("auditrail_forward_retries_total", "counter", "Failed attempts, retried.", |s| {
            s.retries_total as f64
        }),
    ];
    if statuses.is_empty() {
        return;
    }
    for (name, kind, help, get) in series {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for s in statuses {
            out.push_str(&format!("{name}{{forwarder=\"{}\"}} {}\n", s.name, get(s)));
        }
    }
    out.push_str("# HELP auditrail_forward_up 1 when the last attempt succeeded.\n");
    out.push_str("# TYPE auditrail_forward_up gauge\n");
    for s in statuses {
        out.push_str(&format!(
            "auditrail_forward_up{{forwarder=\"{}\"}} {}\n",
            s.name,
            u8::from(s.state == "ok")
        ));
    }
}
