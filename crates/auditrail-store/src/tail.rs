//! Reading the log from outside the writer: forward from any seq, block by block, never past
//! what is durable ([`LogTail`], used by the search index to follow the log and to rebuild
//! itself), and one block at a known place ([`BlockReader`], used to read events back for
//! query results).

use crate::crypto::SegmentKeys;
use crate::error::StoreError;
use crate::io::Io;
use crate::keys::MasterKeys;
use crate::reader::{list_segments, read_segment_opening, segment_path};
use crate::segment::{self, BLOCK_HEADER_BYTES, BlockHeader, RecordIter, RecordRef};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where one block lives, so it can be read back without scanning its segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLocation {
    /// The segment, named by its first seq.
    pub segment: u64,
    /// Byte offset of the block header within the segment file.
    pub offset: u64,
    pub first_seq: u64,
    pub count: u32,
}

impl BlockLocation {
    pub fn end_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }
}

/// Reads the block header at `offset`, or `None` when the file ends before a whole header.
fn read_block_header(
    io: &dyn Io,
    path: &str,
    offset: u64,
) -> Result<Option<BlockHeader>, StoreError> {
    let bytes = io.read_at(path, offset, BLOCK_HEADER_BYTES)?;
    if bytes.len() < BLOCK_HEADER_BYTES {
        return Ok(None);
    }
    BlockHeader::decode(&bytes)
        .map(Some)
        .map_err(|e| StoreError::corrupted(format!("{path} offset {offset}"), e))
}

/// Bytes a random block read asks for beyond the header in a segment without a dictionary:
/// most of its blocks (16 KiB of plaintext) seal to less, so one read gets the whole block.
const BLOCK_READ_AHEAD: usize = 8 << 10;
/// The same in a segment with a dictionary, whose blocks (2 KiB of plaintext) seal to a few
/// hundred bytes: reading 8 KiB for them copied twenty times what was needed, a third of a
/// cold block's cost. A block larger than this takes a second read.
const DICTIONARY_BLOCK_READ_AHEAD: usize = 2 << 10;
/// Bytes the forward reader reads at once at most: many blocks per system call.
const TAIL_READ_BYTES: usize = 512 << 10;
/// Bytes it reads after a read that found the file's end, doubling while reads come back full.
/// A follower at the live end reads a block or two per step (a read's trace is one block),
/// and allocating and zeroing 512 KiB for each of those cost more than the block itself.
const TAIL_READ_BYTES_MIN: usize = 16 << 10;

/// The size of the forward reader's next read, after one that asked for `asked` bytes and
/// got `got`: back to the minimum at the file's end, else doubled up to the maximum.
fn next_tail_read_bytes(asked: usize, got: usize) -> usize {
    if got < asked { TAIL_READ_BYTES_MIN } else { (asked * 2).min(TAIL_READ_BYTES) }
}

/// Whether a block read may wait for the disk, or gives up when the block is not in memory.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    Yes,
    No,
}

/// Reads the whole block at `offset` (header and sealed body), in one read when it is no
/// larger than the header and `read_ahead`.
fn read_block(
    io: &dyn Io,
    path: &str,
    offset: u64,
    read_ahead: usize,
    wait: Wait,
) -> Result<BlockRead, StoreError> {
    let read = |len: usize| match wait {
        Wait::Yes => io.read_at(path, offset, len).map(Some),
        Wait::No => io.read_at_resident(path, offset, len),
    };
    let Some(mut bytes) = read(BLOCK_HEADER_BYTES + read_ahead)? else {
        return Ok(BlockRead::NotResident);
    };
    if bytes.len() < BLOCK_HEADER_BYTES {
        return Ok(BlockRead::NoBlock);
    }
    let header = BlockHeader::decode(&bytes)
        .map_err(|e| StoreError::corrupted(format!("{path} offset {offset}"), e))?;
    let total = header.total_len() as usize;
    if bytes.len() < total {
        let Some(whole) = read(total)? else { return Ok(BlockRead::NotResident) };
        bytes = whole;
    }
    bytes.truncate(total);
    Ok(BlockRead::Block(header, bytes))
}

/// What [`read_block`] found.
enum BlockRead {
    Block(BlockHeader, Vec<u8>),
    /// The file ends before a whole header.
    NoBlock,
    /// Some of the block is not in memory, and the read was not to wait for the disk.
    NotResident,
}

