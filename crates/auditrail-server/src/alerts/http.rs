//! `/api/v1/security/alerts` and `/api/v1/security/alert-rules`.

use super::rules::{Rule, Severity};
use super::{Alert, Status};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::openapi::ErrorBody;
use crate::query::pairs;
use crate::{SharedState, blocking};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

fn bad(name: &str, what: &str) -> ApiError {
    ApiError::bad_request("invalid_parameter", format!("{name} {what}"))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AlertPage {
    pub alerts: Vec<Alert>,
    /// Pass as `cursor` for the next page; null on the last.
    pub next_cursor: Option<String>,
    /// How many alerts match in all.
    pub total: usize,
}

/// `GET /api/v1/security/alerts`
#[utoipa::path(
    get,
    path = "/api/v1/security/alerts",
    tag = "security",
    operation_id = "alerts_list",
    summary = "List alerts",
    description = "Alerts, newest first, with their lifecycle and webhook deliveries.",
    params(
        ("status" = Option<String>, Query, description = "`open`, `acknowledged` or `resolved`; comma-separated for several."),
        ("severity" = Option<String>, Query, description = "`low`, `medium`, `high` or `critical`; comma-separated for several."),
        ("rule" = Option<String>, Query, description = "The rule's name."),
        ("subject" = Option<String>, Query, description = "What the alert is about (a user, an address)."),
        ("since" = Option<String>, Query, format = DateTime, description = "Raised at or after (RFC 3339)."),
        ("limit" = Option<u32>, Query, description = "Page size, 1-500, default 50."),
        ("cursor" = Option<String>, Query, description = "The previous page's `next_cursor`."),
    ),
    responses(
        (status = 200, description = "A page of alerts.", body = AlertPage),
        (status = 400, description = "`invalid_parameter` or `unknown_parameter`.", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut statuses, mut severities) = (Vec::new(), Vec::new());
    let (mut rule, mut subject, mut since) = (None, None, None);
    let (mut limit, mut offset) = (50usize, 0usize);
    for (k, v) in pairs(raw.as_deref())? {
        match k.as_str() {
            "status" => {
                for s in v.split(',') {
                    statuses.push(
                        Status::parse(s).ok_or_else(|| {
                            bad("status", "must be open, acknowledged or resolved")
                        })?,
                    );
                }
            }
            "severity" => {
                for s in v.split(',') {
                    severities.push(
                        Severity::parse(s).ok_or_else(|| {
                            bad("severity", "must be low, medium, high or critical")
                        })?,
                    );
                }
            }
            "rule" => rule = Some(v),
            "subject" => subject = Some(v),
            "since" => {
                since = Some(
                    auditrail_core::time::parse_rfc3339(&v)
                        .ok_or_else(|| bad("since", "must be an RFC 3339 time"))?,
                )
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| bad("limit", "must be 1 to 500"))?
            }
            "cursor" => {
                offset = v.parse().map_err(|_| bad("cursor", "is not one this server gave"))?
            }
            _ => return Err(ApiError::unknown_parameter(&k)),
        }
    }
    let matching = state.alerts.list(|a| {
        (statuses.is_empty() || statuses.contains(&a.status))
            && (severities.is_empty() || severities.contains(&a.severity))
            && rule.as_deref().is_none_or(|r| a.rule == r)
            && subject.as_deref().is_none_or(|s| a.subject == s)
            && since
                .is_none_or(|t| auditrail_core::time::parse_rfc3339(&a.raised_at).unwrap_or(0) >= t)
    });
    let total = matching.len();
    let alerts: Vec<Alert> = matching.into_iter().skip(offset).take(limit).collect();
    let next_cursor = (offset + alerts.len() < total).then(|| (offset + alerts.len()).to_string());
    Ok(Json(AlertPage { alerts, next_cursor, total }).into_response())
}

/// `GET /api/v1/security/alerts/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/security/alerts/{id}",
    tag = "security",
    operation_id = "alerts_get",
    summary = "Read an alert",
    params(("id" = String, Path, description = "The alert's id.")),
    responses(
        (status = 200, description = "The alert.", body = Alert),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let alert =
        state.alerts.get(&id).ok_or_else(|| ApiError::not_found(format!("no alert {id}")))?;
    Ok(Json(alert).into_response())
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TransitionBody {
    /// Why (kept on the alert and in the log).
    pub note: String,
}

async fn transition(
    state: SharedState,
    principal: Principal,
    id: String,
    to: Status,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: TransitionBody = if body.iter().all(u8::is_ascii_whitespace) {
        TransitionBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("expected {{\"note\": \"...\"}}: {e}"))
        })?
    };
    if body.note.len() > 1000 {
        return Err(bad("note", "must be at most 1000 bytes"));
    }
    blocking(move || {
        let (before, after) = state.alerts.transition(&id, to, &principal.name, body.note.clone())?;
        let action = if to == Status::Acknowledged { "alert.acknowledged" } else { "alert.resolved" };
        state.auth.record(
            &principal.actor(),
            action,
            "success",
            json!({"alert_id": id, "rule": after.rule, "severity": after.severity.as_str(), "note": body.note}),
            vec![json!({"field": "status", "before": json!(before.status), "after": json!(after.status)})],
        )?;
        let _ = state.alerts.save();
        Ok(Json(after).into_response())
    })
    .await
}

