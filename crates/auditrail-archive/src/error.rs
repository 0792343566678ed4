//! The crate's one error type. Variants say what the caller must do: retry later
//! (`Unavailable`, `Moving`), fix the input (`InvalidInput`), or stop trusting the archive
//! (`Corrupted`, `Verification`).

/// Errors of backup and restore.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The destination URL or the restore target is not usable; nothing was done.
    #[error("{0}")]
    InvalidInput(String),
    /// The object store did not answer or refused; retry later.
    #[error("object store: cannot {operation} {object}: {source}")]
    Unavailable {
        operation: &'static str,
        object: String,
        #[source]
        source: object_store::Error,
    },
    /// The data directory kept changing under the snapshot (publication raced it); retry.
    #[error("the data directory changed while it was read ({0}); try again")]
    Moving(String),
    /// Nothing to back up yet (no checkpoint has been published).
    #[error("nothing to back up: {0}")]
    NotReady(String),
    /// An object in the archive is missing or altered: the archive cannot be trusted for this
    /// manifest.
    #[error("archive object {object}: {reason}")]
    Corrupted { object: String, reason: String },
    /// The restored files fail the log's own verification.
    #[error("the restored log fails verification: {0}")]
    Verification(String),
    /// A local file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ArchiveError {
    pub(crate) fn io(path: impl std::fmt::Display, source: std::io::Error) -> ArchiveError {
        ArchiveError::Io { path: path.to_string(), source }
    }

    pub(crate) fn store(
        operation: &'static str,
        object: impl std::fmt::Display,
        source: object_store::Error,
    ) -> ArchiveError {
        ArchiveError::Unavailable { operation, object: object.to_string(), source }
    }

    pub(crate) fn corrupted(object: impl std::fmt::Display, reason: impl Into<String>) -> Self {
        ArchiveError::Corrupted { object: object.to_string(), reason: reason.into() }
    }
}