fn open_block(
    path: &str,
    offset: u64,
    header: &BlockHeader,
    block: &[u8],
    keys: &SegmentKeys,
) -> Result<Vec<u8>, StoreError> {
    segment::open_block_body(header, &block[BLOCK_HEADER_BYTES.min(block.len())..], keys)
        .map_err(|e| StoreError::corrupted(format!("{path} offset {offset}"), e))
}

struct Position {
    segment: u64,
    path: String,
    keys: SegmentKeys,
    offset: u64,
    /// Bytes of the segment read ahead, from `ahead_at`, while the log's durable end was
    /// `ahead_durable`: blocks ending at or before that were whole when read.
    ahead: Vec<u8>,
    ahead_at: u64,
    ahead_durable: u64,
    /// Bytes the next fresh read asks for.
    read_bytes: usize,
}

impl Position {
    /// The block at `offset`, from the read-ahead when it holds the whole block and the block
    /// was durable when read, else read anew (up to `TAIL_READ_BYTES` read ahead).
    fn block(
        &mut self,
        io: &dyn Io,
        durable_end: u64,
    ) -> Result<Option<(BlockHeader, std::ops::Range<usize>)>, StoreError> {
        for fresh in [false, true] {
            if fresh {
                self.ahead = io.read_at(&self.path, self.offset, self.read_bytes)?;
                self.read_bytes = next_tail_read_bytes(self.read_bytes, self.ahead.len());
                self.ahead_at = self.offset;
                self.ahead_durable = durable_end;
            }
            let Some(start) = self.offset.checked_sub(self.ahead_at).map(|s| s as usize) else {
                continue;
            };
            let Some(head) = self.ahead.get(start..start + BLOCK_HEADER_BYTES) else {
                if fresh {
                    return Ok(None);
                }
                continue;
            };
            let header = match BlockHeader::decode(head) {
                Ok(h) => h,
                Err(_) if !fresh => continue,
                Err(e) => {
                    return Err(StoreError::corrupted(
                        format!("{} offset {}", self.path, self.offset),
                        e,
                    ));
                }
            };
            let end = start + header.total_len() as usize;
            // A fresh read is checked against the durable end by the caller.
            if end <= self.ahead.len() && (fresh || header.end_seq() <= self.ahead_durable) {
                return Ok(Some((header, start..end)));
            }
            if fresh {
                // Larger than a read-ahead (a block can be up to 256 MiB): read it whole.
                self.ahead = io.read_at(&self.path, self.offset, header.total_len() as usize)?;
                self.ahead_at = self.offset;
                if self.ahead.len() as u64 == header.total_len() {
                    return Ok(Some((header, 0..self.ahead.len())));
                }
                return Err(StoreError::corrupted(
                    format!("{} offset {}", self.path, self.offset),
                    "block extends past the end of the file",
                ));
            }
        }
        unreachable!("a fresh read returns")
    }
}

/// A forward reader of the durable log. It keeps its place between calls, so following a
/// growing log costs only the new blocks.
pub struct LogTail {
    io: Arc<dyn Io>,
    master: MasterKeys,
    next_seq: u64,
    at: Option<Position>,
}

impl LogTail {
    pub fn new(io: Arc<dyn Io>, master: MasterKeys, next_seq: u64) -> LogTail {
        LogTail { io, master, next_seq, at: None }
    }

    /// The seq of the next event this reader will deliver.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// When `next_seq` lies in a segment retention purged, moves past it and returns the
    /// skipped range `[first, end)`: those events no longer exist to be read.
    pub fn skip_purged(&mut self, purged: &crate::retention::Purged) -> Option<(u64, u64)> {
        let p = purged.find(self.next_seq)?;
        let skipped = (self.next_seq, p.end_seq);
        self.next_seq = p.end_seq;
        self.at = None;
        Some(skipped)
    }

    /// Finds the segment and block holding `next_seq`.
    fn seek(&mut self) -> Result<bool, StoreError> {
        let segments = list_segments(self.io.as_ref())?;
        let Some(&segment) = segments.iter().rev().find(|&&first| first <= self.next_seq) else {
            return Ok(false);
        };
        let path = segment_path(segment);
        let (_, keys, blocks_start) =
            read_segment_opening(self.io.as_ref(), &self.master, segment)?;
        let mut offset = blocks_start as u64;
        // Walk the headers (52 bytes each) to the block that holds next_seq.
        while let Some(h) = read_block_header(self.io.as_ref(), &path, offset)? {
            if h.end_seq() > self.next_seq {
                break;
            }
            offset += h.total_len();
        }
        self.at = Some(Position {
            segment,
            path,
            keys,
            offset,
            ahead: Vec::new(),
            ahead_at: 0,
            ahead_durable: 0,
            read_bytes: TAIL_READ_BYTES_MIN,
        });
        Ok(true)
    }

