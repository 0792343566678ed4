//! Retention and legal holds over HTTP, and the scheduled purge. The store decides what may go
//! (`auditrail_store::retention`); this module runs it on a schedule or on request, tells the
//! index and the block cache, and records every purge and every change to a hold as an event
//! of category `repository` in the log itself.

use crate::error::ApiError;
use crate::query::pairs;
use crate::{SharedState, blocking};
use auditrail_core::time::{format_millis, parse_rfc3339};
use auditrail_store::retention::{Hold, PurgedSegment, RetentionPolicy};
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};

/// The policy the configuration sets (checked at start: under six years needs `force`).
pub fn policy(config: &crate::Config) -> RetentionPolicy {
    RetentionPolicy {
        default_days: config.retention_days,
        projects: config.retention_projects.clone(),
    }
}

/// Appends events auditrail records about itself (category `repository`).
fn record(state: &SharedState, events: Vec<Value>) -> Result<(), ApiError> {
    let prepared = events
        .into_iter()
        .map(auditrail_store::retention::repository_event)
        .collect::<Result<Vec<_>, _>>()?;
    state.store.append(prepared)?;
    Ok(())
}

/// Purges what retention allows now (the store records it in the log first). Returns what
/// went.
pub fn purge_now(state: &SharedState, actor: &str) -> Result<Vec<PurgedSegment>, ApiError> {
    let gone = state.store.purge(&policy(&state.config), crate::now_ms(), actor)?;
    if !gone.is_empty() {
        state.index.set_purged(state.store.purged().ranges());
        for p in &gone {
            state.blocks.forget_segment(p.first_seq);
        }
    }
    Ok(gone)
}

/// The scheduled purge: every `retention_check_interval_ms` until `stop`.
pub fn scheduled(state: &SharedState, stop: &AtomicBool) {
    let interval = state.config.retention_check_interval_ms;
    if interval == 0 {
        return;
    }
    let mut waited = 0u64;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(200));
        waited += 200;
        if waited < interval {
            continue;
        }
        waited = 0;
        match purge_now(state, "system:retention") {
            Ok(gone) if !gone.is_empty() => {
                eprintln!("auditrail: retention purged {} segment(s)", gone.len());
            }
            Ok(_) => {}
            Err(e) => eprintln!("auditrail: retention: {}", e.message),
        }
    }
}

fn purged_json(p: &PurgedSegment) -> Value {
    json!({
        "first_seq": p.first_seq,
        "end_seq": p.end_seq,
        "events": p.end_seq - p.first_seq,
        "oldest_recorded_at": format_millis(p.oldest_recorded_ms),
        "newest_recorded_at": format_millis(p.newest_recorded_ms),
        "purged_at": format_millis(p.purged_at_ms),
    })
}

fn hold_json(h: &Hold) -> Value {
    let mut v = json!({
        "id": h.id,
        "reason": h.reason,
        "created_at": format_millis(h.created_ms),
    });
    if let Some(p) = &h.project {
        v["project"] = json!(p);
    }
    if let Some(t) = &h.patient_token {
        v["patient_token"] = json!(t);
    }
    if let Some(t) = h.from_ms {
        v["from"] = json!(format_millis(t));
    }
    if let Some(t) = h.to_ms {
        v["to"] = json!(format_millis(t));
    }
    v
}

fn no_parameters(raw: Option<&str>) -> Result<(), ApiError> {
    match pairs(raw)?.into_iter().next() {
        Some((k, _)) => Err(ApiError::unknown_parameter(&k)),
        None => Ok(()),
    }
}

/// `GET /api/v1/retention`
#[utoipa::path(
    get,
    path = "/api/v1/retention",
    tag = "retention",
    operation_id = "retention_get",
    summary = "The retention policy, the legal holds and what has been purged",
    responses(
        (status = 200, description = "The retention state.", body = crate::openapi::RetentionState),
        (status = 400, description = "`bad_query` or `unknown_parameter`.", body = crate::openapi::ErrorBody),
        (status = 500, description = "`internal`.", body = crate::openapi::ErrorBody),
    )
)]
pub async fn get_state(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    no_parameters(raw.as_deref())?;
    let s = state.clone();
    blocking(move || {
        let purged = s.store.purged();
        let holds = s.store.holds()?;
        Ok(Json(json!({
            "default_days": s.config.retention_days,
            "projects": s.config.retention_projects,
            "check_interval_ms": s.config.retention_check_interval_ms,
            "holds": holds.iter().map(hold_json).collect::<Vec<_>>(),
            "purged_events": purged.events(),
            "purged_segments": purged.segments().iter().map(purged_json).collect::<Vec<_>>(),
        }))
        .into_response())
    })
    .await
}

