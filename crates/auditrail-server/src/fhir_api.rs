//! The FHIR R4 Audit Record Repository (IHE ATNA/BALP: ITI-20 feed, ITI-81 retrieve) under
//! `/fhir`. The mapping between AuditEvents and native events is `auditrail_core::fhir`
//! (documented in docs/fhir.md); this module is the HTTP side. Every error is an
//! OperationOutcome.

use crate::ingest::{append, read_body, require_content_type};
use crate::openapi::OperationOutcome;
use crate::openapi::{AuditEvent, AuditEventOrOutcome, Bundle, CapabilityStatement};
use crate::query::{find_by_id, pairs};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::event::{ClientEvent, InvalidEvent};
use auditrail_core::fhir::{self, Issue, Search, Sort};
use auditrail_core::time::format_millis;
use auditrail_index::Query;
use auditrail_index::doc::{fhir_tag, tagged};
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
/// Date-sorted searches are sorted exactly when at most this many events match; beyond it
/// they come in recording order (which differs only where clocks disagree) with a note.
const DATE_SORT_MATCHES_MAX: usize = 10_000;

/// An error answered as an OperationOutcome.
#[derive(Debug)]
pub struct FhirError {
    pub status: StatusCode,
    pub issues: Vec<Issue>,
}

impl FhirError {
    pub fn new(status: StatusCode, code: &'static str, diagnostics: impl Into<String>) -> Self {
        FhirError { status, issues: vec![Issue::error(code, diagnostics, "")] }
    }
}

impl From<ApiError> for FhirError {
    fn from(e: ApiError) -> FhirError {
        let code = match e.status {
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::GONE => "deleted",
            StatusCode::PAYLOAD_TOO_LARGE => "too-costly",
            StatusCode::SERVICE_UNAVAILABLE => "transient",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "not-supported",
            s if s.is_server_error() => "exception",
            _ => "invalid",
        };
        let mut issues = vec![Issue::error(code, format!("{} ({})", e.message, e.code), "")];
        for d in &e.details {
            issues.push(Issue::error(
                "invalid",
                format!("{}: {} ({})", d.field, d.message, d.code),
                &d.field,
            ));
        }
        FhirError { status: e.status, issues }
    }
}

impl IntoResponse for FhirError {
    fn into_response(self) -> Response {
        let mut r = fhir_json(self.status, &fhir::operation_outcome(&self.issues));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

fn fhir_json(status: StatusCode, body: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, FHIR_JSON)], body.to_string()).into_response()
}

