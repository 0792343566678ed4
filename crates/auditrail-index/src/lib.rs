//! auditrail's search index: a projection of the log, never the source of truth.
//!
//! It keeps, per event, two time columns, four group-by columns, a hash of the `id` and the
//! block that holds the event, plus postings from terms to events. It stores no event: results
//! are read back from the log. Patient identifiers are indexed only as keyed HMAC tokens, and
//! every file is sealed (AES-256-GCM) under a key that only the master key unlocks. It
//! records how far it has read (its file names), catches up from the log after a restart, and
//! can be deleted and rebuilt at any time. ARCHITECTURE.md explains why it is purpose-built
//! rather than tantivy.

pub mod doc;
pub mod file;
pub mod index;
pub mod part;
pub mod postings;
mod terms;

pub use doc::{Field, GroupBy, PatientTokens};
pub use index::{Follower, Hits, Index, IndexError, IndexOptions, Query, Unfinished};
