//! The full audit behind `auditrail verify`: every block's checksum and authentication tag,
//! every event's commitment against its leaf, every leaf and tile against the tiles on disk,
//! and the root at every checkpoint ever signed. Problems are collected with their exact
//! location; the audit goes on past them where it can.

use crate::error::StoreError;
use crate::io::Io;
use crate::keys::Keys;
use crate::reader::{self, BlocksEnd, list_segments, load_segment};
use crate::retention::{PURGE_EVENT_PREFIX, PURGED_PATH, Purged, PurgedSegment, vouched_runs};
use crate::segment;
use crate::store::{CHECKPOINT_PATH, HISTORY_PATH, history};
use crate::tree::{DiskTiles, tile_path};
use auditrail_core::checkpoint::Checkpoint;
use auditrail_core::leaf::{self, LEAF_ENTRY_BYTES, LeafEntry};
use auditrail_core::merkle::{self, CompactRange, Hash};
use auditrail_core::note::{self, NoteVerifier};
use auditrail_core::tile::{self, TILE_WIDTH, TileId};
use std::collections::BTreeMap;
use std::sync::mpsc;

/// One problem found, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// A file and byte offset, a seq, or a tile path.
    pub location: String,
    pub detail: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.location, self.detail)
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    /// Events found in the segments.
    pub events: u64,
    pub segments: u64,
    pub blocks: u64,
    /// Checkpoints in the history, each checked against the root at its size.
    pub checkpoints: u64,
    /// The size of the newest signed checkpoint.
    pub published: u64,
    /// Segments and events retention purged: checked against their leaf entries only.
    pub purged_segments: u64,
    pub purged_events: u64,
    pub problems: Vec<Problem>,
    /// The compact range of the published tree's leaves as recomputed from the events: where
    /// an incremental verification (`verify.rs`) goes on from. Meaningful only without problems.
    pub range: CompactRange,
}

impl AuditReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What one segment contributes: its leaf entries in seq order, or why it stopped early.
struct SegmentLeaves {
    first_seq: u64,
    entries: Vec<[u8; LEAF_ENTRY_BYTES]>,
    blocks: u64,
    problems: Vec<Problem>,
    purge_runs: Option<PurgeRuns>,
}

/// The newest `retention.purge` event listing purged runs: its seq and the runs.
type PurgeRuns = (u64, Vec<(u64, u64)>);

fn newer(a: Option<PurgeRuns>, b: Option<PurgeRuns>) -> Option<PurgeRuns> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.0 > b.0 { a } else { b }),
        (a, b) => a.or(b),
    }
}

fn segment_leaves(io: &dyn Io, keys: &Keys, first_seq: u64) -> SegmentLeaves {
    let mut out = SegmentLeaves {
        first_seq,
        entries: Vec::new(),
        blocks: 0,
        problems: Vec::new(),
        purge_runs: None,
    };
    let seg = match load_segment(io, &keys.master, first_seq) {
        Ok(s) => s,
        Err(e) => {
            out.problems
                .push(Problem { location: reader::segment_path(first_seq), detail: e.to_string() });
            return out;
        }
    };
    let (blocks, end) = seg.blocks();
    out.blocks = blocks.len() as u64;
    // Blocks are independent: the second half is opened and hashed on another core.
    let half = blocks.len() / 2;
    let (first, second) = blocks.split_at(half);
    let (mut a, b) = std::thread::scope(|s| {
        let other = s.spawn(|| block_leaves(&seg, second));
        (block_leaves(&seg, first), other.join().expect("audit worker panicked"))
    });
    // A problem in the first half ends the segment there; the second half's leaves would not
    // line up with seqs.
    out.purge_runs = newer(a.2.take(), b.2.clone());
    let first_ok = a.1.is_empty();
    out.entries.append(&mut a.0);
    out.problems.extend(a.1);
    if first_ok {
        let mut b = b;
        if let (Some(last), Some(next)) = (out.entries.last(), b.0.first()) {
            let (l, n) = (LeafEntry::decode(last).unwrap(), LeafEntry::decode(next).unwrap());
            if n.recorded_at_ms < l.recorded_at_ms {
                out.problems.push(Problem {
                    location: format!(
                        "seq {} ({})",
                        first_seq + out.entries.len() as u64,
                        seg.path
                    ),
                    detail: "recorded_at decreases".into(),
                });
            }
        }
        out.entries.append(&mut b.0);
        out.problems.extend(b.1);
    }
    if out.problems.is_empty()
        && let BlocksEnd::Broken { offset, detail } = end
    {
        out.problems.push(Problem { location: format!("{} offset {offset}", seg.path), detail });
    }
    out
}

