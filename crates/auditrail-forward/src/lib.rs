//! auditrail's forwarders: the durable log shipped to where organisations already look.
//!
//! - [`elasticsearch`]: the `_bulk` API of Elasticsearch or OpenSearch, one document per event
//!   with `_id` = the event's `id`, so a redelivery overwrites the same document.
//! - [`syslog`]: RFC 5424 messages over TLS with RFC 5425 octet-counting framing.
//!
//! Each forwarder follows the durable log with its own [`LogTail`] from a persisted
//! [`cursor`] (the next seq to send) and advances the cursor only once the destination has
//! taken every event before it: delivery is at least once. Forwarders run as tokio tasks that
//! read the log from blocking tasks; they never hold a lock the store's writer needs, so a
//! slow or unreachable destination never slows ingest, it only grows the lag.

pub mod backoff;
pub mod config;
pub mod cursor;
pub mod elasticsearch;
pub mod limits;
mod runner;
pub mod status;
pub mod syslog;
mod tls;

pub use config::{ElasticsearchConfig, ForwardConfig, Secret, SyslogConfig};
pub use runner::Forwarding;
pub use status::{FailedEvent, ForwarderStatus, ForwardingStatus};

use auditrail_store::StoreError;

/// Errors of the forwarders, named for what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A setting is wrong: fix the configuration.
    #[error("invalid forwarding setting {key}: {message}")]
    Config { key: String, message: String },
    /// A file the configuration names (CA, certificate, key) cannot be used.
    #[error("cannot use {path}: {message}")]
    File { path: String, message: String },
    /// The cursor file cannot be read or written.
    #[error("cursor {path}: {source}")]
    Cursor { path: String, source: std::io::Error },
    /// The cursor file exists but is damaged: inspect it, or delete it to resend everything.
    #[error("cursor {path} is damaged ({message}); delete it to forward the whole log again")]
    CursorCorrupted { path: String, message: String },
    /// The destination is unreachable or failed: retried with backoff.
    #[error("{0}")]
    Unavailable(String),
    /// Reading the log failed.
    #[error("reading the log: {0}")]
    Store(#[from] StoreError),
}

impl ForwardError {
    pub(crate) fn config(key: &str, message: impl Into<String>) -> ForwardError {
        ForwardError::Config { key: key.to_string(), message: message.into() }
    }

    pub(crate) fn file(path: &std::path::Path, message: impl std::fmt::Display) -> ForwardError {
        ForwardError::File { path: path.display().to_string(), message: message.to_string() }
    }
}

/// One durable event read from the log.
#[derive(Debug, Clone)]
pub struct LogEvent {
    pub seq: u64,
    pub recorded_at_ms: u64,
    /// The stored event's canonical JSON bytes.
    pub canonical: Vec<u8>,
}

/// What a destination did with a batch of events.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Events the destination refused for good (a mapping error, say): skipped, counted and
    /// reported, never retried.
    pub failed: Vec<FailedEvent>,
}

pub use auditrail_store::tail::LogTail;