    /// Delivers every event from `next_seq` up to `durable_end` (exclusive), whole blocks at a
    /// time, at most `blocks_max` blocks per call. `durable_end` must be a durable size of the
    /// log (the store's `sequenced`), so nothing that a crash could still take away is read.
    /// Returns how many events were delivered.
    pub fn read(
        &mut self,
        durable_end: u64,
        blocks_max: usize,
        mut f: impl FnMut(&BlockLocation, u64, RecordRef<'_>) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        let start = self.next_seq;
        for _ in 0..blocks_max {
            if self.next_seq >= durable_end {
                break;
            }
            if self.at.is_none() && !self.seek()? {
                break;
            }
            let at = self.at.as_mut().expect("positioned by seek");
            let Some((header, range)) = at.block(self.io.as_ref(), durable_end)? else {
                // The segment ends here: the log continues in the next one.
                let next = self.next_seq;
                let segments = list_segments(self.io.as_ref())?;
                if !segments.contains(&next)
                    && crate::retention::Purged::load(self.io.as_ref())?.find(next).is_some()
                {
                    // Retention erased what follows: the caller skips it (`skip_purged`).
                    self.at = None;
                    break;
                }
                if !segments.contains(&next) || at.segment == next {
                    return Err(StoreError::corrupted(
                        format!("{} offset {}", at.path, at.offset),
                        format!("seq {next} is durable but no block holds it"),
                    ));
                }
                self.at = None;
                continue;
            };
            assert!(header.end_seq() <= durable_end, "a durable size never cuts a block");
            let plain = open_block(&at.path, at.offset, &header, &at.ahead[range], &at.keys)?;
            let location = BlockLocation {
                segment: at.segment,
                offset: at.offset,
                first_seq: header.first_seq,
                count: header.count,
            };
            at.offset += header.total_len();
            for (k, record) in RecordIter::new(&plain).enumerate() {
                let record = record.map_err(|e| {
                    StoreError::corrupted(format!("{} offset {}", at.path, location.offset), e)
                })?;
                let seq = header.first_seq + k as u64;
                if seq >= self.next_seq {
                    f(&location, seq, record)?;
                }
            }
            self.next_seq = header.end_seq();
        }
        Ok(self.next_seq - start)
    }
}

/// Reads single blocks at known locations, keeping each segment's unwrapped keys.
pub struct BlockReader {
    io: Arc<dyn Io>,
    master: MasterKeys,
    /// Shared, not cloned per read: a segment's keys hold expanded AES key schedules.
    keys: Mutex<HashMap<u64, Arc<SegmentKeys>>>,
}

/// A block's events, in seq order, as canonical bytes.
pub struct BlockEvents {
    pub first_seq: u64,
    plain: Vec<u8>,
    /// (start, end) of each record's canonical bytes within `plain`.
    spans: Vec<(u32, u32)>,
}

impl BlockEvents {
    pub fn get(&self, seq: u64) -> Option<&[u8]> {
        let k = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        let &(start, end) = self.spans.get(k)?;
        Some(&self.plain[start as usize..end as usize])
    }

    pub fn len(&self) -> usize {
        self.spans.len()
    }

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Heap bytes held, for cache accounting.
    pub fn bytes(&self) -> usize {
        self.plain.len() + self.spans.len() * 8
    }
}

impl BlockReader {
    pub fn new(io: Arc<dyn Io>, master: MasterKeys) -> BlockReader {
        BlockReader { io, master, keys: Mutex::new(HashMap::new()) }
    }

    /// The unwrapped keys of the segment whose first seq is `segment`, cached.
    fn segment_keys(&self, segment: u64) -> Result<Arc<SegmentKeys>, StoreError> {
        let cached = self.keys.lock().unwrap_or_else(|e| e.into_inner()).get(&segment).cloned();
        match cached {
            Some(k) => Ok(k),
            None => {
                let k = Arc::new(read_segment_opening(self.io.as_ref(), &self.master, segment)?.1);
                self.keys.lock().unwrap_or_else(|e| e.into_inner()).insert(segment, k.clone());
                Ok(k)
            }
        }
    }