/// `POST /api/v1/security/alerts/{id}/acknowledge`
#[utoipa::path(
    post,
    path = "/api/v1/security/alerts/{id}/acknowledge",
    tag = "security",
    operation_id = "alerts_acknowledge",
    summary = "Acknowledge an alert",
    description = "Someone is looking at it. Recorded in the log as `alert.acknowledged`.",
    params(("id" = String, Path, description = "The alert's id.")),
    request_body(content = TransitionBody, content_type = "application/json", description = "Optional."),
    responses(
        (status = 200, description = "The alert after.", body = Alert),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`alert_state`: only an open alert can be acknowledged.", body = ErrorBody),
    )
)]
pub async fn acknowledge(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    transition(state, principal, id, Status::Acknowledged, body).await
}

/// `POST /api/v1/security/alerts/{id}/resolve`
#[utoipa::path(
    post,
    path = "/api/v1/security/alerts/{id}/resolve",
    tag = "security",
    operation_id = "alerts_resolve",
    summary = "Resolve an alert",
    description = "Closes it; the next firing of its rule for the same subject raises a new alert. \
Recorded in the log as `alert.resolved`.",
    params(("id" = String, Path, description = "The alert's id.")),
    request_body(content = TransitionBody, content_type = "application/json", description = "Optional."),
    responses(
        (status = 200, description = "The alert after.", body = Alert),
        (status = 404, description = "`not_found`.", body = ErrorBody),
        (status = 409, description = "`alert_state`: already resolved.", body = ErrorBody),
    )
)]
pub async fn resolve(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    transition(state, principal, id, Status::Resolved, body).await
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RuleInForce {
    #[serde(flatten)]
    pub rule: Rule,
    /// `builtin`, `config` or `api`.
    pub origin: super::rules::Origin,
}

/// `GET /api/v1/security/alert-rules`
#[utoipa::path(
    get,
    path = "/api/v1/security/alert-rules",
    tag = "security",
    operation_id = "alert_rules_list",
    summary = "The alert rules in force",
    description = "Built-in rules, replaced by name by the configuration file's, then by those \
set through this API.",
    responses((status = 200, description = "The rules.", body = Vec<RuleInForce>))
)]
pub async fn list_rules(State(state): State<SharedState>) -> Response {
    let rules: Vec<RuleInForce> = state
        .alerts
        .effective_rules()
        .into_iter()
        .map(|(rule, origin)| RuleInForce { rule, origin })
        .collect();
    Json(rules).into_response()
}

/// `PUT /api/v1/security/alert-rules/{name}`
#[utoipa::path(
    put,
    path = "/api/v1/security/alert-rules/{name}",
    tag = "security",
    operation_id = "alert_rules_put",
    summary = "Add or replace an alert rule",
    description = "Takes effect on the next events read. Recorded in the log as \
`alerts.rule.change` with the rule before and after.",
    params(("name" = String, Path, description = "The rule's name (must equal the body's).")),
    request_body(content = Rule, content_type = "application/json"),
    responses(
        (status = 200, description = "The rule.", body = Rule),
        (status = 400, description = "`invalid_json` or `invalid_rule`.", body = ErrorBody),
    )
)]
pub async fn put_rule(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let rule: Rule = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("not a rule: {e}")))?;
    if rule.name != name {
        return Err(ApiError::bad_request(
            "invalid_rule",
            "the body's name differs from the path's",
        ));
    }
    rule.check().map_err(|e| ApiError::bad_request("invalid_rule", e))?;
    blocking(move || {
        let before = state.alerts.put_rule(rule.clone());
        state.auth.record(
            &principal.actor(),
            "alerts.rule.change",
            "success",
            json!({"rule": name}),
            vec![json!({"field": "rule", "before": before, "after": rule})],
        )?;
        let _ = state.alerts.save();
        Ok(Json(rule).into_response())
    })
    .await
}

/// `DELETE /api/v1/security/alert-rules/{name}`
#[utoipa::path(
    delete,
    path = "/api/v1/security/alert-rules/{name}",
    tag = "security",
    operation_id = "alert_rules_delete",
    summary = "Remove an alert rule",
    description = "Built-in and configured rules too (until set again through the API). \
Recorded in the log as `alerts.rule.change`.",
    params(("name" = String, Path, description = "The rule's name.")),
    responses(
        (status = 204, description = "Removed."),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn delete_rule(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    blocking(move || {
        let before = state
            .alerts
            .remove_rule(&name)
            .ok_or_else(|| ApiError::not_found(format!("no rule {name}")))?;
        state.auth.record(
            &principal.actor(),
            "alerts.rule.change",
            "success",
            json!({"rule": name}),
            vec![json!({"field": "rule", "before": before, "after": Value::Null})],
        )?;
        let _ = state.alerts.save();
        Ok(StatusCode::NO_CONTENT.into_response())
    })
    .await
}
