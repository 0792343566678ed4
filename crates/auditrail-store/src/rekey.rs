//! Master key rotation: adding a version ([`rotate`]), re-wrapping every segment's secret and
//! re-sealing every sealed file under the newest version ([`rewrap`]), and removing versions
//! nothing uses any more ([`retire_unused`]).
//!
//! A segment header holds the only wrapped copy of its segment's secret, so it is never
//! overwritten without a journal: `keys/rewrap.journal` (format in docs/format.md) holds the
//! old and new bytes of every header about to change and is durable before the first header
//! is touched; each header is then overwritten in place and fsynced; the journal is deleted
//! last. A crash anywhere leaves either no journal (nothing changed, or everything did) or a
//! journal that [`recover_journal`] finishes when the store next opens: it writes each header
//! whole again, in the direction that leaves it decodable with the master keys at hand (the
//! new version if present, else the old one), so a torn header is always repaired.
//!
//! Sealed files ([`crate::keys::SEALED_FILES`]) are replaced whole through a temporary file
//! and a rename, which needs no journal.

use crate::error::StoreError;
use crate::io::Io;
use crate::keys::{self, MasterKeySource, MasterKeys, SEALED_FILES, SEALED_MAGIC};
use crate::reader::{self, SEGMENTS_DIR, list_segments, segment_path};
use crate::segment::{SEGMENT_HEADER_BYTES, SegmentHeader};
use std::collections::{BTreeMap, BTreeSet};

pub const REWRAP_JOURNAL_PATH: &str = "keys/rewrap.journal";
const JOURNAL_TMP_PATH: &str = "keys/rewrap.journal.tmp";
const JOURNAL_MAGIC: &[u8; 8] = b"ATRWJNL1";
const JOURNAL_VERSION: u8 = 1;
/// Magic, version, three zero bytes, entry count (u32).
const JOURNAL_HEADER_BYTES: usize = 16;
/// Per entry: the segment's first seq (u64), then its old and its new header.
const JOURNAL_ENTRY_BYTES: usize = 8 + 2 * SEGMENT_HEADER_BYTES;
/// Segments one journal covers: bounds the journal (about 800 KiB) and what a rewrap holds in
/// memory however long the log.
pub const REWRAP_SEGMENTS_PER_JOURNAL_MAX: usize = 4096;