/// The base URL clients used, for `Location`, `fullUrl` and links.
/// The FHIR base URL: the configured `public_url` (right behind a TLS proxy), else `https://`
/// (`http://` without TLS) plus the request's `Host`.
pub(crate) fn base_url(state: &SharedState, headers: &HeaderMap) -> String {
    if !state.config.public_url.is_empty() {
        return format!("{}/fhir", state.config.public_url.trim_end_matches('/'));
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
    let scheme = if state.config.tls_enabled() { "https" } else { "http" };
    format!("{scheme}://{host}/fhir")
}

fn require_fhir_json(headers: &HeaderMap) -> Result<(), FhirError> {
    require_content_type(headers, &["application/fhir+json", "application/json"])
        .map_err(FhirError::from)
}

fn parse_resource(bytes: &[u8]) -> Result<Value, FhirError> {
    serde_json::from_slice(bytes).map_err(|e| {
        FhirError::new(StatusCode::BAD_REQUEST, "structure", format!("the body is not JSON: {e}"))
    })
}

/// A received AuditEvent ready to append: the prepared event, its native fields (to answer
/// with its stored view) and the warnings it is stored with.
type Mapped = (auditrail_core::event::PreparedEvent, Map<String, Value>, Vec<Issue>);

/// Masks one received AuditEvent (see `auditrail_core::privacy`), then maps it to a prepared
/// native event plus its warnings. Masking comes first, so the native fields mapped from the
/// resource, the warnings and the stored resource all see only the masked text.
fn map_audit_event(
    resource: &Value,
    at: &str,
    writable: &crate::auth::Scope,
    privacy: &auditrail_core::privacy::Filter,
) -> Result<Mapped, Vec<Issue>> {
    let mut resource = resource.clone();
    let redactions = privacy.mask_audit_event(&mut resource);
    let (map, warnings) = fhir::to_canonical(&resource).map_err(|issues| prefix(issues, at))?;
    let invalid = |e: InvalidEvent| {
        e.0.iter()
            .map(|f| {
                Issue::error("invalid", format!("{}: {} ({})", f.field, f.message, f.code), at)
            })
            .collect::<Vec<_>>()
    };
    crate::ingest::check_project(&map, writable).map_err(|e| invalid(InvalidEvent(e)))?;
    let event =
        ClientEvent::validate(Value::Object(map)).map_err(invalid)?.with_redactions(&redactions);
    let map = event.fields().clone();
    let prepared = event.prepare().map_err(invalid)?;
    Ok((prepared, map, warnings))
}

fn prefix(issues: Vec<Issue>, at: &str) -> Vec<Issue> {
    if at.is_empty() {
        return issues;
    }
    issues
        .into_iter()
        .map(|mut i| {
            i.expression = Some(match i.expression {
                Some(e) if !e.is_empty() => format!("{at}.{}", e.trim_start_matches("AuditEvent.")),
                _ => at.to_string(),
            });
            i
        })
        .collect()
}

/// The stored form of a just-appended event, for answering with its FHIR view.
fn stored_view(mut map: Map<String, Value>, receipt: &auditrail_store::Receipt) -> Value {
    map.insert("id".into(), json!(receipt.id));
    map.insert("seq".into(), json!(receipt.seq));
    if receipt.recorded_at_ms > 0 {
        map.insert("recorded_at".into(), json!(format_millis(receipt.recorded_at_ms as i64)));
    }
    Value::Object(map)
}

fn prefers_outcome(headers: &HeaderMap) -> Option<bool> {
    let prefer = headers.get("prefer").and_then(|v| v.to_str().ok())?;
    if prefer.contains("return=OperationOutcome") {
        Some(true)
    } else if prefer.contains("return=representation") {
        Some(false)
    } else {
        None
    }
}

/// `POST /fhir/AuditEvent` (ITI-20): stores the AuditEvent as received. Non-conformance never
/// rejects it (BALP); warnings come back as an OperationOutcome, otherwise the stored resource.
#[utoipa::path(
    post,
    path = "/fhir/AuditEvent",
    tag = "fhir",
    operation_id = "fhir_create",
    summary = "Record an AuditEvent (IHE ITI-20)",
    description = "Stores the AuditEvent as received, never rejecting it for profile \
non-conformance (BALP); only a resource that cannot be mapped to an event is refused. The \
answer is the stored resource (with `id` and `meta.lastUpdated`), or, when the resource drew \
warnings or with `Prefer: return=OperationOutcome`, an OperationOutcome listing them; \
`Prefer: return=representation` always returns the resource. The answer comes once the event \
is durable. Secrets and identifiers in free text are masked before anything else \
(docs/privacy.md); the stored resource then carries the security label `REDACTED` and one \
`https://auditrail.dev/fhir/StructureDefinition/redaction` extension per masked field.",
    params(
        ("Prefer" = Option<String>, Header, description = "`return=representation` or `return=OperationOutcome`."),
    ),
    request_body(
        description = "A FHIR R4 AuditEvent.",
        content((AuditEvent = "application/fhir+json"), (AuditEvent = "application/json")),
    ),
    responses(
        (status = 201, description = "Stored.", body = AuditEventOrOutcome, content_type = "application/fhir+json",
            headers(
                ("Location" = String, description = "`<base>/AuditEvent/<id>/_history/1`."),
                ("ETag" = String, description = "Always `W/\"1\"`: AuditEvents have one version."),
            )),
        (status = 200, description = "An event with this id was already stored; the answer describes the stored one.", body = AuditEventOrOutcome, content_type = "application/fhir+json",
            headers(
                ("Location" = String, description = "`<base>/AuditEvent/<id>/_history/1`."),
                ("ETag" = String, description = "Always `W/\"1\"`."),
            )),
        (status = 400, description = "Not JSON, or not mappable to an event.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 413, description = "The body exceeds the server's limit.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 415, description = "The Content-Type is not application/fhir+json or application/json.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 500, description = "The server failed.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "Overloaded, or the log refuses writes after a storage failure.", body = OperationOutcome, content_type = "application/fhir+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn create(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    require_fhir_json(&headers)?;
    let bytes = read_body(body, state.config.body_bytes_max).await?;
    let resource = parse_resource(&bytes)?;
    let writable = principal.scope(crate::auth::roles::Permission::EventsWrite);
    let (prepared, map, warnings) = map_audit_event(&resource, "", &writable, &state.privacy)
        .map_err(|issues| FhirError { status: StatusCode::BAD_REQUEST, issues })?;
    let receipts = append(&state, vec![prepared], bytes.len()).await?;
    let r = &receipts[0];
    let base = base_url(&state, &headers);
    let location = format!("{base}/AuditEvent/{}/_history/1", r.id);
    let body = if prefers_outcome(&headers).unwrap_or(!warnings.is_empty()) {
        let mut issues = warnings;
        issues.push(Issue::new_information(format!("stored as AuditEvent/{}", r.id)));
        fhir::operation_outcome(&issues)
    } else {
        fhir::to_audit_event(&stored_view(map, r))
    };
    let status = if r.duplicate { StatusCode::OK } else { StatusCode::CREATED };
    let mut response = fhir_json(status, &body);
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response.headers_mut().insert(header::ETAG, HeaderValue::from_static("W/\"1\""));
    Ok(response)
}

/// `POST /fhir`: a `batch` or `transaction` Bundle of AuditEvent creates. Checked whole before
/// anything is stored: an entry that is not an AuditEvent create rejects the Bundle.
#[utoipa::path(
    post,
    path = "/fhir",
    tag = "fhir",
    operation_id = "fhir_bundle",
    summary = "Record a batch or transaction Bundle of AuditEvents (IHE ITI-20)",
    description = "A `batch` or `transaction` Bundle whose entries are AuditEvent creates \
(`request.method` POST, `request.url` AuditEvent, or no `request`). The Bundle is checked whole \
first: an entry that is not an AuditEvent create rejects it and nothing is stored. The answer is \
a `batch-response` or `transaction-response` Bundle with one entry per AuditEvent, sent once \
they are durable.",
    request_body(
        description = "A FHIR R4 Bundle of type batch or transaction.",
        content((Bundle = "application/fhir+json"), (Bundle = "application/json")),
    ),
    responses(
        (status = 200, description = "Every entry stored (or already stored).", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "Not a batch or transaction Bundle of AuditEvent creates, or an entry is not mappable; nothing was stored.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 413, description = "The body or the number of entries exceeds the server's limit.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 415, description = "The Content-Type is not application/fhir+json or application/json.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 500, description = "The server failed.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 503, description = "Overloaded, or the log refuses writes after a storage failure.", body = OperationOutcome, content_type = "application/fhir+json",
            headers(("Retry-After" = u64, description = "Seconds to wait before retrying."))),
    )
)]
pub async fn bundle(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, FhirError> {
    let writable = principal.scope(crate::auth::roles::Permission::EventsWrite);
    require_fhir_json(&headers)?;
    let bytes = read_body(body, state.config.body_bytes_max).await?;
    let bundle = parse_resource(&bytes)?;
    let bad = |code, msg: String, at: &str| FhirError {
        status: StatusCode::BAD_REQUEST,
        issues: vec![Issue::error(code, msg, at)],
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(bad("not-supported", "POST /fhir takes a Bundle".into(), "resourceType"));
    }
    let kind = bundle.get("type").and_then(Value::as_str).unwrap_or("");
    let response_type = match kind {
        "batch" => "batch-response",
        "transaction" => "transaction-response",
        _ => {
            return Err(bad(
                "value",
                format!("Bundle.type must be batch or transaction, not {kind:?}"),
                "Bundle.type",
            ));
        }
    };
    let entries = match bundle.get("entry") {
        None => Vec::new(),
        Some(Value::Array(e)) => e.clone(),
        Some(_) => {
            return Err(bad("structure", "Bundle.entry must be an array".into(), "Bundle.entry"));
        }
    };
    if entries.len() > state.config.batch_events_max {
        return Err(FhirError::from(ApiError::too_large(format!(
            "a Bundle holds at most {} entries",
            state.config.batch_events_max
        ))));
    }
    let mut prepared = Vec::with_capacity(entries.len());
    let mut maps = Vec::with_capacity(entries.len());
    let mut warnings = Vec::with_capacity(entries.len());
    let mut errors = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("Bundle.entry[{i}]");
        let resource = entry.get("resource").unwrap_or(&Value::Null);
        if resource.get("resourceType").and_then(Value::as_str) != Some("AuditEvent") {
            errors.push(Issue::error(
                "not-supported",
                "this repository stores only AuditEvent resources",
                &format!("{at}.resource"),
            ));
            continue;
        }
        if let Some(request) = entry.get("request") {
            let method = request.get("method").and_then(Value::as_str).unwrap_or("");
            let url = request.get("url").and_then(Value::as_str).unwrap_or("AuditEvent");
            if method != "POST" || url.trim_start_matches('/') != "AuditEvent" {
                errors.push(Issue::error(
                    "not-supported",
                    format!("only POST AuditEvent is supported, not {method} {url}"),
                    &format!("{at}.request"),
                ));
                continue;
            }
        }
        match map_audit_event(resource, &format!("{at}.resource"), &writable, &state.privacy) {
            Ok((p, m, w)) => {
                prepared.push(p);
                maps.push(m);
                warnings.push(w);
            }
            Err(issues) => errors.extend(issues),
        }
    }
    if !errors.is_empty() {
        return Err(FhirError { status: StatusCode::BAD_REQUEST, issues: errors });
    }
    let receipts = if prepared.is_empty() {
        Vec::new()
    } else {
        append(&state, prepared, bytes.len()).await?
    };
    let base = base_url(&state, &headers);
    let out: Vec<Value> = receipts
        .iter()
        .zip(maps)
        .zip(warnings)
        .map(|((r, map), w)| {
            let view = fhir::to_audit_event(&stored_view(map, r));
            let mut response = json!({
                "status": if r.duplicate { "200 OK" } else { "201 Created" },
                "location": format!("AuditEvent/{}/_history/1", r.id),
                "etag": "W/\"1\"",
            });
            if let Some(t) = view.pointer("/meta/lastUpdated") {
                response["lastModified"] = t.clone();
            }
            if !w.is_empty() {
                response["outcome"] = fhir::operation_outcome(&w);
            }
            json!({"fullUrl": format!("{base}/AuditEvent/{}", r.id), "resource": view, "response": response})
        })
        .collect();
    Ok(fhir_json(
        StatusCode::OK,
        &json!({"resourceType": "Bundle", "type": response_type, "entry": out}),
    ))
}

