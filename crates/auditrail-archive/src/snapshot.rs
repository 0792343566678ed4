//! A consistent cut of a live data directory, taken without its lock while the server appends.
//!
//! The signed checkpoint is read first; every other file is then cut to exactly what that
//! checkpoint covers: the tiles of its tree size, the history up to its record, and the
//! segment blocks holding its events. Everything a checkpoint covers is durable before the
//! checkpoint is written, and those bytes never change afterwards (segments and the history
//! only grow; full tiles never change; a partial tile is rewritten only with the same bytes),
//! so what is read is stable even while the server keeps appending. The one race is a newer
//! publication deleting the partial tiles of the checkpoint read: that is reported as
//! [`ArchiveError::Moving`] and the caller takes the snapshot again.

use crate::ArchiveError;
use auditrail_core::checkpoint::Checkpoint;
use auditrail_core::tile;
use auditrail_store::retention::{HOLDS_PATH, PURGED_PATH, Purged};
use auditrail_store::segment::{
    BLOCK_HEADER_BYTES, BlockHeader, OPENING_PREFIX_BYTES, opening_len, parse_segment_file_name,
};
use auditrail_store::store::{CHECKPOINT_PATH, HISTORY_PATH, history};
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// How a file changes over time, which decides how it is uploaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Never changes once written: full tiles.
    Immutable,
    /// Only grows: segments and the checkpoint history. Uploaded as pieces.
    AppendOnly,
    /// Small and replaced or deleted later: the checkpoint, partial tiles. Read into memory
    /// at snapshot time.
    Replaced,
}

#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: String,
    /// Bytes of the file that belong to the snapshot (a prefix for append-only files).
    pub len: u64,
    pub kind: FileKind,
    /// The contents, for [`FileKind::Replaced`] files.
    pub contents: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Snapshot {
    pub checkpoint_note: String,
    pub checkpoint: Checkpoint,
    /// Sorted by path.
    pub files: Vec<SnapshotFile>,
}

/// Attempts before giving up when publications keep racing the snapshot (they happen at most
/// about once a second, and a snapshot reads a few small files after the checkpoint).
const SNAPSHOT_ATTEMPTS_MAX: u32 = 8;

/// Takes a snapshot of `data`, retrying when a publication races it. `known_lengths` are the
/// archived lengths of sealed segments: their blocks are not walked again.
pub fn take(data: &Path, known_lengths: &BTreeMap<String, u64>) -> Result<Snapshot, ArchiveError> {
    let mut last = None;
    for _ in 0..SNAPSHOT_ATTEMPTS_MAX {
        match take_once(data, known_lengths) {
            Err(ArchiveError::Moving(why)) => last = Some(why),
            other => return other,
        }
    }
    Err(ArchiveError::Moving(last.unwrap_or_default()))
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ArchiveError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ArchiveError::io(path.display(), e)),
    }
}

/// The text part of a signed note (everything up to the blank line before the signatures).
fn note_text(note: &str) -> Option<&str> {
    note.find("\n\n").map(|i| &note[..=i])
}

