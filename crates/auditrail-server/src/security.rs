//! `GET /api/v1/security/status`: the state of the safeguards around the log, one section per
//! subsystem (`backup`, `forwarding`, `retention`), each built by its own module.

use crate::error::ApiError;
use crate::{SharedState, blocking};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

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
severity, the engine's progress, webhook deliveries).",
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
        let body: Value = json!({"backup": backup, "forwarding": forwarding, "retention": retention,
            "service": service, "log": log, "alerts": alerts, "integrity": integrity});
        Ok(axum::Json(body).into_response())
    })
    .await
}
