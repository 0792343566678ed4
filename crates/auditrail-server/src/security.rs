//! `GET /api/v1/security/status`: the state of the safeguards around the log, one section per
//! subsystem (`forwarding` here).

use crate::SharedState;
use auditrail_forward::ForwardingStatus;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The security status.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityStatus {
    /// The forwarders shipping the log to Elasticsearch/OpenSearch and syslog: how far each
    /// has delivered, its lag and its failures.
    pub forwarding: ForwardingStatus,
}

#[utoipa::path(
    get,
    path = "/api/v1/security/status",
    tag = "operations",
    summary = "Security status",
    description = "The state of the safeguards around the log. `forwarding`: each configured forwarder's progress (`next_seq`), lag (events and seconds behind the durable log) and failures (retried attempts, events refused for good with their seqs, the last error).",
    responses((status = 200, description = "The status.", body = SecurityStatus))
)]
pub async fn status(State(s): State<SharedState>) -> Json<SecurityStatus> {
    Json(SecurityStatus { forwarding: s.forwarding.status() })
}