/// Directories never scanned for unknown sealed files: they hold only segments, tiles and
/// index files, none of them sealed blobs, and may hold millions of files.
const NOT_SCANNED: [&str; 3] = [SEGMENTS_DIR, crate::tree::LOG_DIR, "index"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct JournalEntry {
    first_seq: u64,
    old: [u8; SEGMENT_HEADER_BYTES],
    new: [u8; SEGMENT_HEADER_BYTES],
}

fn encode_journal(entries: &[JournalEntry]) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(JOURNAL_HEADER_BYTES + entries.len() * JOURNAL_ENTRY_BYTES + 4);
    out.extend_from_slice(JOURNAL_MAGIC);
    out.extend_from_slice(&[JOURNAL_VERSION, 0, 0, 0]);
    out.extend_from_slice(&u32::try_from(entries.len()).expect("bounded").to_be_bytes());
    for e in entries {
        out.extend_from_slice(&e.first_seq.to_be_bytes());
        out.extend_from_slice(&e.old);
        out.extend_from_slice(&e.new);
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}

fn decode_journal(b: &[u8]) -> Result<Vec<JournalEntry>, String> {
    if b.len() < JOURNAL_HEADER_BYTES + 4 || &b[..8] != JOURNAL_MAGIC {
        return Err("not a rewrap journal".into());
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body).to_be_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if b[8] != JOURNAL_VERSION {
        return Err(format!("unsupported version {}", b[8]));
    }
    let count = u32::from_be_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
    if body.len() != JOURNAL_HEADER_BYTES + count * JOURNAL_ENTRY_BYTES {
        return Err("length does not match its entry count".into());
    }
    Ok(body[JOURNAL_HEADER_BYTES..]
        .chunks_exact(JOURNAL_ENTRY_BYTES)
        .map(|c| JournalEntry {
            first_seq: u64::from_be_bytes(c[..8].try_into().expect("8 bytes")),
            old: c[8..8 + SEGMENT_HEADER_BYTES].try_into().expect("header bytes"),
            new: c[8 + SEGMENT_HEADER_BYTES..].try_into().expect("header bytes"),
        })
        .collect())
}

/// Whether `bytes` is a header for `first_seq` that `master` unwraps.
fn opens(bytes: &[u8], first_seq: u64, master: &MasterKeys) -> bool {
    SegmentHeader::decode(bytes)
        .ok()
        .filter(|h| h.first_seq == first_seq)
        .is_some_and(|h| master.get(h.key_version).is_some_and(|k| h.keys(k).is_ok()))
}

/// Writes `bytes` to `path` whole and durably: a temporary file (mode 0600), fsync, rename,
/// fsync of the directory.
fn replace_durably(io: &dyn Io, path: &str, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    let tmp = format!("{path}.tmp");
    io.write_private_file(&tmp, bytes)?;
    io.sync_file(&tmp)?;
    io.rename(&tmp, path)?;
    io.sync_dir(dir)
}

/// Finishes a rewrap that a crash interrupted, before anything reads a segment header: every
/// header the journal names is written again (new bytes if `master` has the new version,
/// otherwise the old bytes) and fsynced, then the journal goes. Returns how many headers it
/// wrote. Without a journal it does nothing.
pub fn recover_journal(io: &dyn Io, master: &MasterKeys) -> Result<usize, StoreError> {
    // A journal still under its temporary name was never complete: no header was touched.
    if io.len(JOURNAL_TMP_PATH)?.is_some() {
        io.remove(JOURNAL_TMP_PATH)?;
        io.sync_dir("keys")?;
    }
    let bytes = match io.read(REWRAP_JOURNAL_PATH) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    // The journal was fsynced before it got its name, so damage here is not a torn write.
    let entries = decode_journal(&bytes).map_err(|e| {
        StoreError::corrupted(
            REWRAP_JOURNAL_PATH,
            format!("{e}; segment headers it names may be torn, restore them from a backup"),
        )
    })?;
    let mut written = 0;
    for e in &entries {
        let path = segment_path(e.first_seq);
        let target = if opens(&e.new, e.first_seq, master) {
            &e.new
        } else if opens(&e.old, e.first_seq, master) {
            &e.old
        } else {
            let version = |b: &[u8]| SegmentHeader::decode(b).map_or(0, |h| h.key_version);
            return Err(StoreError::Unavailable(format!(
                "an interrupted key rewrap left {REWRAP_JOURNAL_PATH}; finishing it needs master \
                 key version {} or {} for {path}, and the master keys from {} have neither",
                version(&e.new),
                version(&e.old),
                master.origin()
            )));
        };
        let Some(len) = io.len(&path)? else { continue };
        if len < SEGMENT_HEADER_BYTES as u64 {
            continue;
        }
        if io.read_at(&path, 0, SEGMENT_HEADER_BYTES)? != target.as_slice() {
            io.write_at(&path, 0, target)?;
            io.sync_file(&path)?;
            written += 1;
        }
    }
    io.remove(REWRAP_JOURNAL_PATH)?;
    io.sync_dir("keys")?;
    Ok(written)
}

/// Which master key versions are in use, and by what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyUsage {
    /// Segments per master key version.
    pub segments: BTreeMap<u32, u64>,
    /// Sealed files known to this version ([`SEALED_FILES`]) and their master key versions.
    pub sealed: BTreeMap<String, u32>,
    /// Known sealed files still in the clear (written before sealing; opening the store or
    /// the index, or a rewrap, seals them).
    pub plaintext: Vec<String>,
    /// Files that are sealed but not listed in [`SEALED_FILES`] (written by a newer version?):
    /// their versions are in use, as they cannot be re-sealed here.
    pub unknown: BTreeMap<String, u32>,
}

impl KeyUsage {
    pub fn versions(&self) -> BTreeSet<u32> {
        self.segments
            .keys()
            .chain(self.sealed.values())
            .chain(self.unknown.values())
            .copied()
            .collect()
    }
}

