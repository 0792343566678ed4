//! Native queries: `GET /api/v1/events` (search, newest first, cursor pages),
//! `GET /api/v1/events/{id}` (with `?proof=inclusion`) and `GET /api/v1/events/stats`.
//! Every answer states `indexed_through`: events with a lower seq are all searchable.

use crate::openapi::{ErrorBody, EventAnswer, SearchPage, Stats};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::time::parse_rfc3339;
use auditrail_index::doc::{Field, term, words};
use auditrail_index::{GroupBy, Query};
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;

/// W3C Server Timing. A search says where it spent its time: `index` finding the seqs, `log`
/// reading the events back; every answer says its `total` (see `time_requests`).
pub(crate) const SERVER_TIMING: axum::http::HeaderName =
    axum::http::HeaderName::from_static("server-timing");

/// Query-string pairs, percent-decoded, in order.
pub fn pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let raw = raw.unwrap_or("");
    let mut out = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((decode(k)?, decode(v)?));
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, ApiError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hexd = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .and_then(|h| std::str::from_utf8(h).ok());
                let b = hexd.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| {
                    ApiError::bad_request("bad_query", "malformed percent-encoding in the query")
                })?;
                out.push(b);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request("bad_query", "the query is not UTF-8 once decoded"))
}

fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_parameter", format!("{param}: {message}"))
}

fn time_param(param: &str, v: &str) -> Result<i64, ApiError> {
    parse_rfc3339(v)
        .ok_or_else(|| bad(param, "must be an RFC 3339 date-time such as 2026-11-22T10:15:00Z"))
}

/// An opaque page cursor: the seq to continue below (or from, ascending).
fn encode_cursor(seq: u64, newest_first: bool) -> String {
    let text = format!("{}{seq}", if newest_first { 'd' } else { 'a' });
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_cursor(c: &str) -> Option<(u64, bool)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let (dir, seq) = text.split_at_checked(1)?;
    Some((seq.parse().ok()?, dir == "d"))
}

/// `GET /api/v1/events`
#[utoipa::path(
    get,
    path = "/api/v1/events",
    tag = "events",
    operation_id = "events_search",
    summary = "Search events",
    description = "Every given parameter must match (AND); each may be given once. Results come \
newest first (or oldest first with `order=asc`), a page at a time: pass `next_cursor` as \
`cursor` for the next page. Search is eventually consistent: `indexed_through` says up to which \
`seq` every event is searchable (the lag is milliseconds in normal operation).",
    params(
        ("patient" = Option<String>, Query, description = "The patient's id (`patient.id`), matched exactly; the index keeps it only as a keyed hash."),
        ("user" = Option<String>, Query, description = "The acting user (`actor.user_id`), matched exactly."),
        ("action" = Option<String>, Query, description = "The dotted action, such as `patient.read`, matched exactly."),
        ("category" = Option<String>, Query, description = "The category, such as `phi_access`, matched exactly. Without it, auditrail's own `repository` events (logins, searches, reads, changes) are left out; `category=repository` searches only them."),
        ("outcome" = Option<String>, Query, description = "`success` or `failure`."),
        ("project" = Option<String>, Query, description = "The project, matched exactly."),
        ("source" = Option<String>, Query, description = "The source system (`source.system`), matched exactly."),
        ("ip" = Option<String>, Query, description = "The actor's IP address (`actor.ip`), case-insensitive."),
        ("q" = Option<String>, Query, description = "Whole words (case-insensitive, two or more letters or digits), all of which must occur in the action, category, outcome description, actor id and name, project, purpose, entity types, ids and names, or context values; never in the patient or the request path."),
        ("from" = Option<String>, Query, format = DateTime, description = "Earliest `occurred_at`, inclusive (RFC 3339)."),
        ("to" = Option<String>, Query, format = DateTime, description = "Latest `occurred_at`, exclusive (RFC 3339)."),
        ("limit" = Option<u32>, Query, minimum = 1, description = "Page size: 1 to the server's `search_limit_max` (1000 unless configured), default 50."),
        ("order" = Option<String>, Query, description = "`desc` (newest first, the default) or `asc`."),
        ("cursor" = Option<String>, Query, description = "The `next_cursor` of the previous page, unchanged; the search must be in the same order."),
    ),
    responses(
        (status = 200, description = "A page of matching events.", body = SearchPage),
        (status = 400, description = "`bad_query`, `invalid_parameter` (the message names the parameter) or `unknown_parameter`.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn search(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let params = pairs(raw.as_deref())?;
    let view = crate::auth::EventView::of(&principal);
    let (q, cursor) = search_query(&state, &view, &params, Paging::Pages)?;
    let mut q = q;
    if let Some((seq, newest_first)) = cursor {
        if newest_first != q.newest_first {
            return Err(bad("cursor", "belongs to a search in the other order"));
        }
        q.seqs = if newest_first { (0, seq) } else { (seq + 1, u64::MAX) };
    }
    state.metrics.searches.fetch_add(1, Ordering::Relaxed);
    // Answered on this async thread when it is quick: the index for at most a millisecond,
    // then the page's blocks if they are in memory and few. Handing every lookup to a
    // blocking thread and back cost two wake-ups, each one a chance to wait for a core on a
    // busy machine (a patient lookup's p99 fell by half without them). Anything longer, or
    // waiting for the disk, goes on a blocking thread.
    let indexed_through = state.index.indexed_through();
    let started = std::time::Instant::now();
    let hits = match state.index.search_until(&q, Some(started + INLINE_SEARCH_BUDGET)) {
        Ok(hits) => hits,
        Err(unfinished) => {
            let s = state.clone();
            blocking(move || Ok(unfinished.finish(&s.index))).await?
        }
    };
    let searched = started.elapsed();
    let stored = match state.blocks.read_stored_in_memory(&state.index, &hits.seqs)? {
        Some(stored) => stored,
        None => {
            let (s, seqs) = (state.clone(), hits.seqs.clone());
            blocking(move || s.read_stored(&seqs)).await?
        }
    };
    let next = (hits.more)
        .then(|| hits.seqs.last().map(|&seq| encode_cursor(seq, q.newest_first)))
        .flatten();
    // Stored events are JSON already: copied into the answer as they are, not re-encoded.
    let mut body = Vec::with_capacity(hits.seqs.len() * 640 + 96);
    body.extend_from_slice(b"{\"events\":[");
    for (i, stored) in stored.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        view.write_json(stored, &mut body)?;
    }
    body.extend_from_slice(
        format!("],\"indexed_through\":{indexed_through},\"next_cursor\":{}}}", json!(next))
            .as_bytes(),
    );
    let read = started.elapsed() - searched;
    let timing = format!(
        "index;dur={:.3}, log;dur={:.3}",
        searched.as_secs_f64() * 1e3,
        read.as_secs_f64() * 1e3
    );
    Ok((
        [
            (axum::http::header::CONTENT_TYPE, "application/json".to_string()),
            (SERVER_TIMING, timing),
        ],
        body,
    )
        .into_response())
}

