//! `GET /api/v1/security/status`: the state of the safeguards around the log, one section per
//! subsystem (backup, forwarding, retention, service, log, alerts, integrity, access, TLS,
//! keys); the larger ones are built by their own modules.

use crate::error::ApiError;
use crate::{SharedState, blocking};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const DAY_MS: i64 = 86_400_000;

/// How many of auditrail's own events with this action and outcome were recorded since
/// `since_ms` (from the index, so as of `log.indexed_through`).
fn repository_events_since(s: &crate::AppState, action: &str, outcome: &str, since_ms: i64) -> u64 {
    use auditrail_index::doc::{Field, term};
    let q = auditrail_index::Query {
        all_of: vec![
            vec![term(Field::Category, "repository")],
            vec![term(Field::Action, action)],
            vec![term(Field::Outcome, outcome)],
        ],
        recorded: (since_ms, i64::MAX),
        ..auditrail_index::Query::default()
    };
    s.index.count(&q)
}

/// How the server speaks TLS, as configured (a proxy in front is not seen from here).
fn tls_section(c: &crate::Config) -> Value {
    json!({
        "enabled": c.tls_enabled(),
        "min_version": c.tls_enabled().then_some(c.tls_min_version),
        "client_auth": c.tls_client_auth,
        "self_signed": c.tls_self_signed && c.tls_cert_file.is_none(),
        "cert_file": c.tls_cert_file.as_ref().map(|p| p.display().to_string()),
    })
}

/// The keys in use and how old their files are: a key file is rewritten only when a key is
/// added, so its modification time is the newest key's age.
fn keys_section(s: &crate::AppState) -> Value {
    let modified = |path: &std::path::Path| -> Option<i64> {
        let t = std::fs::metadata(path).ok()?.modified().ok()?;
        Some(t.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
    };
    let now = crate::now_ms();
    let age = |t: Option<i64>| {
        json!({"modified_at": t.map(auditrail_core::time::format_millis),
            "age_days": t.map(|t| (now - t).max(0) / DAY_MS)})
    };
    let master = s.store.master_keys();
    let master_file = match s.config.master_key_source() {
        Ok(auditrail_store::keys::MasterKeySource::DataDir) => {
            Some(s.config.data.join(auditrail_store::keys::MASTER_KEYS_PATH))
        }
        Ok(auditrail_store::keys::MasterKeySource::File(p)) => Some(p),
        _ => None,
    };
    json!({
        "signing_key": age(modified(&s.config.data.join(auditrail_store::keys::SIGNING_KEY_PATH))),
        "master_keys": {
            "from": master.origin(),
            "versions": master.versions(),
            "current_version": master.current().0,
            "file": age(master_file.as_deref().and_then(modified)),
        },
    })
}

#[utoipa::path(
    get,
    path = "/api/v1/security/status",
    tag = "operations",
    summary = "Security status",
    description = "The state of the safeguards around the log, one section each: `backup` \
(scheduled backup to object storage: last manifest, last success, archived tree size, lag in \
events and seconds, last error, consecutive failures); `forwarding` (each configured \
forwarder's progress `next_seq`, lag in events and seconds behind the durable log, and \
failures: retried attempts, events refused for good with their seqs, the last error); \
`retention` (the policy, the legal holds in force, what has been purged); `service` (version, \
start, uptime); `log` (size, latest checkpoint, index lag); `alerts` (unresolved alerts by \
severity, the engine's progress, webhook deliveries); `integrity` (how far the log is \
verified, the last full and incremental verification); `access` (accounts, MFA coverage, \
accounts locked now, failed logins and lockouts in the last 24 hours); `tls` (how this server \
terminates TLS); `keys` (signing and master key versions and age).",
    responses(
        (status = 200, description = "The status, one object per section.", body = crate::openapi::SecurityStatus),
        (status = 500, description = "`internal`.", body = crate::openapi::ErrorBody),
    )
)]
pub async fn status(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let s = state.clone();
    blocking(move || {
        let backup = serde_json::to_value(crate::backup_status(&s)).map_err(ApiError::internal)?;
        let forwarding = serde_json::to_value(s.forwarding.status()).map_err(ApiError::internal)?;
        let purged = s.store.purged();
        let retention = json!({
            "default_days": s.config.retention_days,
            "check_interval_ms": s.config.retention_check_interval_ms,
            "holds": s.store.holds()?.len(),
            "purged_events": purged.events(),
            "purged_segments": purged.segments().len(),
        });
        let stages = s.store.stages();
        let indexed = s.index.indexed_through();
        let started = crate::started_ms();
        let service = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "started_at": auditrail_core::time::format_millis(started),
            "uptime_seconds": (crate::now_ms() - started).max(0) / 1000,
        });
        let log = json!({
            "size": stages.sequenced,
            "checkpoint_size": stages.published,
            "indexed_through": indexed,
            "index_lag_events": stages.sequenced.saturating_sub(indexed),
        });
        let alerts = json!({
            "enabled": s.config.alerts.enabled,
            "next_seq": s.alerts.cursor(),
            "unresolved": s.alerts.unresolved_by_severity(),
            "webhooks": s.alerts.webhook_status(),
        });
        let integrity = s.integrity.status(&s.config);
        let mut access = s.auth.account_summary();
        let since = crate::now_ms() - DAY_MS;
        access["failed_logins_24h"] =
            repository_events_since(&s, "auth.login", "failure", since).into();
        access["lockouts_24h"] =
            repository_events_since(&s, "auth.lockout", "success", since).into();
        let body: Value = json!({"backup": backup, "forwarding": forwarding, "retention": retention,
            "service": service, "log": log, "alerts": alerts, "integrity": integrity,
            "access": access, "tls": tls_section(&s.config), "keys": keys_section(&s)});
        Ok(axum::Json(body).into_response())
    })
    .await
}
