//! Incremental verification: the events published since a prefix already verified, checked
//! against the newest signed checkpoint, so a live log can be re-verified every few minutes at
//! the cost of its new events only. The full audit (`audit.rs`) checks everything, including
//! the prefix, and is run less often.
//!
//! What an increment proves: every event in `[from, to)` opens and commits to the leaf entry
//! the published tree holds for it; the prefix's compact range extended by those leaves has the
//! root the checkpoint of size `to` signs; and the tiles prove that tree consistent with the
//! verified prefix (an RFC 6962 consistency proof), so the log only grew.

use crate::audit::{Problem, open_checkpoint};
use crate::error::StoreError;
use crate::io::Io;
use crate::keys::Keys;
use crate::reader::{self, list_segments, load_segment};
use crate::retention::Purged;
use crate::segment;
use crate::store::CHECKPOINT_PATH;
use crate::tree::{DiskTiles, tile_path};
use auditrail_core::leaf::{self, LeafEntry};
use auditrail_core::merkle::{self, CompactRange};
use auditrail_core::tile::{self, TILE_WIDTH, TileId, TileNodes};

/// What verifying a log needs: its files and its keys ([`crate::Store::auditor`]).
#[derive(Clone)]
pub struct Auditor {
    pub io: std::sync::Arc<dyn Io>,
    pub keys: Keys,
}

impl Auditor {
    /// The full audit ([`crate::audit::audit`]).
    pub fn audit(
        &self,
        progress: &mut dyn FnMut(u64),
    ) -> Result<crate::audit::AuditReport, StoreError> {
        crate::audit::audit(self.io.as_ref(), &self.keys, progress)
    }

    /// The events published since the prefix `verified` covers ([`verify_increment`]).
    pub fn verify_increment(&self, verified: &CompactRange) -> Result<IncrementReport, StoreError> {
        verify_increment(self.io.as_ref(), &self.keys, verified)
    }
}

/// The outcome of one increment.
#[derive(Debug, Clone)]
pub struct IncrementReport {
    /// The verified prefix it started from.
    pub from: u64,
    /// The size of the signed checkpoint it verified against.
    pub to: u64,
    /// Events opened and checked (purged ones are checked against their leaf entries only).
    pub events: u64,
    pub problems: Vec<Problem>,
    /// The compact range of the first `to` leaves: the next increment's start. Only
    /// meaningful when there are no problems.
    pub range: CompactRange,
}

impl IncrementReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The published leaf entries of one entry bundle, read once per tile while walking seqs.
struct Bundles<'a> {
    tiles: DiskTiles<'a>,
    size: u64,
    current: Option<(u64, Vec<Vec<u8>>)>,
}

impl Bundles<'_> {
    fn entry(&mut self, seq: u64) -> Option<&[u8]> {
        let index = seq / TILE_WIDTH;
        if self.current.as_ref().is_none_or(|c| c.0 != index) {
            let width = if (index + 1) * TILE_WIDTH <= self.size {
                TILE_WIDTH as u32
            } else {
                (self.size % TILE_WIDTH) as u32
            };
            let entries = self
                .tiles
                .bundle(index, width)
                .ok()
                .and_then(|b| {
                    tile::decode_bundle(&b).map(|e| e.into_iter().map(<[u8]>::to_vec).collect())
                })
                .unwrap_or_default();
            self.current = Some((index, entries));
        }
        self.current.as_ref().and_then(|c| c.1.get((seq % TILE_WIDTH) as usize)).map(Vec::as_slice)
    }
}