    /// The commitment salt of event `seq`, stored in the block at `at`: what an evidence
    /// bundle reveals so that a verifier can recompute that one event's leaf.
    pub fn salt(
        &self,
        at: &BlockLocation,
        seq: u64,
    ) -> Result<auditrail_core::leaf::Salt, StoreError> {
        assert!((at.first_seq..at.end_seq()).contains(&seq), "seq {seq} is not in {at:?}");
        Ok(self.segment_keys(at.segment)?.salts.salt(seq))
    }

    pub fn read(&self, at: &BlockLocation) -> Result<BlockEvents, StoreError> {
        let read = self.read_waiting(at, Wait::Yes)?;
        Ok(read.expect("a read that may wait always reads"))
    }

    /// [`BlockReader::read`], but `None` instead of waiting for the disk when the block is
    /// not in memory: the caller can then [`prefetch`](BlockReader::prefetch) the blocks it
    /// still needs, so that they are read from the disk together rather than one by one.
    pub fn read_if_resident(&self, at: &BlockLocation) -> Result<Option<BlockEvents>, StoreError> {
        self.read_waiting(at, Wait::No)
    }

    /// Starts bringing `blocks` into memory without waiting (each block's usual first read:
    /// the header and the read-ahead).
    pub fn prefetch(&self, blocks: &[BlockLocation]) {
        for at in blocks {
            let Ok(keys) = self.segment_keys(at.segment) else { continue };
            let read_ahead = Self::read_ahead(&keys);
            self.io.prefetch(&segment_path(at.segment), at.offset, BLOCK_HEADER_BYTES + read_ahead);
        }
    }

    fn read_ahead(keys: &SegmentKeys) -> usize {
        match keys.dictionary {
            Some(_) => DICTIONARY_BLOCK_READ_AHEAD,
            None => BLOCK_READ_AHEAD,
        }
    }

    fn read_waiting(
        &self,
        at: &BlockLocation,
        wait: Wait,
    ) -> Result<Option<BlockEvents>, StoreError> {
        let keys = self.segment_keys(at.segment)?;
        let path = segment_path(at.segment);
        let (header, block) =
            match read_block(self.io.as_ref(), &path, at.offset, Self::read_ahead(&keys), wait)? {
                BlockRead::Block(header, block) => (header, block),
                BlockRead::NotResident => return Ok(None),
                BlockRead::NoBlock => {
                    return Err(StoreError::corrupted(
                        format!("{path} offset {}", at.offset),
                        "no block here",
                    ));
                }
            };
        if header.first_seq != at.first_seq || header.count != at.count {
            return Err(StoreError::corrupted(
                format!("{path} offset {}", at.offset),
                "the block here is not the one the index points to",
            ));
        }
        let plain = open_block(&path, at.offset, &header, &block, &keys)?;
        let base = plain.as_ptr() as usize;
        let mut spans = Vec::with_capacity(header.count as usize);
        for record in RecordIter::new(&plain) {
            let record = record
                .map_err(|e| StoreError::corrupted(format!("{path} offset {}", at.offset), e))?;
            let start = record.canonical.as_ptr() as usize - base;
            spans.push((start as u32, (start + record.canonical.len()) as u32));
        }
        Ok(Some(BlockEvents { first_seq: header.first_seq, plain, spans }))
    }

    /// Forgets the keys of a segment (after retention erased it).
    pub fn forget(&self, segment: u64) {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).remove(&segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A follower at the live end reads little; catching up, its reads grow to the maximum.
    #[test]
    fn tail_reads_start_small_at_the_end_and_grow_while_full() {
        let mut asked = TAIL_READ_BYTES_MIN;
        let mut sizes = vec![asked];
        while asked < TAIL_READ_BYTES {
            asked = next_tail_read_bytes(asked, asked);
            sizes.push(asked);
        }
        assert_eq!(sizes, [16 << 10, 32 << 10, 64 << 10, 128 << 10, 256 << 10, 512 << 10]);
        assert_eq!(next_tail_read_bytes(TAIL_READ_BYTES, TAIL_READ_BYTES), TAIL_READ_BYTES);
        assert_eq!(next_tail_read_bytes(TAIL_READ_BYTES, 600), TAIL_READ_BYTES_MIN);
        assert_eq!(next_tail_read_bytes(TAIL_READ_BYTES_MIN, 0), TAIL_READ_BYTES_MIN);
    }
}