fn take_once(data: &Path, known_lengths: &BTreeMap<String, u64>) -> Result<Snapshot, ArchiveError> {
    let at = |p: &str| -> PathBuf { data.join(p) };
    if !data.join("keys").is_dir() && !data.join("segments").is_dir() {
        return Err(ArchiveError::InvalidInput(format!(
            "{} is not an auditrail data directory",
            data.display()
        )));
    }
    // 1. The checkpoint, first: everything else is cut to it.
    let Some(note_bytes) = read_optional(&at(CHECKPOINT_PATH))? else {
        return Err(ArchiveError::NotReady("no checkpoint has been published yet".into()));
    };
    let note = String::from_utf8(note_bytes.clone())
        .map_err(|_| ArchiveError::InvalidInput(format!("{CHECKPOINT_PATH} is not UTF-8")))?;
    let checkpoint = note_text(&note).and_then(|t| Checkpoint::parse(t).ok()).ok_or_else(|| {
        ArchiveError::InvalidInput(format!("{CHECKPOINT_PATH} is not a checkpoint"))
    })?;
    let size = checkpoint.size;
    let mut files = vec![SnapshotFile {
        path: CHECKPOINT_PATH.into(),
        len: note_bytes.len() as u64,
        kind: FileKind::Replaced,
        contents: Some(note_bytes.clone()),
    }];

    // 2. The tiles of exactly this tree size.
    for t in tile::tiles_for_size(size) {
        let path = format!("log/{}", t.path());
        if t.is_full() {
            let len = std::fs::metadata(at(&path))
                .map_err(|e| ArchiveError::io(at(&path).display(), e))?
                .len();
            files.push(SnapshotFile { path, len, kind: FileKind::Immutable, contents: None });
        } else {
            let Some(bytes) = read_optional(&at(&path))? else {
                return Err(ArchiveError::Moving(format!("{path} was superseded")));
            };
            files.push(SnapshotFile {
                path,
                len: bytes.len() as u64,
                kind: FileKind::Replaced,
                contents: Some(bytes),
            });
        }
    }

    // 3. The history, up to and including this checkpoint's record (appended before the
    // checkpoint file was replaced).
    let hist = read_optional(&at(HISTORY_PATH))?.unwrap_or_default();
    let (records, _) = history::parse(&hist);
    let end = records
        .iter()
        .rev()
        .find(|(_, n)| *n == note_bytes.as_slice())
        .map(|(off, n)| off + n.len() + history::FRAME_OVERHEAD)
        .ok_or_else(|| {
            ArchiveError::Moving(format!("{HISTORY_PATH} lacks the checkpoint of size {size}"))
        })?;
    files.push(SnapshotFile {
        path: HISTORY_PATH.into(),
        len: end as u64,
        kind: FileKind::AppendOnly,
        contents: None,
    });

    // 4. What retention purged (read before the segments: a purge records a segment before
    // deleting it, so every segment missing below is explained here), the legal holds, and
    // the accounts (users, roles, API-key digests: sealed, and without them a restored server
    // would start over with a new bootstrap administrator).
    let purged_bytes = read_optional(&at(PURGED_PATH))?;
    let purged = Purged::load(&auditrail_store::io::StdIo::new(data))
        .map_err(|e| ArchiveError::InvalidInput(format!("{PURGED_PATH}: {e}")))?;
    let accounts = auditrail_store::keys::ACCOUNTS.path;
    for (path, bytes) in [
        (PURGED_PATH, purged_bytes),
        (HOLDS_PATH, read_optional(&at(HOLDS_PATH))?),
        (accounts, read_optional(&at(accounts))?),
    ] {
        if let Some(bytes) = bytes {
            files.push(SnapshotFile {
                path: path.into(),
                len: bytes.len() as u64,
                kind: FileKind::Replaced,
                contents: Some(bytes),
            });
        }
    }

    // 5. Segments, cut after the block that holds the checkpoint's last event.
    let mut firsts: Vec<u64> = std::fs::read_dir(at("segments"))
        .map_err(|e| ArchiveError::io(at("segments").display(), e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(parse_segment_file_name))
        .filter(|&first| first < size && purged.find(first).is_none())
        .collect();
    firsts.sort_unstable();
    // A segment ends where the next one begins, on disk or purged.
    let mut starts: Vec<u64> = firsts.clone();
    starts.extend(purged.segments().iter().map(|p| p.first_seq));
    starts.sort_unstable();
    let mut covered = 0;
    for &first in &firsts {
        let path = format!("segments/{}", auditrail_store::segment::segment_file_name(first));
        while let Some(p) = purged.find(covered).filter(|_| covered < first) {
            covered = p.end_seq;
        }
        if first != covered {
            // Purged after `retention/purged` was read: take the snapshot again.
            return Err(ArchiveError::Moving(format!(
                "{path} starts at seq {first}, but the segment before ends at {covered}"
            )));
        }
        // A sealed segment archived before keeps its length: its end is the next one's start.
        let sealed_end = starts.iter().find(|&&s| s > first).copied();
        let (len, end_seq) = match (sealed_end, known_lengths.get(&path)) {
            (Some(next), Some(&len)) => (len, next),
            _ => cut_segment(&at(&path), first, size)?,
        };
        covered = end_seq;
        files.push(SnapshotFile { path, len, kind: FileKind::AppendOnly, contents: None });
    }
    while let Some(p) = purged.find(covered).filter(|p| p.end_seq <= size) {
        covered = p.end_seq;
    }
    if covered < size {
        return Err(ArchiveError::InvalidInput(format!(
            "the segments hold {covered} events but the checkpoint covers {size}; run `auditrail verify`"
        )));
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Snapshot { checkpoint_note: note, checkpoint, files })
}

/// Walks a segment's block headers (no decryption: the archiver needs no keys) and returns
/// the length up to the end of the last block that starts before `size`, and that block's
/// end seq.
fn cut_segment(path: &Path, first_seq: u64, size: u64) -> Result<(u64, u64), ArchiveError> {
    let file = std::fs::File::open(path).map_err(|e| ArchiveError::io(path.display(), e))?;
    let file_len = file.metadata().map_err(|e| ArchiveError::io(path.display(), e))?.len();
    // Blocks begin after the header and, in a segment that has one, the sealed dictionary.
    let mut prefix = vec![0u8; OPENING_PREFIX_BYTES.min(file_len as usize)];
    file.read_exact_at(&mut prefix, 0).map_err(|e| ArchiveError::io(path.display(), e))?;
    let mut offset = opening_len(&prefix).map_err(|e| {
        ArchiveError::InvalidInput(format!("{}: segment header: {e}", path.display()))
    })? as u64;
    let mut end_seq = first_seq;
    let mut header = [0u8; BLOCK_HEADER_BYTES];
    while offset + BLOCK_HEADER_BYTES as u64 <= file_len {
        file.read_exact_at(&mut header, offset).map_err(|e| ArchiveError::io(path.display(), e))?;
        // A header that does not decode is a block being written now: one that starts at or
        // after the checkpoint, since every block the checkpoint covers is durable.
        let Ok(h) = BlockHeader::decode(&header) else { break };
        if h.first_seq != end_seq || h.first_seq >= size || offset + h.total_len() > file_len {
            break;
        }
        offset += h.total_len();
        end_seq = h.end_seq();
    }
    Ok((offset, end_seq))
}