/// Reads every segment header and every sealed file's version (no decryption).
pub fn key_usage(io: &dyn Io) -> Result<KeyUsage, StoreError> {
    let mut usage = KeyUsage::default();
    for first in list_segments(io)? {
        let path = segment_path(first);
        let header = SegmentHeader::decode(&io.read_at(&path, 0, SEGMENT_HEADER_BYTES)?)
            .map_err(|e| StoreError::corrupted(format!("{path} offset 0"), e))?;
        *usage.segments.entry(header.key_version).or_default() += 1;
    }
    for f in SEALED_FILES {
        match io.read(f.path) {
            Ok(b) => match keys::sealed_version(&b) {
                Some(v) => {
                    usage.sealed.insert(f.path.to_string(), v);
                }
                None => usage.plaintext.push(f.path.to_string()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    for path in scanned_files(io)? {
        if SEALED_FILES.iter().any(|f| f.path == path) || path.ends_with(".tmp") {
            continue;
        }
        let Ok(head) = io.read_at(&path, 0, SEALED_MAGIC.len() + 4) else { continue };
        if let Some(v) = keys::sealed_version(&head) {
            usage.unknown.insert(path, v);
        }
    }
    Ok(usage)
}

/// Every file of the data directory outside [`NOT_SCANNED`].
fn scanned_files(io: &dyn Io) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for name in io.list("")? {
        if NOT_SCANNED.contains(&name.as_str()) {
            continue;
        }
        match io.list_tree(&name) {
            Ok(files) if !files.is_empty() => out.extend(files),
            // A file at the top level (or an empty directory, which the read then skips).
            _ => out.push(name),
        }
    }
    Ok(out)
}

/// What [`rewrap`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapReport {
    /// The master key version everything is now wrapped under.
    pub version: u32,
    pub segments: u64,
    pub segments_rewrapped: u64,
    /// Sealed files re-sealed (or sealed for the first time, when they were in the clear).
    pub files_resealed: Vec<String>,
    /// The usage afterwards.
    pub usage: KeyUsage,
}

/// Re-wraps every segment's secret and re-seals every sealed file under the newest master key.
/// The caller must own the data directory with nothing else using it (the store's lock, no
/// appends): headers are rewritten in place. Safe to run again after a crash or a failure;
/// segments already under the newest version are left alone.
pub fn rewrap(io: &dyn Io, master: &MasterKeys) -> Result<RewrapReport, StoreError> {
    recover_journal(io, master)?;
    let (version, current) = master.current();
    let segments = list_segments(io)?;
    let mut rewrapped = 0u64;
    for chunk in segments.chunks(REWRAP_SEGMENTS_PER_JOURNAL_MAX) {
        let mut entries = Vec::new();
        for &first in chunk {
            let path = segment_path(first);
            let old = io.read_at(&path, 0, SEGMENT_HEADER_BYTES)?;
            let header = SegmentHeader::decode(&old)
                .map_err(|e| StoreError::corrupted(format!("{path} offset 0"), e))?;
            if header.key_version == version {
                continue;
            }
            // Unwrapping through the reader gives the same errors as any other read.
            reader::open_segment_header(&path, &old, master, first)?;
            let previous = master.get(header.key_version).expect("checked by the reader");
            let new = header
                .rewrapped(previous, version, current)
                .map_err(|e| StoreError::corrupted(format!("{path} offset 0"), e))?;
            entries.push(JournalEntry {
                first_seq: first,
                old: old.as_slice().try_into().expect("header bytes"),
                new: new.encode(),
            });
        }
        if entries.is_empty() {
            continue;
        }
        // 1. The journal, durable under its final name before any header changes.
        io.write_private_file(JOURNAL_TMP_PATH, &encode_journal(&entries))?;
        io.sync_file(JOURNAL_TMP_PATH)?;
        io.rename(JOURNAL_TMP_PATH, REWRAP_JOURNAL_PATH)?;
        io.sync_dir("keys")?;
        // 2. The headers, each durable before the journal goes.
        for e in &entries {
            let path = segment_path(e.first_seq);
            io.write_at(&path, 0, &e.new)?;
            io.sync_file(&path)?;
            let back = io.read_at(&path, 0, SEGMENT_HEADER_BYTES)?;
            assert!(opens(&back, e.first_seq, master), "a rewrapped header reads back whole");
        }
        // 3. The journal.
        io.remove(REWRAP_JOURNAL_PATH)?;
        io.sync_dir("keys")?;
        rewrapped += entries.len() as u64;
    }
    let mut resealed = Vec::new();
    for f in SEALED_FILES {
        let bytes = match io.read(f.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e.into()),
        };
        if keys::sealed_version(&bytes) == Some(version) {
            continue;
        }
        let (plain, _) =
            master.open_blob_or_legacy(f.purpose, &bytes).map_err(StoreError::Unavailable)?;
        replace_durably(io, f.path, &master.seal_blob(f.purpose, &plain))?;
        resealed.push(f.path.to_string());
    }
    Ok(RewrapReport {
        version,
        segments: segments.len() as u64,
        segments_rewrapped: rewrapped,
        files_resealed: resealed,
        usage: key_usage(io)?,
    })
}

/// What [`retire_unused`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetireReport {
    /// Versions removed from the key source.
    pub retired: Vec<u32>,
    /// Versions left.
    pub kept: Vec<u32>,
    /// The new key text when the source cannot be rewritten (`AUDITRAIL_MASTER_KEYS`): the
    /// operator stores it in place of the old.
    pub new_text: Option<String>,
}

