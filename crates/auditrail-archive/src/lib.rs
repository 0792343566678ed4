//! auditrail's archiver: incremental, content-addressed backups of a data directory to object
//! storage (S3, GCS, Azure Blob, a local path) through `object_store`, and verified restore.
//!
//! What is archived: segments, tiles, the checkpoint and its history, cut consistently to one
//! signed checkpoint ([`snapshot`]). Never the keys (the operator backs them up separately)
//! and never the search index (rebuilt after a restore). The bucket layout is in
//! [`manifest`]. Nothing is ever deleted: retention is the bucket's Object Lock.

pub mod backup;
pub mod destination;
mod error;
pub mod manifest;
pub mod restore;
pub mod snapshot;

pub use backup::{BackupReport, backup_once};
pub use destination::Destination;
pub use error::ArchiveError;
pub use manifest::Manifest;
