//! Exports: every event a search matches, as NDJSON (the stored canonical JSON, one per line),
//! CSV or a FHIR Bundle (`export_format`), oldest first unless `order=desc`, either streamed
//! to the caller (`GET /api/v1/events/export`) or written to an object-storage destination the
//! operator configured (`POST /api/v1/events/export`). The governance setting
//! `local_export_disabled` refuses the first, except for the projects it lists; the second is
//! how exports leave then.
//!
//! Both read the index a page at a time on a blocking thread and hand the caller chunks
//! through a small channel, so an export of millions of events holds a few MiB at most. An
//! export covers the events indexed when it starts, so its count (`X-Export-Total`) is known
//! before the first byte.

use crate::auth::{EventView, Principal, TraceDetail};
use crate::export_format::{Encoder, Format, negotiate};
use crate::openapi::ErrorBody;
use crate::query::{Paging, pairs, search_query};
use crate::{ApiError, SharedState};
use auditrail_index::Query;
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use object_store::ObjectStoreExt as _;
use serde::Deserialize;
use serde_json::json;
use sha2::Digest as _;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// Events per index page while exporting.
const PAGE_EVENTS: usize = 1000;
/// Bytes per chunk handed from the reader to the response or the upload.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;
/// Chunks in flight between the reader and the writer.
pub(crate) const CHUNKS_IN_FLIGHT: usize = 4;
/// How many events an export holds, counted when it starts: a client's measure of progress.
pub(crate) const EXPORT_TOTAL: HeaderName = HeaderName::from_static("x-export-total");

/// `GET /api/v1/events/export`
#[utoipa::path(
    get,
    path = "/api/v1/events/export",
    tag = "events",
    operation_id = "events_export",
    summary = "Export matching events as NDJSON, CSV or a FHIR Bundle",
    description = "Every event the search parameters match (the same as `GET /api/v1/events`, \
without `limit` and `cursor`) among those indexed when the export starts, streamed oldest first \
(`order=desc` for newest first) in the `format` asked for: `ndjson` (the default; the stored \
events, lossless), `csv` (a fixed set of columns, RFC 4180, formula injection neutralised; \
docs/api.md lists the columns) or `fhir` (a `searchset` Bundle of AuditEvents). Without \
`format`, an `Accept` of `text/csv` or `application/fhir+json` chooses. `X-Export-Total` \
says how many events follow, for progress (the Bundle's `total` too). Patient identifiers are \
masked where the caller may not see them. The export is recorded in the log (`events.export`, \
with the query). When governance disables local export, only exports limited to an excepted \
project (`project=`, or a caller limited to such projects) are answered; the others go to \
object storage with `POST`. A failure after the first byte ends the body early without \
terminating the chunked encoding, so a client sees an incomplete transfer, never a shorter \
export posing as complete.",
    params(
        ("format" = Option<String>, Query, description = "`ndjson` (the default), `csv` or `fhir`."),
        ("order" = Option<String>, Query, description = "`asc` (oldest first, the default) or `desc`."),
    ),
    responses(
        (status = 200, description = "The events: NDJSON (`application/x-ndjson`), CSV (`text/csv`) or a FHIR Bundle (`application/fhir+json`).", content_type = "application/x-ndjson", body = String,
            headers(("X-Export-Total" = u64, description = "How many events the export holds."))),
        (status = 400, description = "`bad_query`, `invalid_parameter` or `unknown_parameter`.", body = ErrorBody),
        (status = 403, description = "`forbidden`, or `export_disabled`: governance allows exports only to object storage.", body = ErrorBody),
    )
)]
pub async fn export(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut params = pairs(raw.as_deref())?;
    let format = negotiate(&mut params, &headers)?;
    let view = EventView::for_export(&principal);
    let (q, _) = search_query(&state, &view, &params, Paging::All)?;
    check_local_export(&state, &view, requested_project(&params))?;
    let mut encoder = Encoder::new(format, Some(crate::fhir_api::base_url(&state, &headers)));
    let s = state.clone();
    let (q, total, indexed_through) = crate::blocking(move || Ok(pin_to_indexed(&s, q))).await?;
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = read_matches(&state, q, &view, &mut encoder, total, &tx) {
            // The status is sent already: ending the stream with an error cuts it short.
            eprintln!("auditrail: export failed: {}", e.message);
            let _ = tx.blocking_send(Err(std::io::Error::other(e.message)));
        }
    });
    let body = Body::from_stream(ChunkStream(rx));
    let mut response = (
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (HeaderName::from_static("x-indexed-through"), indexed_through.to_string()),
            (EXPORT_TOTAL, total.to_string()),
        ],
        body,
    )
        .into_response();
    response
        .extensions_mut()
        .insert(TraceDetail(json!({"format": format.name(), "events": total})));
    Ok(response)
}