/// Removes from the key source every master key version that nothing uses (the newest always
/// stays), after checking that every segment and every sealed file opens with the versions
/// that remain. Backups taken before a rewrap still need the removed versions: keep a copy of
/// the old key file with them.
pub fn retire_unused(
    io: &dyn Io,
    master: &MasterKeys,
    source: &MasterKeySource,
) -> Result<RetireReport, StoreError> {
    if io.len(REWRAP_JOURNAL_PATH)?.is_some() {
        return Err(StoreError::Unavailable(format!(
            "{REWRAP_JOURNAL_PATH} exists: an interrupted rewrap must finish first (run `auditrail key rewrap`)"
        )));
    }
    let usage = key_usage(io)?;
    let in_use = usage.versions();
    let (newest, _) = master.current();
    let retired: Vec<u32> =
        master.versions().into_iter().filter(|v| *v != newest && !in_use.contains(v)).collect();
    let remaining = master.without(&retired);
    if retired.is_empty() {
        return Ok(RetireReport { retired, kept: remaining.versions(), new_text: None });
    }
    for first in list_segments(io)? {
        let path = segment_path(first);
        let bytes = io.read_at(&path, 0, SEGMENT_HEADER_BYTES)?;
        reader::open_segment_header(&path, &bytes, &remaining, first)?;
    }
    for f in SEALED_FILES {
        match io.read(f.path) {
            Ok(b) => {
                remaining.open_blob_or_legacy(f.purpose, &b).map_err(|e| {
                    StoreError::Unavailable(format!("{}: {e}; nothing was retired", f.path))
                })?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    let text = source.read_text(io).map_err(StoreError::Unavailable)?;
    let new_text = keys::without_versions(&text, &retired, &source.describe())
        .map_err(StoreError::Unavailable)?;
    if !source.is_writable() {
        return Ok(RetireReport { retired, kept: remaining.versions(), new_text: Some(new_text) });
    }
    source.replace_text(io, &new_text).map_err(StoreError::Unavailable)?;
    Ok(RetireReport { retired, kept: remaining.versions(), new_text: None })
}

/// Adds the next master key version (random) to the key source: new segments are wrapped
/// with it from the next segment a store opened afterwards starts. Returns the new version,
/// and the new key text when the source cannot be rewritten (`AUDITRAIL_MASTER_KEYS`).
pub fn rotate(io: &dyn Io, source: &MasterKeySource) -> Result<(u32, Option<String>), String> {
    let text = source.read_text(io)?;
    let (new_text, version) = keys::with_new_version(&text, &source.describe())?;
    if !source.is_writable() {
        return Ok((version, Some(new_text)));
    }
    source.replace_text(io, &new_text)?;
    Ok((version, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_round_trip_and_damage() {
        let entries = vec![
            JournalEntry { first_seq: 0, old: [1; 96], new: [2; 96] },
            JournalEntry { first_seq: 77, old: [3; 96], new: [4; 96] },
        ];
        let bytes = encode_journal(&entries);
        assert_eq!(decode_journal(&bytes).unwrap(), entries);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(decode_journal(&b).is_err(), "a flip at {i} went unnoticed");
        }
        assert!(decode_journal(&bytes[..bytes.len() - 1]).is_err());
    }
}
