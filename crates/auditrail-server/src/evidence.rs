//! `GET /api/v1/events/evidence`: the events a search matches as an evidence bundle, one tar
//! archive an auditor checks offline (`auditrail verify-bundle`, or by hand with `tlogverify`):
//! each event exactly as stored with its salt and leaf, an inclusion proof of each against one
//! signed checkpoint, that checkpoint, the log's key, optionally a consistency proof from a
//! tree size the recipient already trusts, and a README. The layout and the checks live in
//! `auditrail_core::evidence`, shared with the verifier.
//!
//! The bundle is planned before the first byte (the checkpoint, the list of events, the cap,
//! the right to see every event unmasked), so every refusal is a clean 4xx; then it streams,
//! a chunk at a time, like an export.

use crate::auth::{EventView, Principal, TraceDetail};
use crate::export::{
    CHUNK_BYTES, CHUNKS_IN_FLIGHT, ChunkStream, EXPORT_TOTAL, check_local_export, compact_utc,
    requested_project,
};
use crate::openapi::{ErrorBody, EvidenceBundle};
use crate::query::{Paging, pairs, search_query};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::checkpoint::Checkpoint;
use auditrail_core::evidence::{BundleWriter, Consistency, FORMAT, Manifest};
use auditrail_index::Query;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderName, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// The tree size of the checkpoint every proof in the bundle leads to.
const TREE_SIZE: HeaderName = HeaderName::from_static("x-evidence-tree-size");

/// `GET /api/v1/events/evidence`
#[utoipa::path(
    get,
    path = "/api/v1/events/evidence",
    tag = "events",
    operation_id = "events_evidence",
    summary = "Export matching events as an offline-verifiable evidence bundle",
    description = "The events the search parameters match (those of `GET /api/v1/events/export`, \
without `order` and `format`) among those indexed now, as one tar archive that proves, with \
nothing but the log's public key, that each event is in the log exactly as written: every \
event's stored bytes (RFC 8785), its salt and 41-byte leaf entry, a C2SP `tlog-proof` of its \
inclusion in one signed checkpoint, that checkpoint, the log's verifier key, a README, a \
`bundle.json` manifest and `SHA256SUMS`. With `trusted_size`, also the signed checkpoint of \
that size and an RFC 6962 consistency proof from it. Check it with `auditrail verify-bundle` \
(docs/api.md, \"Evidence bundles\"). Events are never masked in a bundle (a leaf commits to \
every byte), so an event with patient identifiers the caller may not see refuses the whole \
bundle. At most `evidence_events_max` events (10,000 unless configured). Recorded in the log as \
an `events.export`. Governance's `local_export_disabled` applies as to exports.",
    params(
        ("trusted_size" = Option<u64>, Query, minimum = 1, description = "The size of a checkpoint you already hold: the bundle adds that signed checkpoint and a consistency proof from it."),
    ),
    responses(
        (status = 200, description = "The bundle, a tar archive (`auditrail-evidence-<UTC time>/...`).", content_type = "application/x-tar", body = EvidenceBundle,
            headers(
                ("X-Export-Total" = u64, description = "How many events the bundle holds."),
                ("X-Evidence-Tree-Size" = u64, description = "The tree size of the checkpoint the proofs lead to."),
            )),
        (status = 400, description = "`bad_query`, `invalid_parameter` (a bad filter, or a `trusted_size` larger than the log or with no signed checkpoint), `unknown_parameter`, or `too_many_events`: more than `evidence_events_max` events match (the message says how many).", body = ErrorBody),
        (status = 403, description = "`forbidden` (also: an event holds patient identifiers the caller may not see), or `export_disabled`.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn evidence(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut params = pairs(raw.as_deref())?;
    let trusted_size = take_trusted_size(&mut params)?;
    // A bundle is always in seq order and in one format.
    for name in ["order", "format"] {
        if params.iter().any(|(k, _)| k == name) {
            return Err(ApiError::unknown_parameter(name));
        }
    }
    let view = EventView::for_export(&principal);
    let (q, _) = search_query(&state, &view, &params, Paging::All)?;
    check_local_export(&state, &view, requested_project(&params))?;
    let filters: BTreeMap<String, String> = params.into_iter().collect();
    let s = state.clone();
    let plan = blocking(move || plan(&s, q, &view, trusted_size, filters)).await?;
    let headers = [
        (header::CONTENT_TYPE, "application/x-tar".to_string()),
        (header::CONTENT_DISPOSITION, format!("attachment; filename=\"{}.tar\"", plan.dir)),
        (EXPORT_TOTAL, plan.seqs.len().to_string()),
        (TREE_SIZE, plan.tree_size.to_string()),
    ];
    let detail = TraceDetail(json!({
        "format": "evidence", "events": plan.seqs.len(), "tree_size": plan.tree_size,
        "trusted_size": trusted_size,
    }));
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = write_bundle(&state, plan, &tx) {
            // The status is sent already: ending the stream with an error cuts it short.
            eprintln!("auditrail: evidence bundle failed: {}", e.message);
            let _ = tx.blocking_send(Err(std::io::Error::other(e.message)));
        }
    });
    let mut response = (headers, Body::from_stream(ChunkStream(rx))).into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