/// What a purged segment contributes: its leaf entries as the tree holds them (the events
/// are gone), each checked to fall within the recorded purge's time bounds.
fn purged_leaves(io: &dyn Io, p: &PurgedSegment, published: u64) -> SegmentLeaves {
    let mut out = SegmentLeaves {
        first_seq: p.first_seq,
        entries: Vec::new(),
        blocks: 0,
        problems: Vec::new(),
        purge_runs: None,
    };
    let location =
        || format!("purged segment {} ({PURGED_PATH})", reader::segment_path(p.first_seq));
    if p.end_seq > published {
        out.problems.push(Problem {
            location: location(),
            detail: format!("ends at seq {} beyond the published tree ({published})", p.end_seq),
        });
        return out;
    }
    let tiles = DiskTiles { io };
    let mut seq = p.first_seq;
    while seq < p.end_seq {
        let index = seq / TILE_WIDTH;
        let width = if (index + 1) * TILE_WIDTH <= published {
            256
        } else {
            (published % TILE_WIDTH) as u32
        };
        let bundle = tiles.bundle(index, width).ok();
        let Some(entries) = bundle.as_deref().and_then(tile::decode_bundle) else {
            out.problems.push(Problem {
                location: tile_path(&TileId::entries(index, width)),
                detail: "missing or malformed entry bundle of a purged segment".into(),
            });
            return out;
        };
        let end = ((index + 1) * TILE_WIDTH).min(p.end_seq);
        for s in seq..end {
            let Some(e) = entries.get((s % TILE_WIDTH) as usize) else { break };
            let Some(entry) = LeafEntry::decode(e) else {
                out.problems.push(Problem {
                    location: format!("seq {s} ({})", tile_path(&TileId::entries(index, width))),
                    detail: "malformed leaf entry".into(),
                });
                return out;
            };
            let t = entry.recorded_at_ms as i64;
            if t < p.oldest_recorded_ms || t > p.newest_recorded_ms {
                out.problems.push(Problem {
                    location: format!("seq {s}"),
                    detail: "recorded_at outside the purged segment's recorded bounds".into(),
                });
            }
            out.entries.push(entry.encode());
        }
        seq = end;
    }
    out
}

/// Leaf entries recomputed from a run of blocks, stopping at the first block that fails.
fn block_leaves(
    seg: &reader::LoadedSegment,
    blocks: &[reader::BlockAt<'_>],
) -> (Vec<[u8; LEAF_ENTRY_BYTES]>, Vec<Problem>, Option<PurgeRuns>) {
    let mut entries = Vec::new();
    let mut problems = Vec::new();
    let mut purge_runs = None;
    let mut last_recorded_at = 0u64;
    for b in blocks {
        let location = || format!("{} offset {}", seg.path, b.offset);
        let plain = match segment::open_block_body(&b.header, b.body, &seg.keys) {
            Ok(p) => p,
            Err(e) => {
                problems.push(Problem { location: location(), detail: e.to_string() });
                break;
            }
        };
        for (k, r) in segment::RecordIter::new(&plain).enumerate() {
            let r = r.expect("open_block_body checked the framing");
            let seq = b.header.first_seq + k as u64;
            if r.canonical.starts_with(PURGE_EVENT_PREFIX)
                && let Some(runs) = vouched_runs(r.canonical)
            {
                purge_runs = Some((seq, runs));
            }
            if r.recorded_at_ms < last_recorded_at {
                problems.push(Problem {
                    location: format!("seq {seq} ({})", location()),
                    detail: "recorded_at decreases".into(),
                });
            }
            last_recorded_at = r.recorded_at_ms;
            let commitment = leaf::commitment(&seg.keys.salts.salt(seq), r.canonical);
            entries.push(LeafEntry { recorded_at_ms: r.recorded_at_ms, commitment }.encode());
        }
    }
    (entries, problems, purge_runs)
}

/// Rebuilds tiles bottom-up from leaf hashes and compares them with the files on disk.
struct TileChecker<'a> {
    io: &'a dyn Io,
    levels: Vec<Vec<Hash>>,
    size: u64,
    /// Partial tile files on disk by (level, index), `None` for entry bundles: each must be a
    /// prefix of what the leaves say, like the full tile it precedes.
    partials: PartialFiles,
}