/// How long a search may use the index on an async thread before the rest of it is handed
/// to a blocking thread ([`auditrail_index::Index::search_until`]).
const INLINE_SEARCH_BUDGET: std::time::Duration = std::time::Duration::from_millis(1);

/// Whether a search is read a page at a time (`limit`, `cursor`; newest first by default) or
/// whole (an export: oldest first by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    Pages,
    All,
}

/// The index query the search parameters ask for, limited to what `view` may see, and the
/// decoded `cursor` if one was given.
pub fn search_query(
    state: &SharedState,
    view: &crate::auth::EventView,
    params: &[(String, String)],
    paging: Paging,
) -> Result<(Query, Option<(u64, bool)>), ApiError> {
    let requested = params.iter().find(|(k, _)| k == "project").map(|(_, v)| v.as_str());
    let project_filter = view.project_filter(requested)?;
    let index = &state.index;
    let mut q = Query { limit: 50, newest_first: paging == Paging::Pages, ..Query::default() };
    let mut cursor = None;
    let mut seen = std::collections::HashSet::new();
    for (k, v) in params {
        if !seen.insert(k.as_str()) {
            return Err(bad(k, "may be given once"));
        }
        if v.is_empty() {
            return Err(bad(k, "must not be empty"));
        }
        let field = match k.as_str() {
            "patient" => {
                q.all_of.push(vec![index.patients().term(v)]);
                continue;
            }
            "user" => Field::User,
            "action" => Field::Action,
            "category" => Field::Category,
            "outcome" => {
                if v != "success" && v != "failure" {
                    return Err(bad(k, "must be success or failure"));
                }
                Field::Outcome
            }
            "project" => Field::Project,
            "source" => Field::Source,
            "ip" => {
                q.all_of.push(vec![term(Field::Address, &v.to_ascii_lowercase())]);
                continue;
            }
            "q" => {
                let mut any = false;
                words(v, |w| {
                    any = true;
                    q.all_of.push(vec![term(Field::Text, w)]);
                });
                if !any {
                    return Err(bad(k, "needs at least one word of two or more letters or digits"));
                }
                continue;
            }
            "from" => {
                q.occurred.0 = time_param(k, v)?;
                continue;
            }
            "to" => {
                q.occurred.1 = time_param(k, v)?;
                continue;
            }
            "limit" | "cursor" if paging == Paging::All => {
                return Err(ApiError::unknown_parameter(k));
            }
            "limit" => {
                let n: usize = v.parse().map_err(|_| bad(k, "must be a whole number"))?;
                if n == 0 || n > state.config.search_limit_max {
                    return Err(bad(k, format!("must be 1 to {}", state.config.search_limit_max)));
                }
                q.limit = n;
                continue;
            }
            "order" => {
                q.newest_first = match v.as_str() {
                    "desc" => true,
                    "asc" => false,
                    _ => return Err(bad(k, "must be desc or asc")),
                };
                continue;
            }
            "cursor" => {
                cursor = Some(
                    decode_cursor(v).ok_or_else(|| bad(k, "is not a cursor this server issued"))?,
                );
                continue;
            }
            _ => {
                return Err(ApiError::unknown_parameter(k));
            }
        };
        q.all_of.push(vec![term(field, v)]);
    }
    if q.occurred.0 >= q.occurred.1 {
        return Err(bad("from", "must be before to"));
    }
    if let Some(projects) = project_filter {
        q.all_of.push(projects.iter().map(|p| term(Field::Project, p)).collect());
    }
    // The repository's record of its own use is searched by asking for its category.
    if !params.iter().any(|(k, _)| k == "category") {
        q.all_of.push(vec![term(Field::Stream, auditrail_index::doc::CLIENT_STREAM)]);
    }
    Ok((q, cursor))
}