/// Verifies the events published after `verified` (the compact range of a prefix already
/// verified; empty to start from the first event) against the newest signed checkpoint.
pub fn verify_increment(
    io: &dyn Io,
    keys: &Keys,
    verified: &CompactRange,
) -> Result<IncrementReport, StoreError> {
    let from = verified.size();
    let mut report = IncrementReport {
        from,
        to: from,
        events: 0,
        problems: Vec::new(),
        range: verified.clone(),
    };
    let verifier = keys.signer.verifier();
    let checkpoint = match io.read(CHECKPOINT_PATH) {
        Ok(bytes) => open_checkpoint(&bytes, &verifier),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && from == 0 => return Ok(report),
        Err(e) => Err(format!("cannot read: {e}")),
    };
    let checkpoint = match checkpoint {
        Ok(c) => c,
        Err(detail) => {
            report.problems.push(Problem { location: CHECKPOINT_PATH.into(), detail });
            return Ok(report);
        }
    };
    report.to = checkpoint.size;
    if checkpoint.size < from {
        report.problems.push(Problem {
            location: CHECKPOINT_PATH.into(),
            detail: format!(
                "the signed tree has {} leaves, fewer than the {from} already verified",
                checkpoint.size
            ),
        });
        return Ok(report);
    }
    let to = checkpoint.size;
    let purged = Purged::load(io)?;
    let segments = list_segments(io)?;
    let mut bundles = Bundles { tiles: DiskTiles { io }, size: to, current: None };
    let mut range = verified.clone();
    let mut problems = Vec::new();
    'walk: while range.size() < to {
        let seq = range.size();
        if let Some(p) = purged.find(seq) {
            // The events are gone (crypto-erased by retention); the tree keeps their leaves.
            for s in seq..p.end_seq.min(to) {
                let Some(entry) = bundles.entry(s) else {
                    problems.push(missing_entry(s, to));
                    break 'walk;
                };
                range.append(merkle::leaf_hash(entry));
                report.events += 1;
            }
            continue;
        }
        let Some(&first) = segments.iter().rev().find(|f| **f <= seq) else {
            problems.push(Problem {
                location: format!("seq {seq}"),
                detail: "no segment holds this published event".into(),
            });
            break;
        };
        let seg = match load_segment(io, &keys.master, first) {
            Ok(s) => s,
            Err(e) => {
                problems
                    .push(Problem { location: reader::segment_path(first), detail: e.to_string() });
                break;
            }
        };
        let before = range.size();
        let (blocks, end) = seg.blocks();
        // Blocks wholly inside the verified prefix are not opened again.
        for b in blocks.iter().filter(|b| b.header.first_seq + u64::from(b.header.count) > before) {
            if b.header.first_seq >= to {
                break;
            }
            let location = || format!("{} offset {}", seg.path, b.offset);
            let plain = match segment::open_block_body(&b.header, b.body, &seg.keys) {
                Ok(p) => p,
                Err(e) => {
                    problems.push(Problem { location: location(), detail: e.to_string() });
                    break 'walk;
                }
            };
            for (k, r) in segment::RecordIter::new(&plain).enumerate() {
                let r = r.expect("open_block_body checked the framing");
                let s = b.header.first_seq + k as u64;
                if s < range.size() {
                    continue;
                }
                if s >= to {
                    break;
                }
                let commitment = leaf::commitment(&seg.keys.salts.salt(s), r.canonical);
                let entry = LeafEntry { recorded_at_ms: r.recorded_at_ms, commitment }.encode();
                match bundles.entry(s) {
                    Some(published) if published == entry.as_slice() => {}
                    Some(_) => problems.push(Problem {
                        location: format!(
                            "seq {s} ({})",
                            tile_path(&TileId::entries(s / TILE_WIDTH, 256))
                        ),
                        detail: "the leaf entry does not match the event's commitment".into(),
                    }),
                    None => {
                        problems.push(missing_entry(s, to));
                        break 'walk;
                    }
                }
                range.append(merkle::leaf_hash(&entry));
                report.events += 1;
            }
        }
        if range.size() == before {
            let detail = match end {
                reader::BlocksEnd::Broken { offset, detail } => {
                    format!("offset {offset}: {detail}")
                }
                reader::BlocksEnd::Clean => "the segment ends before this published event".into(),
            };
            problems.push(Problem { location: format!("seq {before} ({})", seg.path), detail });
            break;
        }
    }
    if problems.is_empty() {
        if range.root() != checkpoint.root {
            problems.push(Problem {
                location: format!("checkpoint of size {to}"),
                detail: "the signed root differs from the root of the leaves".into(),
            });
        } else if from > 0 && from < to {
            let tiles = DiskTiles { io };
            let proof = merkle::consistency_proof(&TileNodes { tiles: &tiles, size: to }, from, to);
            let checked = proof.map_err(|e| e.to_string()).and_then(|proof| {
                merkle::verify_consistency(from, to, &verified.root(), &checkpoint.root, &proof)
                    .map_err(|e| e.to_string())
            });
            if let Err(e) = checked {
                problems.push(Problem {
                    location: format!("tiles between sizes {from} and {to}"),
                    detail: format!("no valid consistency proof: {e}"),
                });
            }
        }
    }
    report.problems = problems;
    report.range = range;
    Ok(report)
}

fn missing_entry(seq: u64, size: u64) -> Problem {
    let width =
        if (seq / TILE_WIDTH + 1) * TILE_WIDTH <= size { 256 } else { (size % TILE_WIDTH) as u32 };
    Problem {
        location: format!("seq {seq} ({})", tile_path(&TileId::entries(seq / TILE_WIDTH, width))),
        detail: "the published tree has no entry for this event".into(),
    }
}