/// Limits `q` to the events indexed now, so that the count is the export's; returns the
/// query, the count and how far the index had got.
fn pin_to_indexed(state: &SharedState, mut q: Query) -> (Query, u64, u64) {
    let indexed_through = state.index.indexed_through();
    q.seqs = (0, indexed_through);
    let total = state.index.count(&q);
    (q, total, indexed_through)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// One of the server's `export_destinations`, as configured.
    destination: String,
    /// The search parameters of `GET /api/v1/events/export` (`patient`, `from`, `project`, ...).
    #[serde(default)]
    filters: BTreeMap<String, String>,
    /// `ndjson` (the default), `csv` or `fhir`, as for `GET /api/v1/events/export`.
    #[serde(default)]
    format: Option<String>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ExportReceipt {
    /// The object written: the destination URL and its key.
    object: String,
    /// `ndjson`, `csv` or `fhir`.
    format: String,
    events: u64,
    bytes: u64,
    /// SHA-256 of the object's bytes, lower-case hex.
    sha256: String,
}

/// `POST /api/v1/events/export`
#[utoipa::path(
    post,
    path = "/api/v1/events/export",
    tag = "events",
    operation_id = "events_export_to_storage",
    summary = "Export matching events to object storage",
    description = "Writes the export of `GET /api/v1/events/export`, in its `format` \
(`ndjson` by default, `csv` or `fhir`), to `<destination>/exports/<UTC time>-<id>.<ndjson, \
csv or json>`, where the destination must be one the operator \
configured in `export_destinations` (so no caller can send data anywhere else), and answers \
once the object is complete. Allowed whatever the governance setting on local export. The \
export is recorded in the log (`events.export`, with the destination, object, count and \
digest).",
    request_body(content = ExportRequest, content_type = "application/json"),
    responses(
        (status = 201, description = "The object is written.", body = ExportReceipt),
        (status = 400, description = "`invalid_json`, `invalid_parameter` (an unconfigured destination, a bad filter or format) or `unknown_parameter`.", body = ErrorBody),
        (status = 403, description = "`forbidden`.", body = ErrorBody),
        (status = 502, description = "`destination_failed`: the object store refused or could not be reached; nothing is left half-written.", body = ErrorBody),
    )
)]
pub async fn export_to_storage(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<ExportReceipt>), ApiError> {
    let req: ExportRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("invalid_json", e.to_string()))?;
    if !state.config.export_destinations.contains(&req.destination) {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            format!(
                "destination: {:?} is not one of the configured export_destinations ({})",
                req.destination,
                state.config.export_destinations.join(", ")
            ),
        ));
    }
    let format = match req.format.as_deref() {
        None => Format::Ndjson,
        Some(f) => Format::parse(f).ok_or_else(|| {
            ApiError::bad_request("invalid_parameter", "format: must be ndjson, csv or fhir")
        })?,
    };
    let params: Vec<(String, String)> = req.filters.clone().into_iter().collect();
    let view = EventView::for_export(&principal);
    let (q, _) = search_query(&state, &view, &params, Paging::All)?;
    // No request names the server's address for a stored object: `fullUrl` needs public_url.
    let fhir_base = (!state.config.public_url.is_empty())
        .then(|| format!("{}/fhir", state.config.public_url.trim_end_matches('/')));
    let mut encoder = Encoder::new(format, fhir_base);
    let destination = auditrail_archive::destination::Destination::open(&req.destination)
        .map_err(|e| ApiError::bad_request("invalid_parameter", format!("destination: {e}")))?;
    let stamp = compact_utc(state.auth.now_ms());
    let key = format!("exports/{stamp}-{}.{}", uuid::Uuid::now_v7().simple(), format.extension());
    let path = destination.path(&key);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "destination_failed",
            format!("export to {}: {what}: {e}", req.destination),
        )
    };
    let upload =
        destination.store.put_multipart(&path).await.map_err(|e| failed("cannot start", &e))?;
    let mut writer = object_store::WriteMultipart::new(upload);

    let (tx, mut rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let reader = {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            let (q, total, _) = pin_to_indexed(&state, q);
            read_matches(&state, q, &view, &mut encoder, total, &tx)
        })
    };
    let mut digest = sha2::Sha256::new();
    let mut bytes = 0u64;
    while let Some(chunk) = rx.recv().await {
        let Ok(chunk) = chunk else { break };
        if let Err(e) = writer.wait_for_capacity(CHUNKS_IN_FLIGHT).await {
            return Err(failed("cannot write", &e));
        }
        digest.update(&chunk);
        bytes += chunk.len() as u64;
        writer.write(&chunk);
    }
    let events = match reader.await.map_err(ApiError::internal).and_then(|r| r) {
        Ok(n) => n,
        Err(e) => {
            let _ = writer.abort().await;
            return Err(e);
        }
    };
    writer.finish().await.map_err(|e| failed("cannot complete", &e))?;
    let receipt = ExportReceipt {
        object: format!("{}/{key}", req.destination.trim_end_matches('/')),
        format: format.name().to_string(),
        events,
        bytes,
        sha256: crate::ingest::hex(&digest.finalize()),
    };
    let s = state.clone();
    let context = json!({
        "destination": req.destination, "object": receipt.object, "format": receipt.format,
        "events": events,
        "sha256": receipt.sha256, "filters": req.filters,
    });
    crate::blocking(move || {
        s.auth.record(&principal.actor(), "events.export", "success", context, vec![])
    })
    .await?;
    Ok((StatusCode::CREATED, Json(receipt)))
}

