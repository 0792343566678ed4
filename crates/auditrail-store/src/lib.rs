//! auditrail's log store: encrypted segments with group commit, recovery, tiles on disk and
//! checkpoint publication. The only crate that writes the log. Synchronous: it runs on its own
//! threads, and async callers hand it work through [`Store::append`] from a blocking task.

pub mod audit;
pub mod crypto;
pub mod dictionary;
pub mod error;
pub mod io;
pub mod keys;
pub mod reader;
pub mod rekey;
pub mod retention;
pub mod segment;
pub mod sim;
pub mod store;
pub mod tail;
pub mod tree;
pub mod verify;

pub use error::StoreError;
pub use store::{Options, Receipt, Stages, Store, init, init_with};