fn take_trusted_size(params: &mut Vec<(String, String)>) -> Result<Option<u64>, ApiError> {
    let Some(i) = params.iter().position(|(k, _)| k == "trusted_size") else {
        return Ok(None);
    };
    let (_, v) = params.remove(i);
    if params.iter().any(|(k, _)| k == "trusted_size") {
        return Err(bad("may be given once"));
    }
    match v.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(Some(n)),
        _ => Err(bad("must be a tree size, a whole number from 1")),
    }
}

fn bad(message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_parameter", format!("trusted_size: {message}"))
}

/// Everything decided before the first byte.
struct Plan {
    writer: BundleWriter,
    seqs: Vec<u64>,
    tree_size: u64,
    dir: String,
}

fn plan(
    state: &SharedState,
    mut q: Query,
    view: &EventView,
    trusted_size: Option<u64>,
    filters: BTreeMap<String, String>,
) -> Result<Plan, ApiError> {
    // Every event the index can find must be in the checkpoint the proofs lead to: publish
    // what the index is ahead of (it is never ahead of what is durable).
    let indexed_through = state.index.indexed_through();
    if state.store.stages().published < indexed_through {
        state.store.publish()?;
    }
    let key = state.store.verifier();
    let checkpoint_note = state.store.checkpoint(None)?;
    let checkpoint = auditrail_core::note::open(&checkpoint_note, std::slice::from_ref(&key))
        .map_err(ApiError::internal)
        .and_then(|text| Checkpoint::parse(text).map_err(ApiError::internal))?;
    let max = state.config.evidence_events_max;
    q.seqs = (0, indexed_through.min(checkpoint.size));
    q.newest_first = false;
    q.limit = max;
    let hits = state.index.search(&q);
    if hits.more {
        let matches = state.index.count(&q);
        let mut e = ApiError::bad_request(
            "too_many_events",
            format!(
                "the search matches {matches} events and a bundle holds at most {max} \
                 (evidence_events_max): narrow it (from, to, patient, user, ...) and fetch \
                 several bundles"
            ),
        );
        e.extra = Some(("limit", json!({"matches": matches, "max": max})));
        return Err(e);
    }
    if !view.is_unrestricted() {
        for &seq in &hits.seqs {
            state.with_stored(seq, |stored| {
                let event: serde_json::Value =
                    serde_json::from_slice(stored).map_err(ApiError::internal)?;
                let mut shown = event.clone();
                if view.apply(&mut shown) && shown == event {
                    return Ok(());
                }
                Err(crate::auth::forbidden(format!(
                    "the event at seq {seq} holds patient identifiers you may not see, and a \
                     bundle carries events exactly as stored (their leaves commit to every \
                     byte): it needs events:patient_identifiers, or a narrower search"
                )))
            })?;
        }
    }
    let consistency = match trusted_size {
        None => None,
        Some(t) if t > checkpoint.size => {
            return Err(bad(format!(
                "{t} is larger than the newest checkpoint's tree size ({})",
                checkpoint.size
            )));
        }
        Some(t) => Some(Consistency {
            trusted_checkpoint: state.store.checkpoint(Some(t)).map_err(|_| {
                bad(format!(
                    "the log signed no checkpoint of size {t}; give the size of one you hold"
                ))
            })?,
            proof: state.store.consistency_proof(t, checkpoint.size)?,
        }),
    };
    let now_ms = state.auth.now_ms();
    let dir = format!("auditrail-evidence-{}", compact_utc(now_ms));
    let manifest = Manifest {
        format: FORMAT.into(),
        origin: checkpoint.origin.clone(),
        tree_size: checkpoint.size,
        trusted_size,
        events: hits.seqs.len() as u64,
        exported_at: auditrail_core::time::format_millis(now_ms),
        filters,
    };
    let mtime_s = u64::try_from(now_ms / 1000).unwrap_or(0);
    let writer =
        BundleWriter::new(&dir, mtime_s, &manifest, &key, &checkpoint_note, consistency.as_ref())
            .map_err(ApiError::internal)?;
    Ok(Plan { writer, seqs: hits.seqs, tree_size: checkpoint.size, dir })
}

/// Adds each event with its salt and proof, sending the archive a chunk at a time. The writer
/// checks every event against the checkpoint before writing it.
fn write_bundle(
    state: &SharedState,
    plan: Plan,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), ApiError> {
    let Plan { mut writer, seqs, tree_size, .. } = plan;
    for seq in seqs {
        let at = state
            .index
            .block_for(seq)
            .ok_or_else(|| ApiError::internal(format!("seq {seq} has no block in the index")))?;
        let salt = state.blocks.salt(&at, seq)?;
        let proof = state.store.inclusion_proof(seq, tree_size)?;
        state.with_stored(seq, |stored| {
            writer.add_event(stored, &salt, &proof).map_err(ApiError::internal)
        })?;
        if writer.pending_bytes() >= CHUNK_BYTES
            && tx.blocking_send(Ok(Bytes::from(writer.take()))).is_err()
        {
            return Ok(());
        }
    }
    let rest = writer.finish().map_err(ApiError::internal)?;
    let _ = tx.blocking_send(Ok(Bytes::from(rest)));
    Ok(())
}