/// `GET /fhir/AuditEvent/{id}`
#[utoipa::path(
    get,
    path = "/fhir/AuditEvent/{id}",
    tag = "fhir",
    operation_id = "fhir_read",
    summary = "Read an AuditEvent (IHE ITI-81)",
    description = "The stored event with this id, as a FHIR AuditEvent, once it is indexed.",
    params(("id" = String, Path, description = "The AuditEvent's id.")),
    responses(
        (status = 200, description = "The AuditEvent.", body = AuditEvent, content_type = "application/fhir+json",
            headers(("ETag" = String, description = "Always `W/\"1\"`."))),
        (status = 404, description = "No indexed AuditEvent has this id.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 410, description = "Retention purged this AuditEvent (issue code `deleted`).", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 500, description = "The server failed.", body = OperationOutcome, content_type = "application/fhir+json"),
    )
)]
pub async fn read(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    Path(id): Path<String>,
) -> Result<Response, FhirError> {
    let s = state.clone();
    let view = crate::auth::EventView::of(&principal);
    // An event outside the caller's projects is answered as unknown.
    let found = blocking(move || {
        find_by_id(&s, &id).map(|e| e.and_then(|mut e| view.apply(&mut e).then_some(e)).ok_or(id))
    })
    .await?;
    match found {
        Ok(event) => {
            let mut r = fhir_json(StatusCode::OK, &fhir::to_audit_event(&event));
            r.headers_mut().insert(header::ETAG, HeaderValue::from_static("W/\"1\""));
            Ok(r)
        }
        Err(id) => Err(FhirError::new(
            StatusCode::NOT_FOUND,
            "not-found",
            format!("AuditEvent/{id} is not known"),
        )),
    }
}

