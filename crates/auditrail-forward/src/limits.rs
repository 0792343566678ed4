//! Every limit of the forwarders in one place.

/// The most events one `_bulk` request or one syslog flush may carry.
pub const BATCH_EVENTS_MAX: usize = 10_000;
/// Permanently failed events remembered for the status answer (the newest ones); every one
/// is also logged with its seq.
pub const FAILURES_KEPT: usize = 32;
/// The longest error message kept in the status, in bytes.
pub const ERROR_BYTES_MAX: usize = 1024;
/// The largest answer read from a destination, in bytes (a `_bulk` answer for
/// [`BATCH_EVENTS_MAX`] items with long error reasons stays well below it).
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;

const _: () = assert!(FAILURES_KEPT > 0 && ERROR_BYTES_MAX >= 64);