/// Widths of the partial files on disk, by (tile level or `None` for bundles, tile index).
type PartialFiles = BTreeMap<(Option<u32>, u64), Vec<u32>>;

impl TileChecker<'_> {
    fn push(&mut self, leaf: Hash, problems: &mut Vec<Problem>) {
        self.size += 1;
        self.push_at(0, leaf, problems);
    }

    fn push_at(&mut self, level: usize, hash: Hash, problems: &mut Vec<Problem>) {
        if self.levels.len() == level {
            self.levels.push(Vec::new());
        }
        self.levels[level].push(hash);
        if self.levels[level].len() == TILE_WIDTH as usize {
            let hashes = std::mem::take(&mut self.levels[level]);
            let index = (self.size >> (8 * (level as u32 + 1))) - 1;
            self.compare(&TileId::hashes(level as u32, index, 256), &hashes, problems);
            self.compare_stale_partials(
                Some(level as u32),
                index,
                &hashes.concat(),
                32,
                256,
                problems,
            );
            self.push_at(level + 1, merkle::root_of(&hashes), problems);
        }
    }

    fn compare(&self, t: &TileId, expected: &[Hash], problems: &mut Vec<Problem>) {
        let path = tile_path(t);
        match self.io.read(&path) {
            Ok(bytes) if bytes == expected.concat() => {}
            Ok(bytes) => {
                let at = bytes
                    .chunks(32)
                    .zip(expected)
                    .position(|(a, b)| a != b)
                    .unwrap_or(expected.len().min(bytes.len() / 32));
                problems.push(Problem {
                    location: path,
                    detail: format!(
                        "hash {at} differs from the hash recomputed from the leaves below"
                    ),
                });
            }
            Err(e) => {
                problems.push(Problem { location: path, detail: format!("cannot read: {e}") })
            }
        }
    }

    /// Checks the right-edge partial tiles that a checkpoint of the current size relies on.
    fn compare_partials(&self, problems: &mut Vec<Problem>) {
        for (level, hashes) in self.levels.iter().enumerate() {
            if hashes.is_empty() {
                continue;
            }
            let index = self.size >> (8 * (level as u32 + 1));
            let t = TileId::hashes(level as u32, index, hashes.len() as u32);
            self.compare(&t, hashes, problems);
            let known = hashes.concat();
            self.compare_stale_partials(
                Some(level as u32),
                index,
                &known,
                32,
                hashes.len() as u32,
                problems,
            );
        }
    }

    /// Older partial files of one tile (narrower than the `count` items known) must be prefixes
    /// of it. Wider ones lie beyond the published tree, are covered by no signature yet, and are
    /// removed at the next publication.
    fn compare_stale_partials(
        &self,
        level: Option<u32>,
        index: u64,
        known: &[u8],
        item_bytes: usize,
        count: u32,
        problems: &mut Vec<Problem>,
    ) {
        let Some(widths) = self.partials.get(&(level, index)) else { return };
        for &w in widths.iter().filter(|w| **w < count) {
            let path = tile_path(&TileId { level, index, width: w });
            let expected = if level.is_some() {
                &known[..w as usize * item_bytes]
            } else {
                prefix_of_bundle(known, w)
            };
            match self.io.read(&path) {
                Ok(bytes) if bytes == expected => {}
                Ok(_) => problems.push(Problem {
                    location: path,
                    detail: "differs from the tile recomputed from the leaves".into(),
                }),
                // Listed when the audit began, since deleted: a live store removes the partials
                // a wider one supersedes, as tlog-tiles allows.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    problems.push(Problem { location: path, detail: format!("cannot read: {e}") })
                }
            }
        }
    }
}

/// The first `w` entries of an encoded entry bundle.
fn prefix_of_bundle(bundle: &[u8], w: u32) -> &[u8] {
    let mut off = 0;
    for _ in 0..w {
        if off + 2 > bundle.len() {
            break;
        }
        off += 2 + u16::from_be_bytes([bundle[off], bundle[off + 1]]) as usize;
    }
    &bundle[..off.min(bundle.len())]
}