/// PUT, PATCH and DELETE: an audit repository never changes or removes what it stored. Its seven
/// operations are written into the OpenAPI document by `openapi::ImmutableAuditEvents`.
pub async fn not_allowed() -> FhirError {
    FhirError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "not-supported",
        "AuditEvents are immutable: update, patch and delete are not supported",
    )
}

/// Any resource type other than AuditEvent.
pub async fn unknown_type(Path(path): Path<String>) -> FhirError {
    let kind = path.split('/').next().unwrap_or("");
    FhirError::new(
        StatusCode::NOT_FOUND,
        "not-supported",
        format!("this server holds only AuditEvent resources, not {kind:?}"),
    )
}

/// `GET /fhir/metadata`
#[utoipa::path(
    get,
    path = "/fhir/metadata",
    tag = "fhir",
    operation_id = "fhir_metadata",
    summary = "The CapabilityStatement",
    description = "What this server supports: AuditEvent create, read and search, batch and \
transaction, the search parameters, and the BALP profiles (IHE BALP Audit Record Repository).",
    responses((status = 200, description = "The CapabilityStatement.", body = CapabilityStatement, content_type = "application/fhir+json"))
)]
pub async fn metadata(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    fhir_json(
        StatusCode::OK,
        &fhir::capability_statement(&base_url(&state, &headers), env!("CARGO_PKG_VERSION")),
    )
}