/// Finds the stored event with this `id` (hash candidates, compared after reading). When the
/// only candidates were purged by retention, answers 410 `purged` with the proof that an
/// event stood there: its id can no longer be compared, so that answer holds for any id with
/// the same 32-bit hash.
pub fn find_by_id(state: &SharedState, id: &str) -> Result<Option<Value>, ApiError> {
    let purged = state.store.purged();
    let mut purged_candidate = None;
    for seq in state.index.id_candidates(id) {
        if let Some(p) = purged.find(seq) {
            purged_candidate = Some((seq, p.clone()));
            continue;
        }
        let event = state.read_event(seq)?;
        if event.get("id").and_then(Value::as_str) == Some(id) {
            return Ok(Some(event));
        }
    }
    match purged_candidate {
        Some((seq, p)) => Err(purged_error(state, seq, &p)),
        None => Ok(None),
    }
}

/// 410 `purged`, with the leaf hash and an inclusion proof of `seq` in the newest checkpoint.
pub fn purged_error(
    state: &SharedState,
    seq: u64,
    p: &auditrail_store::retention::PurgedSegment,
) -> ApiError {
    let b64 = |h: &[u8]| base64::engine::general_purpose::STANDARD.encode(h);
    let mut detail = json!({
        "seq": seq,
        "purged_at": auditrail_core::time::format_millis(p.purged_at_ms),
        "segment": {"first_seq": p.first_seq, "end_seq": p.end_seq},
    });
    match state.store.leaf_entry(seq) {
        Ok(entry) => {
            detail["leaf_hash"] = json!(b64(&auditrail_core::merkle::leaf_hash(&entry.encode())));
            detail["recorded_at"] =
                json!(auditrail_core::time::format_millis(entry.recorded_at_ms as i64));
        }
        Err(e) => return ApiError::internal(e),
    }
    match inclusion_proof_json(state, seq, None) {
        Ok(proof) => detail["proof"] = proof,
        Err(e) => return e,
    }
    let mut e = ApiError::new(
        axum::http::StatusCode::GONE,
        "purged",
        format!(
            "the event at seq {seq} was purged by retention; the proof shows it existed in the log"
        ),
    );
    e.extra = Some(("purged", detail));
    e
}

