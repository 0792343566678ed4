//! Native ingest: `POST /api/v1/events` (one event or a JSON array, all or nothing) and
//! `POST /api/v1/events/bulk` (NDJSON, streamed, a result per line like Elasticsearch's
//! `_bulk`). Every answer comes after the events are durable and carries their receipts.

use crate::openapi::{BulkFailure, BulkResult, ErrorBody, EventOrEvents, ReceiptOrReceipts};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::event::{ClientEvent, FieldError, PreparedEvent};
use auditrail_core::limits::EVENT_BYTES_MAX;
use auditrail_core::privacy::Filter;
use auditrail_store::Receipt;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Events per append call from the bulk endpoint: large enough to amortise a call, small
/// enough that a block stays near the store's block size target.
const BULK_CHUNK_EVENTS: usize = 512;
/// How long a bulk request may wait for ingest budget before it is answered 503.
const BUDGET_WAIT_MAX: Duration = Duration::from_secs(5);

pub fn receipt_json(r: &Receipt) -> Value {
    json!({
        "id": r.id,
        "seq": r.seq,
        "leaf_hash": hex(&r.leaf_hash),
        "duplicate": r.duplicate,
    })
}

pub use auditrail_core::hex::encode as hex;

/// Checks that the request says it carries `expected` (a media type without parameters).
pub fn require_content_type(headers: &HeaderMap, expected: &[&str]) -> Result<(), ApiError> {
    let given = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = given.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if expected.contains(&media.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("Content-Type must be {}, not {given:?}", expected.join(" or ")),
        ))
    }
}

/// Reads a whole body of at most `max` bytes.
pub async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, max);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::too_large(format!("the request body exceeds {max} bytes")))
        }
        Err(e) => Err(ApiError::bad_request("bad_body", format!("cannot read the body: {e}"))),
    }
}

fn prefix_fields(errors: Vec<FieldError>, prefix: &str) -> Vec<FieldError> {
    errors
        .into_iter()
        .map(|mut e| {
            e.field = if e.field.is_empty() {
                prefix.trim_end_matches('.').to_string()
            } else {
                format!("{prefix}{}", e.field)
            };
            e
        })
        .collect()
}

/// Refuses an event whose project the writer's key or grants do not cover.
pub fn check_project(
    v: &serde_json::Map<String, Value>,
    writable: &crate::auth::Scope,
) -> Result<(), Vec<FieldError>> {
    let project = v.get("project").and_then(Value::as_str);
    let allowed = match writable {
        crate::auth::Scope::Everywhere => true,
        crate::auth::Scope::Projects(set) => project.is_some_and(|p| set.contains(p)),
        crate::auth::Scope::Nowhere => false,
    };
    if allowed {
        return Ok(());
    }
    // A field code of `invalid_event` (listed there), not an error code of its own.
    const NOT_PERMITTED: &str = "not_permitted";
    Err(vec![FieldError {
        field: "project".into(),
        code: NOT_PERMITTED,
        message: match writable {
            // The caller's grants or key, narrowed for uploads by the import governance setting.
            crate::auth::Scope::Projects(set) => format!(
                "only events of the projects {} may be written here",
                set.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
            _ => "this caller may not write events".into(),
        },
    }])
}

/// Masks (see `auditrail_core::privacy`), validates and prepares one event given as JSON,
/// written by a caller who may write to `writable` projects.
pub fn prepare(
    v: Value,
    writable: &crate::auth::Scope,
    privacy: &Filter,
) -> Result<PreparedEvent, Vec<FieldError>> {
    if let Value::Object(m) = &v {
        check_project(m, writable)?;
    }
    // The repository's own events (purges, holds, and later logins and reads) cannot be
    // forged by a client: the audit trusts the newest `retention.purge` event it finds.
    if v.get("category").and_then(Value::as_str)
        == Some(auditrail_store::retention::REPOSITORY_CATEGORY)
    {
        // A field code of `invalid_event` (listed there), not an error code of its own.
        const INVALID_VALUE: &str = "invalid_value";
        return Err(vec![FieldError {
            field: "category".into(),
            code: INVALID_VALUE,
            message: "repository is reserved for the events auditrail records about itself".into(),
        }]);
    }
    privacy.validate(v).and_then(ClientEvent::prepare).map_err(|e| e.0)
}

/// Appends prepared events once the byte budget allows; answers 503 at once when it does not.
pub async fn append(
    state: &SharedState,
    events: Vec<PreparedEvent>,
    bytes: usize,
) -> Result<Vec<Receipt>, ApiError> {
    let permits = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    let Ok(permit) = state.ingest_budget.clone().try_acquire_many_owned(permits) else {
        state.metrics.requests_overloaded.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::busy());
    };
    // Answered by the store's syncer once durable: the request waits without holding a
    // thread (a blocking thread per request in flight cost more than the append itself).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let receipts = match state.store.try_append_then(events, move |r| {
        drop(permit);
        let _ = tx.send(r);
    }) {
        Ok(()) => match rx.await {
            Ok(r) => r.map_err(ApiError::from),
            Err(_) => Err(ApiError::from(state.store.closed())),
        },
        Err(e) => Err(ApiError::from(e)),
    };
    match &receipts {
        Ok(receipts) => count(state, receipts),
        Err(e) if e.status == StatusCode::SERVICE_UNAVAILABLE => {
            state.metrics.requests_overloaded.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {}
    }
    receipts
}