/// Lists `log/tile`: unknown files are problems; partial files are returned for checking. A
/// tile being written (its temporary file) is none of these: nothing reads it as a tile.
fn partial_files(io: &dyn Io, problems: &mut Vec<Problem>) -> Result<PartialFiles, StoreError> {
    let mut out = PartialFiles::new();
    for path in io.list_tree("log/tile")? {
        if path.ends_with(crate::tree::TMP_SUFFIX) {
            continue;
        }
        match path.strip_prefix("log/").and_then(TileId::parse) {
            Some(t) if !t.is_full() => out.entry((t.level, t.index)).or_default().push(t.width),
            Some(_) => {}
            None => problems.push(Problem {
                location: path,
                detail: "unexpected file in the tile tree".into(),
            }),
        }
    }
    Ok(out)
}

/// Runs the full audit. `progress` is called with the number of events checked so far.
pub fn audit(
    io: &dyn Io,
    keys: &Keys,
    progress: &mut dyn FnMut(u64),
) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    let verifier = keys.signer.verifier();
    if io.len(crate::rekey::REWRAP_JOURNAL_PATH)?.is_some() {
        report.problems.push(Problem {
            location: crate::rekey::REWRAP_JOURNAL_PATH.into(),
            detail: "a key rewrap was interrupted and segment headers may be half written: run \
                     `auditrail key rewrap` to finish it, then verify again"
                .into(),
        });
    }

    // 1. Checkpoints: each signed by the log's key; sizes never shrink.
    let checkpoints = read_checkpoints(io, &verifier, &mut report.problems)?;
    report.checkpoints = checkpoints.len() as u64;
    report.published = checkpoints.last().map_or(0, |c| c.size);
    let mut pending = checkpoints.iter().peekable();
    while let Some(c) = pending.next_if(|c| c.size == 0) {
        check_root(c, &CompactRange::new(), &mut report.problems);
    }

    // 2. Segments, decrypted on a second thread while this one checks leaves and tiles.
    let purged = Purged::load(io)?;
    report.purged_segments = purged.segments().len() as u64;
    report.purged_events = purged.events();
    // Segments on disk and purged ones, in seq order; a purged record wins over a file a
    // crash left behind (opening the store deletes it).
    let mut segments: Vec<(u64, Option<PurgedSegment>)> = list_segments(io)?
        .into_iter()
        .filter(|f| purged.find(*f).is_none())
        .map(|f| (f, None))
        .collect();
    report.segments = segments.len() as u64;
    segments.extend(purged.segments().iter().map(|p| (p.first_seq, Some(p.clone()))));
    segments.sort_by_key(|s| s.0);
    let tiles = DiskTiles { io };
    let partials = partial_files(io, &mut report.problems)?;
    let mut checker = TileChecker { io, levels: vec![Vec::new()], size: 0, partials };
    // The published leaf entries of the current bundle, encoded, to check its older partials.
    let mut bundle_bytes: Vec<u8> = Vec::with_capacity(256 * 43);
    let mut cr = CompactRange::new();
    let mut bundle: Option<(u64, Vec<Vec<u8>>)> = None;
    let published = report.published;
    let mut newest_purge = None;
    std::thread::scope(|scope| -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel::<SegmentLeaves>(1);
        let segs = segments.clone();
        scope.spawn(move || {
            for (first, purged) in segs {
                let leaves = match purged {
                    Some(p) => purged_leaves(io, &p, published),
                    None => segment_leaves(io, keys, first),
                };
                if tx.send(leaves).is_err() {
                    return;
                }
            }
        });
        let mut expect_seq = 0u64;
        for seg in rx {
            newest_purge = newer(newest_purge.take(), seg.purge_runs.clone());
            report.blocks += seg.blocks;
            report.problems.extend(seg.problems);
            if seg.first_seq != expect_seq {
                report.problems.push(Problem {
                    location: reader::segment_path(seg.first_seq),
                    detail: format!(
                        "segment starts at seq {} but seq {expect_seq} was expected",
                        seg.first_seq
                    ),
                });
            }
            for (k, entry) in seg.entries.iter().enumerate() {
                let seq = seg.first_seq + k as u64;
                // The tree's leaf is what the entry bundle says; it must equal what the event
                // commits to.
                let tile_index = seq / TILE_WIDTH;
                if bundle.as_ref().is_none_or(|b| b.0 != tile_index) {
                    let width = if (tile_index + 1) * TILE_WIDTH <= published {
                        256
                    } else {
                        (published % TILE_WIDTH).max(1) as u32
                    };
                    let entries = tiles
                        .bundle(tile_index, width)
                        .ok()
                        .and_then(|b| {
                            tile::decode_bundle(&b)
                                .map(|e| e.into_iter().map(<[u8]>::to_vec).collect())
                        })
                        .unwrap_or_default();
                    bundle = Some((tile_index, entries));
                }
                let in_bundle = bundle.as_ref().and_then(|b| b.1.get((seq % TILE_WIDTH) as usize));
                let leaf_entry: &[u8] = match in_bundle {
                    Some(e) => {
                        if e.as_slice() != entry.as_slice() {
                            report.problems.push(Problem {
                                location: format!(
                                    "seq {seq} ({})",
                                    tile_path(&TileId::entries(tile_index, 256))
                                ),
                                detail: "the leaf entry does not match the event's commitment"
                                    .into(),
                            });
                        }
                        e
                    }
                    None if seq < published => {
                        report.problems.push(Problem {
                            location: format!(
                                "seq {seq} ({})",
                                tile_path(&TileId::entries(tile_index, 256))
                            ),
                            detail: "the published tree has no entry for this event".into(),
                        });
                        entry
                    }
                    // Sequenced after the newest checkpoint: not yet covered by a signature.
                    None => entry,
                };
                if seq < published {
                    bundle_bytes.extend_from_slice(&(leaf_entry.len() as u16).to_be_bytes());
                    bundle_bytes.extend_from_slice(leaf_entry);
                    let filled = (seq % TILE_WIDTH + 1) as u32;
                    if filled == 256 || seq + 1 == published {
                        checker.compare_stale_partials(
                            None,
                            tile_index,
                            &bundle_bytes,
                            43,
                            filled,
                            &mut report.problems,
                        );
                        if filled == 256 {
                            bundle_bytes.clear();
                        }
                    }
                    let leaf = merkle::leaf_hash(leaf_entry);
                    checker.push(leaf, &mut report.problems);
                    cr.append(leaf);
                    while let Some(c) = pending.next_if(|c| c.size == cr.size()) {
                        check_root(c, &cr, &mut report.problems);
                    }
                }
                expect_seq = seq + 1;
                if expect_seq.is_multiple_of(65_536) {
                    progress(expect_seq);
                }
            }
            // A segment whose blocks stopped early leaves a gap the next one reports.
            expect_seq = expect_seq.max(seg.first_seq);
        }
        report.events = expect_seq;
        Ok(())
    })?;
    progress(report.events);

    // 3. Every purged segment must be vouched for by the newest purge event in the log, which
    // the store appends before deleting anything: deleting a segment and adding a line to
    // `retention/purged` is not enough to hide a deletion.
    match &newest_purge {
        None if !purged.segments().is_empty() => report.problems.push(Problem {
            location: PURGED_PATH.into(),
            detail: "segments are recorded as purged, but no retention.purge event in the log \
                     vouches for them"
                .into(),
        }),
        Some((seq, runs)) => {
            for p in purged.segments() {
                if !runs.iter().any(|r| r.0 <= p.first_seq && p.end_seq <= r.1) {
                    report.problems.push(Problem {
                        location: PURGED_PATH.into(),
                        detail: format!(
                            "seqs {}..{} are recorded as purged, but the newest purge event (seq {seq}) does not name them",
                            p.first_seq, p.end_seq
                        ),
                    });
                }
            }
        }
        None => {}
    }

    // 4. Whatever the segments did not reach.
    if report.events < published {
        report.problems.push(Problem {
            location: reader::SEGMENTS_DIR.into(),
            detail: format!(
                "the segments hold {} events but checkpoints cover {published}",
                report.events
            ),
        });
    } else {
        checker.compare_partials(&mut report.problems);
        let w = tile::partial_width(published, 0);
        if w > 0 {
            let t = TileId::entries(published / TILE_WIDTH, w);
            match io.read(&tile_path(&t)) {
                Ok(b) if tile::decode_bundle(&b).is_some_and(|e| e.len() == w as usize) => {}
                Ok(_) => report.problems.push(Problem {
                    location: tile_path(&t),
                    detail: "malformed entry bundle".into(),
                }),
                Err(e) => report
                    .problems
                    .push(Problem { location: tile_path(&t), detail: format!("cannot read: {e}") }),
            }
        }
    }
    forgive_partials_removed_by_a_later_publication(io, &verifier, published, &mut report.problems);
    report.range = cr;
    Ok(report)
}

