//! The one place where errors become HTTP responses. Clients get a stable machine code and a
//! human message; internals (paths, stack traces) stay in the server's log.
//!
//! Native API body: `{"error": {"code": "...", "message": "...", "details": [...]}}`.
//! FHIR API body: an OperationOutcome (see `fhir_api`).

use auditrail_core::event::FieldError;
use auditrail_store::StoreError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// The stable `code` of every native error, as the OpenAPI document states it. A test checks
/// that this list and the codes the server's source uses are the same set.
pub const ERROR_CODES: &str = "\
Every native error carries one of these stable codes (with its HTTP status):

- `invalid_json` (400): the body is not JSON.
- `wrong_type` (400): the body (or an NDJSON line) is not an event object or an array of them.
- `empty_batch` (400): the array holds no events.
- `invalid_event` (400): an event does not match the schema; `details` names each field, with \
the codes `required`, `unknown_field`, `wrong_type`, `too_long`, `too_many`, `invalid_format`, \
`invalid_value`, `server_assigned` and `too_large`.
- `invalid_request` (400): the log refused the request as given, e.g. a proof for a tree size \
that is not published.
- `bad_body` (400): the body could not be read.
- `bad_query` (400): the query string is not valid percent-encoded UTF-8.
- `invalid_parameter` (400): a query parameter is missing, repeated or has a bad value; the \
message names it.
- `unknown_parameter` (400): the endpoint has no such query parameter.
- `too_many_events` (400): an evidence bundle would hold more than `evidence_events_max` \
events; `limit` in the error says how many match and the most allowed.
- `invalid_parameter` also covers bad fields of the access-control bodies (users, roles, keys).
- `weak_password` (400): the new password is shorter than 12 characters or guessable; the \
message says why.
- `unauthenticated` (401, with `WWW-Authenticate: Bearer`): no credentials, or an access token \
or API key that is invalid, expired, revoked, or whose session ended.
- `client_certificate_required` (401): `tls_client_auth` is `ingest` and the connection \
showed no client certificate.
- `invalid_credentials` (401): the user name, password or code is wrong.
- `mfa_required` (401): the account uses a second factor; send `totp_code` or `recovery_code`.
- `forbidden` (403): the caller's roles or key scopes do not allow this.
- `password_change_required` (403): the session may only change its password first.
- `mfa_enrolment_required` (403): the session may only enrol TOTP first.
- `account_locked` (403, with `Retry-After`): too many failed logins; `retry_after_seconds` says \
how long.
- `network_forbidden` (403): the API key may not be used from the client's address.
- `export_disabled` (403): governance allows exports only to object storage (`POST \
/api/v1/events/export`), except for the projects it lists.
- `import_disabled` (403): governance refuses uploads of event files (`POST \
/api/v1/events/bulk`), except of events of the projects it lists.
- `invalid_rule` (400): an alert rule lacks what its kind needs or has a bad value; the message \
says which.
- `alert_state` (409): the alert cannot move to that state (only an open alert is acknowledged; a \
resolved one stays resolved).
- `verification_running` (409): a verification of the log is running; the message names it.
- `conflict` (409): the change conflicts with what exists (a taken name, the last administrator).
- `rate_limited` (429, with `Retry-After`): too many authentication attempts from this address.
- `not_found` (404): no such event, tile or endpoint.
- `purged` (410): retention purged the event; `purged` in the error holds its seq, when its segment was purged, its leaf hash and an inclusion proof that it existed.
- `not_yet_published` (409): the event is not in a published checkpoint yet; retry in a second.
- `too_large` (413): the body, an event or the batch exceeds a limit.
- `unsupported_media_type` (415): the `Content-Type` is not one the endpoint takes.
- `internal` (500): the server failed; the operator's log has details.
- `destination_failed` (502): the object store an export writes to refused or could not be \
reached.
- `overloaded` (503, with `Retry-After`): the server is at its ingest limit.
- `read_only` (503, with `Retry-After`): the log refuses writes after a storage failure until \
the operator restarts it.
- `not_stored` (503, in bulk items only): the request failed before this line was appended.
";

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldError>,
    /// More machine-readable context, under `error.<name>`.
    pub extra: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: Vec::new(), extra: None }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn invalid_event(details: Vec<FieldError>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_event",
            message: "the event does not match the schema; see details".into(),
            details,
            extra: None,
        }
    }

    /// 400 `unknown_parameter`: the endpoint has no query parameter `name`.
    pub fn unknown_parameter(name: &str) -> ApiError {
        ApiError::bad_request("unknown_parameter", format!("unknown query parameter {name:?}"))
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn busy() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "the server is at its ingest limit; retry after the time in Retry-After",
        )
    }

    pub fn internal(message: impl std::fmt::Display) -> ApiError {
        eprintln!("auditrail: internal error: {message}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the server failed; the operator's log has details",
        )
    }

    pub fn body(&self) -> serde_json::Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if !self.details.is_empty() {
            error["details"] = json!(self.details);
        }
        if let Some((name, value)) = &self.extra {
            error[*name] = value.clone();
        }
        json!({ "error": error })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::InvalidInput(m) => ApiError::bad_request("invalid_request", m),
            StoreError::Backpressure => ApiError::busy(),
            StoreError::Poisoned(_) | StoreError::Closed => {
                eprintln!("auditrail: store unavailable: {e}");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "read_only",
                    "the log refuses writes after a storage failure; the operator must restart it",
                )
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<auditrail_index::IndexError> for ApiError {
    fn from(e: auditrail_index::IndexError) -> ApiError {
        ApiError::internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let Some(("retry_after_seconds", seconds)) = &self.extra
            && let Ok(v) = HeaderValue::from_str(&seconds.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}
