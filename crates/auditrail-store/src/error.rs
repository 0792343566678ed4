use std::io;

/// What went wrong, named for what the caller must do about it.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The request itself is wrong (too large a batch, an invalid event); fix it and resend.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The write queue is full; retry later (HTTP 503 with `Retry-After`).
    #[error("the write queue is full; retry shortly")]
    Backpressure,
    /// A write or sync failed, or an invariant broke: the store is read-only until restarted,
    /// and recovery decides what is durable.
    #[error("the store refuses writes after a failure: {0}")]
    Poisoned(String),
    /// Stored data is damaged or altered; `location` says where.
    #[error("corrupted at {location}: {detail}")]
    Corrupted { location: String, detail: String },
    /// The data directory is not usable (missing keys, locked by another process, ...).
    #[error("{0}")]
    Unavailable(String),
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    pub fn corrupted(location: impl Into<String>, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupted { location: location.into(), detail: detail.to_string() }
    }
}