fn count(state: &SharedState, receipts: &[Receipt]) {
    let dups = receipts.iter().filter(|r| r.duplicate).count() as u64;
    state.metrics.events_duplicate.fetch_add(dups, Ordering::Relaxed);
    state.metrics.events_ingested.fetch_add(receipts.len() as u64 - dups, Ordering::Relaxed);
}

fn rejected(state: &SharedState, e: ApiError) -> ApiError {
    if e.status.is_client_error() {
        state.metrics.requests_rejected.fetch_add(1, Ordering::Relaxed);
    }
    e
}

/// `POST /api/v1/events`: one event (answer: its receipt) or an array (answer: `receipts`).
/// An array is all or nothing: one invalid event rejects the request and stores nothing.
#[utoipa::path(
    post,
    path = "/api/v1/events",
    tag = "events",
    operation_id = "events_create",
    summary = "Store one event or an array of events",
    description = "One event (a JSON object; the answer is its receipt) or a JSON array of \
events (the answer is `receipts`, in order). An array is all or nothing: one invalid event \
rejects the request and nothing is stored. The answer comes only once the events are durable. \
An event whose `id` is already stored is not stored again: its original receipt comes back \
with `duplicate: true`. Before validation, secrets and identifiers in free text are masked \
(docs/privacy.md); the stored event lists what fired in `redactions`.",
    request_body(
        content = EventOrEvents,
        content_type = "application/json",
        description = "An event or an array of events, each matching schema/event.schema.json.",
    ),
    responses(
        (status = 201, description = "Stored: a receipt for one event, `receipts` for an array.", body = ReceiptOrReceipts),
        (status = 200, description = "Every event was already stored: the original receipts.", body = ReceiptOrReceipts),
        (status = 400, description = "`invalid_json`, `wrong_type`, `empty_batch`, `invalid_event` (with `details`; in an array each `field` starts with the event's position, like `[3].actor.ip`), `bad_body` or `invalid_request`.", body = ErrorBody),
        (status = 413, description = "`too_large`: the body or the array exceeds the server's limit.", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: the Content-Type is not application/json.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
        (status = 503, description = "`overloaded` (at the ingest limit) or `read_only` (after a storage failure); nothing was stored.", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn post_events(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let writable = principal.scope(crate::auth::roles::Permission::EventsWrite);
    post_events_inner(&state, &headers, body, &writable).await.map_err(|e| rejected(&state, e))
}

async fn post_events_inner(
    state: &SharedState,
    headers: &HeaderMap,
    body: Body,
    writable: &crate::auth::Scope,
) -> Result<Response, ApiError> {
    require_content_type(headers, &["application/json"])?;
    let bytes = read_body(body, state.config.body_bytes_max).await?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request("invalid_json", format!("the body is not JSON: {e}")))?;
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ApiError::bad_request("empty_batch", "the array holds no events"));
            }
            if items.len() > state.config.batch_events_max {
                return Err(ApiError::too_large(format!(
                    "a request holds at most {} events, got {}",
                    state.config.batch_events_max,
                    items.len()
                )));
            }
            let mut prepared = Vec::with_capacity(items.len());
            let mut errors = Vec::new();
            for (i, item) in items.into_iter().enumerate() {
                match prepare(item, writable, &state.privacy) {
                    Ok(p) => prepared.push(p),
                    Err(e) => errors.extend(prefix_fields(e, &format!("[{i}]."))),
                }
            }
            if !errors.is_empty() {
                return Err(ApiError::invalid_event(errors));
            }
            let receipts = append(state, prepared, bytes.len()).await?;
            let all_duplicates = receipts.iter().all(|r| r.duplicate);
            let status = if all_duplicates { StatusCode::OK } else { StatusCode::CREATED };
            let body = json!({"receipts": receipts.iter().map(receipt_json).collect::<Vec<_>>()});
            Ok((status, axum::Json(body)).into_response())
        }
        Value::Object(_) => {
            let prepared =
                prepare(value, writable, &state.privacy).map_err(ApiError::invalid_event)?;
            let receipts = append(state, vec![prepared], bytes.len()).await?;
            let r = &receipts[0];
            let status = if r.duplicate { StatusCode::OK } else { StatusCode::CREATED };
            Ok((status, axum::Json(receipt_json(r))).into_response())
        }
        _ => Err(ApiError::bad_request(
            "wrong_type",
            "the body must be an event (a JSON object) or an array of events",
        )),
    }
}

