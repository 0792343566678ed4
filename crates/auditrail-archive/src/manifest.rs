//! The archive's layout in the bucket:
//!
//! - `blobs/sha256/<hex>`: immutable content-addressed pieces of files;
//! - `manifests/<20-digit tree size>-<13-digit unix ms>.json`: immutable, one per backup,
//!   naming the signed checkpoint it covers and, for each file of the data directory, its
//!   length and the ordered pieces that make it up. Names sort oldest first.
//!
//! Append-only files (segments, the checkpoint history) grow by one piece per backup, so
//! a backup uploads only the bytes added since the previous one.

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "auditrail-archive/1";
pub const MANIFESTS_DIR: &str = "manifests";
pub const BLOBS_DIR: &str = "blobs/sha256";
/// A manifest is read whole before anything is downloaded; anything larger is not ours.
pub const MANIFEST_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub created_ms: i64,
    /// The log's origin (its name in checkpoints).
    pub origin: String,
    pub tree_size: u64,
    /// Base64 root hash of the checkpoint.
    pub root: String,
    /// The signed checkpoint note (`log/checkpoint`) the files below cover exactly.
    pub checkpoint: String,
    pub files: Vec<FileEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntry {
    /// Relative to the data directory, `/`-separated.
    pub path: String,
    pub len: u64,
    pub pieces: Vec<Piece>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Piece {
    /// Lowercase hex SHA-256 of the piece: its blob is `blobs/sha256/<sha256>`.
    pub sha256: String,
    pub len: u64,
}

pub fn manifest_name(tree_size: u64, created_ms: i64) -> String {
    format!("{tree_size:020}-{created_ms:013}.json")
}

pub fn blob_key(sha256_hex: &str) -> String {
    format!("{BLOBS_DIR}/{sha256_hex}")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex(&sha2::Sha256::digest(bytes))
}

pub use auditrail_core::hex::encode as hex;

/// Whether `path` may appear in a manifest: only the files a data directory is rebuilt from,
/// never keys, and never a path that could escape the directory being restored.
pub fn allowed_path(path: &str) -> bool {
    let safe = !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\\'));
    safe && (path == "log/checkpoint"
        || path == "checkpoints/history"
        || path == auditrail_store::retention::PURGED_PATH
        || path == auditrail_store::retention::HOLDS_PATH
        || path == auditrail_store::keys::ACCOUNTS.path
        || path.starts_with("log/tile/")
        || (path.starts_with("segments/") && path.ends_with(".seg")))
}

impl Manifest {
    pub fn parse(name: &str, bytes: &[u8]) -> Result<Manifest, crate::ArchiveError> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| crate::ArchiveError::corrupted(name, format!("not a manifest: {e}")))?;
        if m.format != FORMAT {
            return Err(crate::ArchiveError::corrupted(
                name,
                format!("format {:?}, this version reads {FORMAT:?}", m.format),
            ));
        }
        for f in &m.files {
            if !allowed_path(&f.path) {
                return Err(crate::ArchiveError::corrupted(
                    name,
                    format!("names a file it must not restore: {:?}", f.path),
                ));
            }
            let sum: u64 = f.pieces.iter().map(|p| p.len).sum();
            let hex_ok = |p: &Piece| {
                p.sha256.len() == 64
                    && p.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            };
            if sum != f.len || !f.pieces.iter().all(hex_ok) {
                return Err(crate::ArchiveError::corrupted(
                    name,
                    format!("inconsistent pieces for {}", f.path),
                ));
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rebuildable_files_may_be_restored() {
        for ok in [
            "segments/00000000000000000000.seg",
            "log/checkpoint",
            "log/tile/0/x001/002.p/5",
            "checkpoints/history",
            "auth/accounts.sealed",
        ] {
            assert!(allowed_path(ok), "{ok}");
        }
        for bad in [
            "keys/master.keys",
            "keys/log.key",
            "index/0-10.idx",
            "auth/initial-admin-password",
            "../etc/passwd",
            "log/tile/../../keys/log.key",
            "/log/checkpoint",
            "segments/x",
            "",
        ] {
            assert!(!allowed_path(bad), "{bad}");
        }
        assert_eq!(manifest_name(42, 1_700_000_000_000), "00000000000000000042-1700000000000.json");
    }
}