pub(crate) fn requested_project(params: &[(String, String)]) -> Option<&str> {
    params.iter().find(|(k, _)| k == "project").map(|(_, v)| v.as_str())
}

/// With local export disabled, an export answered to the caller must be limited to projects
/// the setting excepts.
pub(crate) fn check_local_export(
    state: &SharedState,
    view: &EventView,
    requested: Option<&str>,
) -> Result<(), ApiError> {
    let governance = state.auth.governance();
    if !governance.local_export_disabled {
        return Ok(());
    }
    let excepted = |projects: &std::collections::BTreeSet<String>| {
        !projects.is_empty() && projects.is_subset(&governance.local_export_exceptions)
    };
    if view.projects(requested).is_some_and(|p| excepted(&p)) {
        return Ok(());
    }
    let exceptions: Vec<&str> =
        governance.local_export_exceptions.iter().map(String::as_str).collect();
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "export_disabled",
        format!(
            "governance disables local export: export to object storage with POST \
             /api/v1/events/export{}",
            if exceptions.is_empty() {
                String::new()
            } else {
                format!(", or limit the export to an excepted project ({})", exceptions.join(", "))
            }
        ),
    ))
}

/// Reads every match of `q` a page at a time and sends it encoded, in chunks; the number of
/// events sent. Stops early (without error) when the receiver is gone.
fn read_matches(
    state: &SharedState,
    mut q: Query,
    view: &EventView,
    encoder: &mut Encoder,
    total: u64,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<u64, ApiError> {
    q.limit = PAGE_EVENTS;
    let mut events = 0u64;
    let mut chunk = Vec::with_capacity(CHUNK_BYTES + 4096);
    let timestamp = auditrail_core::time::format_millis(state.auth.now_ms());
    encoder.begin(total, &timestamp, &mut chunk);
    loop {
        let hits = state.index.search(&q);
        for stored in state.read_stored(&hits.seqs)?.iter() {
            if encoder.event(stored, view, &mut chunk)? {
                events += 1;
            }
            if chunk.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_BYTES + 4096));
                if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                    return Ok(events);
                }
            }
        }
        match (hits.more, hits.seqs.last()) {
            (true, Some(&last)) => {
                q.seqs = if q.newest_first { (q.seqs.0, last) } else { (last + 1, q.seqs.1) }
            }
            _ => break,
        }
    }
    encoder.end(&mut chunk);
    if !chunk.is_empty() {
        let _ = tx.blocking_send(Ok(Bytes::from(chunk)));
    }
    Ok(events)
}

/// `20261122T101500Z`: sorts by time in a bucket listing.
pub(crate) fn compact_utc(ms: i64) -> String {
    auditrail_core::time::format_millis(ms)
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(15)
        .collect::<String>()
        + "Z"
}

/// The reader's chunks as a body stream.
pub(crate) struct ChunkStream(pub(crate) mpsc::Receiver<std::io::Result<Bytes>>);

impl futures_core::Stream for ChunkStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}