/// The outcome of one NDJSON line.
enum Line {
    Pending { line: usize, chunk: usize, at: usize },
    Done(Value),
}

struct Bulk {
    writable: crate::auth::Scope,
    lines: Vec<Line>,
    chunk: Vec<PreparedEvent>,
    chunk_bytes: usize,
    chunks_sent: usize,
    errors: bool,
    receipts: Vec<Vec<Receipt>>,
}

impl Bulk {
    fn add_line(&mut self, privacy: &Filter, number: usize, text: &[u8]) {
        let result = if text.len() > EVENT_BYTES_MAX {
            Err(ApiError::too_large(format!("an event holds at most {EVENT_BYTES_MAX} bytes")))
        } else {
            serde_json::from_slice::<Value>(text)
                .map_err(|e| ApiError::bad_request("invalid_json", format!("not JSON: {e}")))
                .and_then(|v| {
                    if v.is_object() {
                        prepare(v, &self.writable, privacy).map_err(ApiError::invalid_event)
                    } else {
                        Err(ApiError::bad_request("wrong_type", "each line must be a JSON object"))
                    }
                })
        };
        match result {
            Ok(p) => {
                self.lines.push(Line::Pending {
                    line: number,
                    chunk: self.chunks_sent,
                    at: self.chunk.len(),
                });
                self.chunk_bytes += text.len();
                self.chunk.push(p);
            }
            Err(e) => {
                self.errors = true;
                let mut item = json!({"line": number, "status": e.status.as_u16()});
                item["error"] = e.body()["error"].clone();
                self.lines.push(Line::Done(item));
            }
        }
    }
}