/// A live store goes on publishing while it is audited, and each publication deletes the
/// partial tiles of the size before. A partial tile of the audited size that is gone is
/// therefore no problem once the checkpoint file names a larger tree; a full audit later
/// checks the partials of that size.
fn forgive_partials_removed_by_a_later_publication(
    io: &dyn Io,
    verifier: &NoteVerifier,
    published: u64,
    problems: &mut Vec<Problem>,
) {
    let is_gone_partial = |p: &Problem| {
        p.location.strip_prefix("log/").and_then(TileId::parse).is_some_and(|t| !t.is_full())
            && io.len(&p.location).is_ok_and(|len| len.is_none())
    };
    if !problems.iter().any(is_gone_partial) {
        return;
    }
    let newer = io
        .read(CHECKPOINT_PATH)
        .ok()
        .and_then(|b| open_checkpoint(&b, verifier).ok())
        .is_some_and(|cp| cp.size > published);
    if newer {
        problems.retain(|p| !is_gone_partial(p));
    }
}

fn check_root(c: &Checkpoint, cr: &CompactRange, problems: &mut Vec<Problem>) {
    if cr.root() != c.root {
        problems.push(Problem {
            location: format!("checkpoint of size {}", c.size),
            detail: "the signed root differs from the root of the leaves".into(),
        });
    }
}