/// `GET /api/v1/events/{id}` and `?proof=inclusion`.
#[utoipa::path(
    get,
    path = "/api/v1/events/{id}",
    tag = "events",
    operation_id = "events_get",
    summary = "Read one event, optionally with its inclusion proof",
    description = "The stored event with this `id`, once it is indexed. With \
`proof=inclusion`, also an RFC 6962 inclusion proof against the newest signed checkpoint; an \
event newer than that checkpoint (published at least once a second while the log grows) is \
answered 409 until it is published.",
    params(
        ("id" = String, Path, description = "The event's id, as in its receipt."),
        ("proof" = Option<String>, Query, description = "`inclusion` to add an inclusion proof."),
    ),
    responses(
        (status = 200, description = "The event (and the proof when asked for).", body = EventAnswer),
        (status = 400, description = "`bad_query`, `invalid_parameter` or `unknown_parameter`.", body = ErrorBody),
        (status = 404, description = "`not_found`: no indexed event has this id.", body = ErrorBody),
        (status = 410, description = "`purged`: retention purged the event; `error.purged` holds its seq, leaf hash and an inclusion proof that it existed.", body = ErrorBody),
        (status = 409, description = "`not_yet_published`: the event is not in a published checkpoint yet; retry in a second.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn get_event(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut proof = false;
    for (k, v) in pairs(raw.as_deref())? {
        match (k.as_str(), v.as_str()) {
            ("proof", "inclusion") => proof = true,
            ("proof", _) => return Err(bad("proof", "must be inclusion")),
            _ => {
                return Err(ApiError::unknown_parameter(&k));
            }
        }
    }
    let s = state.clone();
    blocking(move || {
        let indexed_through = s.index.indexed_through();
        let view = crate::auth::EventView::of(&principal);
        // An event outside the caller's projects is answered as if it did not exist.
        let event = find_by_id(&s, &id)?.and_then(|mut e| view.apply(&mut e).then_some(e));
        let event = event.ok_or_else(|| {
            ApiError::not_found(format!(
                "no event with id {id:?} among the {indexed_through} indexed"
            ))
        })?;
        let mut body = json!({"event": event, "indexed_through": indexed_through});
        if proof {
            let seq = event["seq"]
                .as_u64()
                .ok_or_else(|| ApiError::internal("stored event without seq"))?;
            body["proof"] = inclusion_proof_json(&s, seq, None)?;
        }
        Ok(axum::Json(body).into_response())
    })
    .await
}

/// An inclusion proof of `seq` against the checkpoint of `size` (default: the newest). When
/// the event is newer than the newest checkpoint, says so instead (retry after publication).
pub fn inclusion_proof_json(
    state: &SharedState,
    seq: u64,
    size: Option<u64>,
) -> Result<Value, ApiError> {
    let published = state.store.stages().published;
    if let Some(size) = size
        && seq >= size
    {
        return Err(bad("tree_size", format!("must be larger than the seq ({seq}) to prove")));
    }
    let size = size.unwrap_or(published);
    if seq >= size {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "not_yet_published",
            format!(
                "seq {seq} is not in a published checkpoint yet (published size {published}); retry in a second"
            ),
        ));
    }
    let hashes = state.store.inclusion_proof(seq, size)?;
    let checkpoint = state.store.checkpoint(Some(size))?;
    let b64 = |h: &[u8]| base64::engine::general_purpose::STANDARD.encode(h);
    Ok(json!({
        "leaf_index": seq,
        "tree_size": size,
        "hashes": hashes.iter().map(|h| b64(h)).collect::<Vec<_>>(),
        "checkpoint": checkpoint,
    }))
}

/// `GET /api/v1/events/stats?group_by=&from=&to=`
#[utoipa::path(
    get,
    path = "/api/v1/events/stats",
    tag = "events",
    operation_id = "events_stats",
    summary = "Count events per action, user, outcome or category",
    description = "Counts of indexed events per value of one field, largest first, optionally \
within a range of `occurred_at`.",
    params(
        ("group_by" = String, Query, description = "`action`, `user`, `outcome` or `category`."),
        ("from" = Option<String>, Query, format = DateTime, description = "Earliest `occurred_at`, inclusive (RFC 3339)."),
        ("to" = Option<String>, Query, format = DateTime, description = "Latest `occurred_at`, exclusive (RFC 3339)."),
    ),
    responses(
        (status = 200, description = "The counts.", body = Stats),
        (status = 400, description = "`bad_query`, `invalid_parameter` or `unknown_parameter`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the caller may read only some projects.", body = ErrorBody),
        (status = 500, description = "`internal`.", body = ErrorBody),
    )
)]
pub async fn stats(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    if !crate::auth::EventView::of(&principal).reads_everywhere() {
        return Err(crate::auth::forbidden(
            "counts cover every project: they need events:read in every project",
        ));
    }
    let mut group = None;
    let (mut from, mut to) = (i64::MIN, i64::MAX);
    for (k, v) in pairs(raw.as_deref())? {
        match k.as_str() {
            "group_by" => {
                group =
                    Some(GroupBy::parse(&v).ok_or_else(|| {
                        bad("group_by", "must be action, user, outcome or category")
                    })?)
            }
            "from" => from = time_param("from", &v)?,
            "to" => to = time_param("to", &v)?,
            _ => {
                return Err(ApiError::unknown_parameter(&k));
            }
        }
    }
    let group = group.ok_or_else(|| bad("group_by", "is required"))?;
    if from >= to {
        return Err(bad("from", "must be before to"));
    }
    let s = state.clone();
    blocking(move || {
        let indexed_through = s.index.indexed_through();
        let counts = s.index.stats(group, from, to);
        let total: u64 = counts.iter().map(|c| c.1).sum();
        let groups: Vec<Value> =
            counts.into_iter().map(|(k, n)| json!({"key": k, "count": n})).collect();
        Ok(axum::Json(
            json!({"groups": groups, "total": total, "indexed_through": indexed_through}),
        )
        .into_response())
    })
    .await
}