fn encode_cursor(text: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

fn decode_cursor(c: &str) -> Option<(char, u64)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(c).ok()?;
    let text = std::str::from_utf8(&bytes).ok()?;
    let kind = text.chars().next()?;
    Some((kind, text[kind.len_utf8()..].parse().ok()?))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Builds the index query for a parsed FHIR search.
fn to_query(state: &SharedState, search: &Search) -> Result<Query, FhirError> {
    let mut q = Query { limit: search.count, ..Query::default() };
    for any in &search.all_of {
        let tag = fhir_tag(any.param);
        let terms = any
            .values
            .iter()
            .map(|v| {
                if any.param.carries_phi() {
                    state.index.patients().blind(tag, v)
                } else {
                    tagged(tag, v)
                }
            })
            .collect();
        q.all_of.push(terms);
    }
    for b in &search.date {
        q.occurred = (q.occurred.0.max(b.lo_ms), q.occurred.1.min(b.hi_ms));
    }
    for b in &search.last_updated {
        q.recorded = (q.recorded.0.max(b.lo_ms), q.recorded.1.min(b.hi_ms));
    }
    if !search.ids.is_empty() {
        let mut within: Option<std::collections::BTreeSet<u64>> = None;
        for group in &search.ids {
            let mut seqs = std::collections::BTreeSet::new();
            for id in group {
                for seq in state.index.id_candidates(id) {
                    let event = state.read_event(seq)?;
                    if event.get("id").and_then(Value::as_str) == Some(id.as_str()) {
                        seqs.insert(seq);
                    }
                }
            }
            within = Some(match within {
                None => seqs,
                Some(w) => w.intersection(&seqs).copied().collect(),
            });
        }
        q.within = within.map(|w| w.into_iter().collect());
    }
    q.newest_first = matches!(search.sort, Sort::LastUpdatedDesc | Sort::DateDesc);
    Ok(q)
}

/// `GET /fhir/AuditEvent?...` (ITI-81): a searchset Bundle with `total` and paging links.
#[utoipa::path(
    get,
    path = "/fhir/AuditEvent",
    tag = "fhir",
    operation_id = "fhir_search",
    summary = "Search AuditEvents (IHE ITI-81)",
    description = "Every parameter must match (AND); comma-separated values of one parameter \
are alternatives (OR); `date` and `_lastUpdated` may be repeated to bound a range. Unknown \
parameters and modifiers are errors, so a search never returns more than was asked for. The \
answer is a `searchset` Bundle with `total` and `self`/`next` links. Semantics: docs/fhir.md.",
    // The search parameters are added by `openapi::FhirSearchParameters` from the
    // CapabilityStatement, the list the parser agrees with.
    responses(
        (status = 200, description = "A searchset Bundle.", body = Bundle, content_type = "application/fhir+json"),
        (status = 400, description = "An unknown parameter or modifier, or a bad value.", body = OperationOutcome, content_type = "application/fhir+json"),
        (status = 500, description = "The server failed.", body = OperationOutcome, content_type = "application/fhir+json"),
    )
)]
pub async fn search(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<crate::auth::Principal>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, FhirError> {
    let params = pairs(raw.as_deref())?;
    let view = crate::auth::EventView::of(&principal);
    let projects = view.project_filter(None)?;
    let search = fhir::parse_search(&params)
        .map_err(|issues| FhirError { status: StatusCode::BAD_REQUEST, issues })?;
    let base = base_url(&state, &headers);
    state.metrics.searches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let s = state.clone();
    // Run off the async workers, keeping the OperationOutcome (and its status) of a failure.
    let body = tokio::task::spawn_blocking(move || {
        search_bundle(&s, &search, &params, &base, &view, projects)
    })
    .await
    .map_err(|e| FhirError::from(ApiError::internal(e)))??;
    Ok(fhir_json(StatusCode::OK, &body))
}

fn search_bundle(
    state: &SharedState,
    search: &Search,
    params: &[(String, String)],
    base: &str,
    view: &crate::auth::EventView,
    projects: Option<Vec<String>>,
) -> Result<Value, FhirError> {
    let mut q = to_query(state, search)?;
    // The repository's own events are searched natively (`category=repository`).
    q.all_of.push(vec![auditrail_index::doc::term(
        auditrail_index::doc::Field::Stream,
        auditrail_index::doc::CLIENT_STREAM,
    )]);
    if let Some(projects) = projects {
        q.all_of.push(
            projects
                .iter()
                .map(|p| auditrail_index::doc::term(auditrail_index::doc::Field::Project, p))
                .collect(),
        );
    }
    let total = state.index.count(&q);
    let by_date = matches!(search.sort, Sort::DateAsc | Sort::DateDesc);
    let cursor = match &search.cursor {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            FhirError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                "_cursor: is not a cursor this server issued",
            )
        })?),
    };
    let mut notes = Vec::new();
    let (seqs, next): (Vec<u64>, Option<String>) = if by_date
        && total as usize <= DATE_SORT_MATCHES_MAX
    {
        // Exact date order: sort every match by (date, seq), then page by offset.
        let offset = match cursor {
            Some(('o', n)) => n as usize,
            None => 0,
            Some(_) => {
                return Err(FhirError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "_cursor: belongs to another sort",
                ));
            }
        };
        let all = state.index.search(&Query { limit: DATE_SORT_MATCHES_MAX, ..q.clone() });
        let mut dated: Vec<(i64, u64)> =
            all.seqs.iter().map(|&s| (state.index.occurred_of(s).unwrap_or(0), s)).collect();
        dated.sort_unstable();
        if search.sort == Sort::DateDesc {
            dated.reverse();
        }
        let page: Vec<u64> = dated.iter().skip(offset).take(search.count).map(|d| d.1).collect();
        let end = offset + page.len();
        (page, (end < dated.len()).then(|| encode_cursor(&format!("o{end}"))))
    } else {
        if by_date {
            notes.push(format!(
                "more than {DATE_SORT_MATCHES_MAX} matches: sorted by recording time, which equals the event date except where clocks disagree"
            ));
        }
        match cursor {
            Some(('d', seq)) if q.newest_first => q.seqs = (0, seq),
            Some(('a', seq)) if !q.newest_first => q.seqs = (seq + 1, u64::MAX),
            None => {}
            Some(_) => {
                return Err(FhirError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    "_cursor: belongs to another sort",
                ));
            }
        }
        let hits = state.index.search(&q);
        let dir = if q.newest_first { 'd' } else { 'a' };
        let next = hits
            .more
            .then(|| hits.seqs.last().map(|s| encode_cursor(&format!("{dir}{s}"))))
            .flatten();
        (hits.seqs, next)
    };
    let mut entries = Vec::with_capacity(seqs.len());
    for stored in state.read_stored(&seqs).map_err(FhirError::from)?.iter() {
        let mut event: Value =
            serde_json::from_slice(stored).map_err(|e| FhirError::from(ApiError::internal(e)))?;
        view.apply(&mut event);
        let resource = fhir::to_audit_event(&event);
        let id = resource.get("id").and_then(Value::as_str).unwrap_or("").to_string();
        entries.push(json!({
            "fullUrl": format!("{base}/AuditEvent/{id}"),
            "resource": resource,
            "search": {"mode": "match"},
        }));
    }
    if !notes.is_empty() {
        let issues: Vec<Issue> = notes.into_iter().map(Issue::new_information).collect();
        entries.push(
            json!({"resource": fhir::operation_outcome(&issues), "search": {"mode": "outcome"}}),
        );
    }
    let query_string = |cursor: Option<&str>| {
        let mut parts: Vec<String> = params
            .iter()
            .filter(|(k, _)| k != "_cursor" && k != "_page")
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        if let Some(c) = cursor {
            parts.push(format!("_cursor={c}"));
        }
        parts.join("&")
    };
    let mut links = vec![
        json!({"relation": "self", "url": format!("{base}/AuditEvent?{}", query_string(search.cursor.as_deref()))}),
    ];
    if let Some(n) = &next {
        links.push(json!({"relation": "next", "url": format!("{base}/AuditEvent?{}", query_string(Some(n)))}));
    }
    Ok(json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
        "entry": entries,
    }))
}