/// `POST /api/v1/events/bulk`: NDJSON, one event per line, read as it streams in. Valid lines
/// are stored in order; each line gets its own result, so one bad line costs only itself.
#[utoipa::path(
    post,
    path = "/api/v1/events/bulk",
    tag = "events",
    operation_id = "events_bulk",
    summary = "Store events from NDJSON, line by line",
    description = "One event per line, read as the body streams in. Valid lines are stored in \
order; every non-blank line gets its own result (a receipt, or an error with the status it would \
have had alone), so one bad line costs only itself. The answer comes once the stored lines are \
durable. When the request fails part way (the body exceeds its limit, the log refuses writes), \
the answer carries the error and the results of the lines read before it: those stored are \
durable. Each line is masked like a single event (docs/privacy.md).",
    request_body(
        description = "NDJSON: one event per line, each matching schema/event.schema.json.",
        content(
            (String = "application/x-ndjson"),
            (String = "application/ndjson"),
            (String = "text/plain"),
        ),
    ),
    responses(
        (status = 200, description = "The body was read to its end: one item per line; `errors` says whether any line was not stored.", body = BulkResult),
        (status = 400, description = "`bad_body` or `invalid_request`; `items` lists the lines read before the failure.", body = BulkFailure),
        (status = 403, description = "`import_disabled`: governance refuses uploads of event files (with excepted projects, lines of other projects are refused one by one as `not_permitted`).", body = ErrorBody),
        (status = 413, description = "`too_large`: the body or one line exceeds its limit; `items` lists the lines read before.", body = BulkFailure),
        (status = 415, description = "`unsupported_media_type`: the Content-Type is not NDJSON.", body = ErrorBody),
        (status = 500, description = "`internal`; `items` lists the lines read before the failure.", body = BulkFailure),
        (status = 503, description = "`overloaded` or `read_only`; `items` lists the lines read before the failure, lines not appended are `not_stored`.", body = BulkFailure,
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn post_bulk(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut writable = principal.scope(crate::auth::roles::Permission::EventsWrite);
    // An uploaded file of events is an import: governance may allow it only for some projects.
    let governance = state.auth.governance();
    if governance.local_import_disabled {
        writable = writable.within(&governance.local_import_exceptions);
        if writable == crate::auth::Scope::Nowhere {
            return Err(rejected(
                &state,
                ApiError::new(
                    axum::http::StatusCode::FORBIDDEN,
                    "import_disabled",
                    "governance disables uploading files of events; send events with POST \
                     /api/v1/events, or ask for the project to be excepted",
                ),
            ));
        }
    }
    bulk_inner(&state, &headers, body, writable).await.map_err(|e| rejected(&state, e))
}

async fn bulk_inner(
    state: &SharedState,
    headers: &HeaderMap,
    body: Body,
    writable: crate::auth::Scope,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    require_content_type(headers, &["application/x-ndjson", "application/ndjson", "text/plain"])?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > state.config.bulk_bytes_max) {
        return Err(ApiError::too_large(format!(
            "a bulk body holds at most {} bytes",
            state.config.bulk_bytes_max
        )));
    }
    let mut bulk = Bulk {
        writable,
        lines: Vec::new(),
        chunk: Vec::new(),
        chunk_bytes: 0,
        chunks_sent: 0,
        errors: false,
        receipts: Vec::new(),
    };
    // One append in flight while the next chunk is parsed: parsing and the store overlap.
    let mut in_flight: Option<tokio::task::JoinHandle<Result<Vec<Receipt>, ApiError>>> = None;
    let mut body = body;
    let mut pending = Vec::<u8>::new();
    let mut total = 0usize;
    let mut line_no = 0usize;
    let mut failure: Option<ApiError> = None;
    loop {
        let frame = match body.frame().await {
            None => None,
            Some(Ok(f)) => f.into_data().ok(),
            Some(Err(e)) => {
                failure =
                    Some(ApiError::bad_request("bad_body", format!("cannot read the body: {e}")));
                break;
            }
        };
        let eof = frame.is_none();
        if let Some(data) = frame {
            total += data.len();
            if total > state.config.bulk_bytes_max {
                failure = Some(ApiError::too_large(format!(
                    "a bulk body holds at most {} bytes",
                    state.config.bulk_bytes_max
                )));
                break;
            }
            pending.extend_from_slice(&data);
        }
        // Split off every complete line (and the last one at the end of the body).
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &pending[start..]) {
            let line = &pending[start..start + nl];
            line_no += 1;
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !line.iter().all(u8::is_ascii_whitespace) {
                bulk.add_line(&state.privacy, line_no, line);
            }
            start += nl + 1;
        }
        pending.drain(..start);
        if eof && !pending.is_empty() {
            line_no += 1;
            let line = std::mem::take(&mut pending);
            if !line.iter().all(u8::is_ascii_whitespace) {
                bulk.add_line(&state.privacy, line_no, &line);
            }
        }
        if pending.len() > EVENT_BYTES_MAX + 1024 {
            failure = Some(ApiError::too_large(format!(
                "line {} is longer than an event may be ({EVENT_BYTES_MAX} bytes)",
                line_no + 1
            )));
            break;
        }
        if bulk.chunk.len() >= BULK_CHUNK_EVENTS || (eof && !bulk.chunk.is_empty()) {
            if let Some(prev) = in_flight.take() {
                match prev.await.map_err(ApiError::internal).and_then(|r| r) {
                    Ok(r) => bulk.receipts.push(r),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let events = std::mem::take(&mut bulk.chunk);
            let bytes = std::mem::take(&mut bulk.chunk_bytes);
            bulk.chunks_sent += 1;
            let s = state.clone();
            in_flight = Some(tokio::spawn(async move { append_waiting(&s, events, bytes).await }));
        }
        if eof {
            break;
        }
    }
    if let Some(prev) = in_flight.take() {
        match prev.await.map_err(ApiError::internal).and_then(|r| r) {
            Ok(r) => bulk.receipts.push(r),
            Err(e) => failure = failure.or(Some(e)),
        }
    }
    let stored = bulk.receipts.len();
    let mut items = Vec::with_capacity(bulk.lines.len());
    for line in &bulk.lines {
        items.push(match line {
            Line::Done(v) => BulkItem::Failed(v),
            Line::Pending { line, chunk, at } if *chunk < stored => {
                BulkItem::Stored(StoredLine { line: *line, receipt: &bulk.receipts[*chunk][*at] })
            }
            Line::Pending { line, .. } => {
                bulk.errors = true;
                BulkItem::NotStored(*line)
            }
        });
    }
    let errors = bulk.errors || failure.is_some();
    let took_ms = started.elapsed().as_millis() as u64;
    if let Some(e) = failure {
        // Lines appended before the failure are durable and listed with their receipts.
        let mut b = e.body();
        b["items"] = serde_json::to_value(&items).map_err(ApiError::internal)?;
        let mut response = (e.status, axum::Json(b)).into_response();
        if e.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        return Ok(response);
    }
    Ok((StatusCode::OK, axum::Json(BulkAnswer { errors, items, took_ms })).into_response())
}

/// The answer to a bulk request, written straight from the receipts: a `Value` per line cost
/// a tenth of the server's time per event in a bulk load. Members are in alphabetical order,
/// as a `Value` would write them.
#[derive(serde::Serialize)]
struct BulkAnswer<'a> {
    errors: bool,
    items: Vec<BulkItem<'a>>,
    took_ms: u64,
}

enum BulkItem<'a> {
    Stored(StoredLine<'a>),
    Failed(&'a Value),
    /// Valid, but not appended because the request failed first.
    NotStored(usize),
}

struct StoredLine<'a> {
    line: usize,
    receipt: &'a Receipt,
}

impl serde::Serialize for BulkItem<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            BulkItem::Failed(v) => v.serialize(s),
            BulkItem::NotStored(line) => json!({"line": line, "status": 503, "error": {
                "code": "not_stored",
                "message": "not stored: the request failed before this line was appended"}})
            .serialize(s),
            // The members of `receipt_json`, with the line and its status.
            BulkItem::Stored(StoredLine { line, receipt: r }) => {
                let mut m = s.serialize_map(Some(6))?;
                m.serialize_entry("duplicate", &r.duplicate)?;
                m.serialize_entry("id", &r.id)?;
                m.serialize_entry(
                    "leaf_hash",
                    &format_args!("{}", auditrail_core::hex::Hex(&r.leaf_hash)),
                )?;
                m.serialize_entry("line", line)?;
                m.serialize_entry("seq", &r.seq)?;
                m.serialize_entry("status", &if r.duplicate { 200 } else { 201 })?;
                m.end()
            }
        }
    }
}