/// `POST /api/v1/retention/purge`
#[utoipa::path(
    post,
    path = "/api/v1/retention/purge",
    tag = "retention",
    operation_id = "retention_purge",
    summary = "Purge now what retention allows (or, with dry_run=true, say what would go)",
    description = "Purges every sealed segment whose events are all past their project's \
retention and that no legal hold covers, by deleting it (crypto-erasure: its key goes with \
it). The tree and checkpoints stay, so proofs of purged events still verify. Each purge is \
recorded in the log as a `retention.purge` event. The server also runs this every \
`retention_check_interval_ms`.",
    params(("dry_run" = Option<bool>, Query, description = "`true`: only report the decision for each segment old enough to be considered.")),
    responses(
        (status = 200, description = "What went (or the plan).", body = crate::openapi::PurgeResult),
        (status = 400, description = "`bad_query`, `invalid_parameter` or `unknown_parameter`.", body = crate::openapi::ErrorBody),
        (status = 500, description = "`internal`.", body = crate::openapi::ErrorBody),
        (status = 503, description = "`read_only`: the log refuses writes after a storage failure.", body = crate::openapi::ErrorBody),
    )
)]
pub async fn post_purge(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut dry_run = false;
    for (k, v) in pairs(raw.as_deref())? {
        match (k.as_str(), v.as_str()) {
            ("dry_run", "true") => dry_run = true,
            ("dry_run", "false") => dry_run = false,
            ("dry_run", _) => {
                return Err(ApiError::bad_request(
                    "invalid_parameter",
                    "dry_run must be true or false",
                ));
            }
            _ => {
                return Err(ApiError::unknown_parameter(&k));
            }
        }
    }
    let s = state.clone();
    blocking(move || {
        if dry_run {
            let plan = s.store.retention_plan(&policy(&s.config), crate::now_ms())?;
            let segments: Vec<Value> = plan
                .iter()
                .map(|d| {
                    json!({
                        "first_seq": d.first_seq,
                        "end_seq": d.end_seq,
                        "oldest_recorded_at": format_millis(d.oldest_recorded_ms),
                        "newest_recorded_at": format_millis(d.newest_recorded_ms),
                        "expires_at": format_millis(d.expires_ms),
                        "held_by": d.held_by,
                        "purge": d.purge,
                    })
                })
                .collect();
            return Ok(Json(json!({"dry_run": true, "segments": segments})).into_response());
        }
        let gone = purge_now(&s, &principal.id)?;
        Ok(Json(json!({
            "dry_run": false,
            "purged": gone.iter().map(purged_json).collect::<Vec<_>>(),
        }))
        .into_response())
    })
    .await
}

/// The body of `POST /api/v1/retention/holds`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewHold {
    reason: String,
    project: Option<String>,
    patient: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

/// `POST /api/v1/retention/holds`
#[utoipa::path(
    post,
    path = "/api/v1/retention/holds",
    tag = "retention",
    operation_id = "retention_hold_create",
    summary = "Place a legal hold",
    description = "While the hold exists, no segment holding an event it covers is purged. \
Every criterion given must match: `project`, `patient` (a `patient.id`, any system; stored \
and shown only as a keyed token), and a time range `from`/`to` (RFC 3339) of `occurred_at` or \
`recorded_at`. Recorded in the log as a `retention.hold.create` event.",
    request_body(content = crate::openapi::NewHold, content_type = "application/json"),
    responses(
        (status = 201, description = "The hold.", body = crate::openapi::HoldInfo),
        (status = 400, description = "`invalid_json` or `invalid_parameter`.", body = crate::openapi::ErrorBody),
        (status = 500, description = "`internal`.", body = crate::openapi::ErrorBody),
    )
)]
pub async fn create_hold(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let new: NewHold = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("not a hold: {e}")))?;
    let time = |name: &str, v: &Option<String>| -> Result<Option<i64>, ApiError> {
        v.as_deref()
            .map(|t| {
                parse_rfc3339(t).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        format!("{name} must be an RFC 3339 time"),
                    )
                })
            })
            .transpose()
    };
    let (from_ms, to_ms) = (time("from", &new.from)?, time("to", &new.to)?);
    let s = state.clone();
    blocking(move || {
        let hold = Hold {
            id: uuid::Uuid::now_v7().to_string(),
            reason: new.reason,
            created_ms: crate::now_ms(),
            project: new.project,
            patient_token: new.patient.as_deref().map(|p| s.store.patient_token(p)),
            from_ms,
            to_ms,
        };
        hold.check().map_err(|m| ApiError::bad_request("invalid_parameter", m))?;
        s.store.add_hold(hold.clone())?;
        let shown = hold_json(&hold);
        record(
            &s,
            vec![json!({
                "action": "retention.hold.create",
                "outcome": "success",
                "actor": principal.actor(),
                "entities": [{"type": "legal-hold", "id": hold.id, "name": hold.reason}],
                "changes": [{"field": "hold", "before": null, "after": shown}],
            })],
        )?;
        Ok((StatusCode::CREATED, Json(shown)).into_response())
    })
    .await
}

/// `DELETE /api/v1/retention/holds/{id}`
#[utoipa::path(
    delete,
    path = "/api/v1/retention/holds/{id}",
    tag = "retention",
    operation_id = "retention_hold_release",
    summary = "Release a legal hold",
    description = "Recorded in the log as a `retention.hold.release` event.",
    params(("id" = String, Path, description = "The hold's id.")),
    responses(
        (status = 200, description = "The released hold.", body = crate::openapi::HoldInfo),
        (status = 404, description = "`not_found`: no hold has this id.", body = crate::openapi::ErrorBody),
        (status = 500, description = "`internal`.", body = crate::openapi::ErrorBody),
    )
)]
pub async fn release_hold(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let s = state.clone();
    blocking(move || {
        let hold = s
            .store
            .release_hold(&id)?
            .ok_or_else(|| ApiError::not_found(format!("no hold has id {id:?}")))?;
        let shown = hold_json(&hold);
        record(
            &s,
            vec![json!({
                "action": "retention.hold.release",
                "outcome": "success",
                "actor": principal.actor(),
                "entities": [{"type": "legal-hold", "id": hold.id, "name": hold.reason}],
                "changes": [{"field": "hold", "before": shown, "after": null}],
            })],
        )?;
        Ok(Json(shown).into_response())
    })
    .await
}
