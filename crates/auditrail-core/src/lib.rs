//! auditrail's pure domain: the event model and its canonical bytes, the privacy filter,
//! commitments and leaf entries, RFC 6962 Merkle hashing and proofs, the C2SP tile layout,
//! checkpoints and signed notes, and evidence bundles (events with their proofs, checked
//! offline).
//!
//! Architecture invariant: this crate does no I/O, reads no clock and draws no randomness, so
//! the writer and every verifier share exactly the same math. It doubles as the offline
//! verifier library.

pub mod checkpoint;
pub mod event;
pub mod evidence;
pub mod fhir;
pub mod hex;
pub mod json;
pub mod leaf;
pub mod limits;
pub mod merkle;
pub mod note;
pub mod privacy;
pub mod tile;
pub mod time;
pub mod ustar;