/// Like [`append`], but a streaming bulk request waits (boundedly) for budget and for room in
/// the store's queue rather than failing at once: the client is already sending, and waiting
/// is its flow control. It also waits while the index is more than `index_lag_events_max`
/// events behind the log, so a bulk load never gets far ahead of search.
async fn append_waiting(
    state: &SharedState,
    events: Vec<PreparedEvent>,
    bytes: usize,
) -> Result<Vec<Receipt>, ApiError> {
    let lag_max = state.config.index_lag_events_max;
    if lag_max > 0 {
        let deadline = tokio::time::Instant::now() + BUDGET_WAIT_MAX;
        while state.store.stages().sequenced.saturating_sub(state.index.indexed_through()) > lag_max
        {
            if tokio::time::Instant::now() >= deadline {
                state.metrics.requests_overloaded.fetch_add(1, Ordering::Relaxed);
                return Err(ApiError::busy());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let permits = u32::try_from(bytes.max(1)).unwrap_or(u32::MAX);
    let permit = tokio::time::timeout(
        BUDGET_WAIT_MAX,
        state.ingest_budget.clone().acquire_many_owned(permits),
    )
    .await;
    let Ok(Ok(permit)) = permit else {
        state.metrics.requests_overloaded.fetch_add(1, Ordering::Relaxed);
        return Err(ApiError::busy());
    };
    let s = state.clone();
    // `append` waits while the queue is full; the queue is bounded, so the wait is too.
    let receipts = blocking(move || {
        let r = s.store.append(events).map_err(ApiError::from);
        drop(permit);
        r
    })
    .await?;
    count(state, &receipts);
    Ok(receipts)
}

#[cfg(test)]
mod bulk_answer_tests {
    use super::*;

    /// A stored line's item is a single event's receipt plus its line and status, whatever
    /// either is changed to: the two are written by different code.
    #[test]
    fn a_stored_line_is_the_receipt_with_its_line_and_status() {
        for duplicate in [false, true] {
            let r = Receipt {
                seq: 42,
                id: "a\"b".into(),
                leaf_hash: [0xab; 32],
                recorded_at_ms: 7,
                duplicate,
            };
            let item = serde_json::to_value(BulkItem::Stored(StoredLine { line: 3, receipt: &r }))
                .unwrap();
            let mut expected = receipt_json(&r);
            expected["line"] = json!(3);
            expected["status"] = json!(if duplicate { 200 } else { 201 });
            assert_eq!(item, expected);
        }
    }
}
