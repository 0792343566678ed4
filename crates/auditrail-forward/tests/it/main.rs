//! The forwarders against real destinations: a `_bulk`-speaking HTTP server written here
//! (no Elasticsearch can run in the test environment) and a real rsyslogd receiving over TLS.

mod elasticsearch;
mod syslog;

use auditrail_core::event::ClientEvent;
use auditrail_forward::{ForwarderStatus, Forwarding};
use auditrail_store::{Options, Store};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A fresh log in `dir`.
pub fn open_store(dir: &Path) -> Arc<Store> {
    if !dir.join("keys").exists() {
        auditrail_store::init(dir, "test.auditrail.local/log").unwrap();
    }
    Arc::new(Store::open(dir, Options::default()).unwrap())
}

pub fn event(i: usize) -> Value {
    let failure = i % 7 == 3;
    json!({
        "id": format!("e-{i}"),
        "occurred_at": "2026-11-22T10:15:00Z",
        "category": if failure { "authentication" } else { "phi_access" },
        "action": if failure { "login.failure" } else { "patient.read" },
        "outcome": if failure { "failure" } else { "success" },
        "outcome_code": if failure { 8 } else { 0 },
        "actor": {"user_id": format!("u{}", i % 5), "ip": "10.1.2.3"},
        "patient": {"id": format!("MRN{i}")},
        "context": {"note": "quote \" bracket ] backslash \\ é"},
    })
}

/// Appends events `range` durably (in one group commit).
pub fn append(store: &Store, range: std::ops::Range<usize>) {
    let prepared = range
        .map(|i| ClientEvent::validate(event(i)).and_then(ClientEvent::prepare).unwrap())
        .collect();
    store.append(prepared).unwrap();
}

/// Polls `f` until it holds, for at most `limit`; panics with `what` and the last status.
pub async fn wait_for(
    forwarding: &Forwarding,
    limit: Duration,
    what: &str,
    f: impl Fn(&ForwarderStatus) -> bool,
) -> ForwarderStatus {
    let start = Instant::now();
    loop {
        let status = forwarding.status().forwarders.swap_remove(0);
        if f(&status) {
            return status;
        }
        if start.elapsed() > limit {
            panic!("{what}: not within {limit:?}; status {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
