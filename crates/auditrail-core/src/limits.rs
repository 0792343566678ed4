//! Every limit of the event model and the log in one place. Limits are part of the contract:
//! clients are told about them in errors, and the on-disk formats rely on them.

/// The largest canonical stored event, in bytes. Large enough for a FHIR AuditEvent with many
/// entities, small enough that a burst of maximal events cannot exhaust memory.
pub const EVENT_BYTES_MAX: usize = 64 * 1024;
/// The most the server adds to an event: `,"id":"<UUIDv7>"` (44 bytes, when the client sent
/// no id), `,"recorded_at":"<24-byte timestamp>"` (41) and `,"seq":<up to 20 digits>` (27).
pub const SERVER_FIELDS_BYTES_MAX: usize = 128;
/// The longest ordinary string field (names, ids, actions), in bytes.
pub const FIELD_BYTES_MAX: usize = 1024;
/// The longest request path or user agent, in bytes.
pub const LONG_FIELD_BYTES_MAX: usize = 4096;
pub const ROLES_MAX: usize = 32;
pub const ENTITIES_MAX: usize = 64;
pub const CHANGES_MAX: usize = 64;
pub const CONTEXT_ENTRIES_MAX: usize = 32;
/// How deeply a client may nest JSON anywhere in an event (`changes` values).
pub const JSON_DEPTH_MAX: usize = 8;
/// Patterns an operator may add to the privacy filter.
pub const PRIVACY_PATTERNS_MAX: usize = 32;
/// `(rule, field)` pairs recorded in an event's `redactions` (every rule that fired is listed
/// even beyond it), and the longest field path recorded.
pub const REDACTIONS_MAX: usize = 64;
pub const REDACTED_FIELD_BYTES_MAX: usize = 256;
/// The longest leaf entry: tlog-tiles frames entries with a `u16` length.
pub const LEAF_ENTRY_BYTES_MAX: usize = u16::MAX as usize;

const _: () = assert!(crate::leaf::LEAF_ENTRY_BYTES <= LEAF_ENTRY_BYTES_MAX);
const _: () = assert!(LONG_FIELD_BYTES_MAX < EVENT_BYTES_MAX);
