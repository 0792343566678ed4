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

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Vec<FieldError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: Vec::new() }
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
        }
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
        response
    }
}