/// A checkpoint note checked against the log's key.
pub(crate) fn open_checkpoint(bytes: &[u8], verifier: &NoteVerifier) -> Result<Checkpoint, String> {
    let s = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let text = note::open(s, std::slice::from_ref(verifier)).map_err(|e| e.to_string())?;
    let cp = Checkpoint::parse(text).map_err(|e| e.to_string())?;
    if cp.origin != verifier.name() {
        return Err("origin differs from the log's key name".into());
    }
    Ok(cp)
}

/// Reads and checks the checkpoint history and `log/checkpoint`; returns the valid ones.
fn read_checkpoints(
    io: &dyn Io,
    verifier: &NoteVerifier,
    problems: &mut Vec<Problem>,
) -> Result<Vec<Checkpoint>, StoreError> {
    let parse = |bytes: &[u8]| open_checkpoint(bytes, verifier);
    // The checkpoint file is read before the history: a live store appends to the history
    // first and then replaces the file, so whatever the file names is in the history read
    // after it, though newer checkpoints may follow it there.
    let checkpoint_file = match io.read(CHECKPOINT_PATH) {
        Ok(b) => {
            Some(parse(&b).map_err(|e| Problem { location: CHECKPOINT_PATH.into(), detail: e }))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(Problem {
            location: CHECKPOINT_PATH.into(),
            detail: format!("cannot read: {e}"),
        })),
    };
    let mut out: Vec<Checkpoint> = Vec::new();
    let history_bytes = match io.read(HISTORY_PATH) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let (records, end) = history::parse(&history_bytes);
    if end != history_bytes.len() {
        problems.push(Problem {
            location: format!("{HISTORY_PATH} offset {end}"),
            detail: "damaged record".into(),
        });
    }
    for (off, note_bytes) in records {
        match parse(note_bytes) {
            Ok(cp) => {
                if let Some(prev) = out.last()
                    && cp.size < prev.size
                {
                    problems.push(Problem {
                        location: format!("{HISTORY_PATH} offset {off}"),
                        detail: format!(
                            "tree size {} is smaller than the previous checkpoint's {}",
                            cp.size, prev.size
                        ),
                    });
                    continue;
                }
                out.push(cp);
            }
            Err(e) => problems
                .push(Problem { location: format!("{HISTORY_PATH} offset {off}"), detail: e }),
        }
    }
    // An older file is only right while a publication is replacing it: a live store appends to
    // the history, then renames the new file into place a few milliseconds later.
    let replaced_since = |cp: &Checkpoint| {
        (0..50).any(|attempt| {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            io.read(CHECKPOINT_PATH)
                .ok()
                .and_then(|b| parse(&b).ok())
                .is_some_and(|now| now.size > cp.size)
        })
    };
    match checkpoint_file {
        Some(Ok(cp)) if out.last() == Some(&cp) => {}
        Some(Ok(cp)) if out.contains(&cp) && replaced_since(&cp) => {}
        Some(Ok(_)) => problems.push(Problem {
            location: CHECKPOINT_PATH.into(),
            detail: "differs from the newest checkpoint in the history".into(),
        }),
        Some(Err(problem)) => problems.push(problem),
        None if out.is_empty() => {}
        None => problems.push(Problem {
            location: CHECKPOINT_PATH.into(),
            detail: "missing, though the history holds checkpoints".into(),
        }),
    }
    Ok(out)
}
