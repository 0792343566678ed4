//! The two kinds of index part. The [`Memtable`] takes new events; when it is full it freezes
//! into a [`Segment`], which is immutable, written to one file, and searched by binary search.
//! Both cover a contiguous run of seqs and are read through the [`Part`] trait.
//!
//! Rows are positions within a part (`seq - first_seq`), so postings are `u32`s. The memtable
//! keeps them as plain vectors; a segment keeps them compressed (see [`crate::postings`]).

use crate::doc::{Doc, GROUP_FIELDS};
use crate::postings::{self, Postings};
use crate::terms::TermTable;
use auditrail_store::tail::BlockLocation;
use rustc_hash::FxHashMap;
use std::borrow::Cow;

/// Rows per zone-map chunk: the unit at which time ranges are pruned and counts pre-summed.
pub const CHUNK_ROWS: usize = 4096;

/// What a query reads from a part.
pub trait Part: Send + Sync {
    fn first_seq(&self) -> u64;
    fn len(&self) -> usize;
    fn occurred(&self, row: u32) -> i64;
    /// Every row's `occurred_at`, in row order.
    fn occurred_column(&self) -> &[i64];
    fn recorded(&self, row: u32) -> i64;
    /// The rows holding `key`.
    fn postings(&self, key: &[u8]) -> Postings<'_>;
    fn group_id(&self, group: usize, row: u32) -> u32;
    fn dict(&self, group: usize) -> &[String];
    fn id_rows(&self, hash: u32) -> Vec<u32>;
    fn blocks(&self) -> &[BlockLocation];
    /// Zone maps, when the part has them (frozen segments do).
    fn chunks(&self) -> &[Chunk];

    fn end_seq(&self) -> u64 {
        self.first_seq() + self.len() as u64
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block holding `seq`, if this part covers it.
    fn block_for(&self, seq: u64) -> Option<BlockLocation> {
        let blocks = self.blocks();
        let i = blocks.partition_point(|b| b.end_seq() <= seq);
        blocks.get(i).filter(|b| b.first_seq <= seq).copied()
    }
}

/// A zone-map entry for [`CHUNK_ROWS`] rows: their time bounds and, per group field, how many
/// rows hold each value, so a count over whole chunks never looks at rows.
///
/// Events do not arrive in time order: a chunk of last month's imports can hold a few events
/// from today (the repository's own read traces, a late sender), which stretches its bounds
/// over any recent range. `by_time` lists the chunk's rows in `occurred_at` order (in memory
/// only, rebuilt on load), so a count over a partly covered chunk touches only the rows on
/// the smaller side of the range's edges instead of every row.
#[derive(Debug, Clone, Default)]
pub struct Chunk {
    pub occurred_min: i64,
    pub occurred_max: i64,
    pub counts: [Vec<(u32, u32)>; GROUP_FIELDS],
    /// Row offsets within the chunk, ordered by `occurred_at`.
    pub by_time: Vec<u16>,
}

const _: () = assert!(CHUNK_ROWS <= u16::MAX as usize + 1, "by_time offsets are u16");

impl Chunk {
    /// The chunk's row offsets whose `occurred_at` lies before `from`, within `[from, to)`,
    /// and at or after `to`, given the chunk's times (`times[offset]`).
    pub fn split_by_time<'c>(&'c self, times: &[i64], from: i64, to: i64) -> [&'c [u16]; 3] {
        let lo = self.by_time.partition_point(|&r| times[r as usize] < from);
        let hi = lo + self.by_time[lo..].partition_point(|&r| times[r as usize] < to);
        [&self.by_time[..lo], &self.by_time[lo..hi], &self.by_time[hi..]]
    }
}

fn build_chunks(occurred: &[i64], group_ids: &[Vec<u32>; GROUP_FIELDS]) -> Vec<Chunk> {
    let mut out = Vec::with_capacity(occurred.len().div_ceil(CHUNK_ROWS));
    for (c, times) in occurred.chunks(CHUNK_ROWS).enumerate() {
        let start = c * CHUNK_ROWS;
        let mut chunk = Chunk {
            occurred_min: times.iter().copied().min().unwrap_or(0),
            occurred_max: times.iter().copied().max().unwrap_or(0),
            counts: Default::default(),
            by_time: {
                let mut rows: Vec<u16> = (0..times.len() as u16).collect();
                rows.sort_by_key(|&r| times[r as usize]);
                rows
            },
        };
        for (g, ids) in group_ids.iter().enumerate() {
            let mut tally: FxHashMap<u32, u32> = FxHashMap::default();
            for &id in &ids[start..start + times.len()] {
                *tally.entry(id).or_default() += 1;
            }
            let mut v: Vec<(u32, u32)> = tally.into_iter().collect();
            v.sort_unstable();
            chunk.counts[g] = v;
        }
        out.push(chunk);
    }
    out
}

/// The part that takes new events, in memory only. Losing it in a crash loses nothing: the
/// index catches up from the log.
#[derive(Debug, Default)]
pub struct Memtable {
    first_seq: u64,
    occurred: Vec<i64>,
    recorded: Vec<i64>,
    group_ids: [Vec<u32>; GROUP_FIELDS],
    dicts: [Vec<String>; GROUP_FIELDS],
    dict_ids: [FxHashMap<String, u32>; GROUP_FIELDS],
    /// The id hash of each row (a scan finds an id: cheaper than a map entry per event).
    id_hashes: Vec<u32>,
    /// Each term's rows. Posting is most of the work of indexing an event (some 60 terms
    /// each), and most of that is waiting for memory: see [`TermTable`].
    terms: TermTable,
    blocks: Vec<BlockLocation>,
}

/// A key's first eight bytes as a big-endian integer (zero-padded), which orders keys as their
/// bytes do wherever the prefixes differ.
fn key_prefix(key: &[u8]) -> u64 {
    let mut prefix = [0u8; 8];
    let n = key.len().min(8);
    prefix[..n].copy_from_slice(&key[..n]);
    u64::from_be_bytes(prefix)
}

impl Memtable {
    pub fn new(first_seq: u64) -> Memtable {
        Memtable { first_seq, ..Memtable::default() }
    }

    /// A memtable sized like `previous`, so filling it does not rehash its terms again and again.
    pub fn after(previous: &Memtable) -> Memtable {
        let rows = previous.len();
        Memtable {
            first_seq: previous.end_seq(),
            occurred: Vec::with_capacity(rows),
            recorded: Vec::with_capacity(rows),
            group_ids: std::array::from_fn(|_| Vec::with_capacity(rows)),
            id_hashes: Vec::with_capacity(rows),
            terms: TermTable::with_capacity(previous.terms.len()),
            ..Memtable::default()
        }
    }

    /// Adds the next event; seqs must be contiguous.
    pub fn push(&mut self, doc: Doc, block: &BlockLocation) {
        assert_eq!(doc.seq, self.end_seq(), "the index takes events in seq order, without gaps");
        let row = self.occurred.len() as u32;
        self.occurred.push(doc.occurred_ms);
        self.recorded.push(doc.recorded_ms);
        for (g, value) in doc.group.into_iter().enumerate() {
            let id = match self.dict_ids[g].get(value.as_str()) {
                Some(&id) => id,
                None => {
                    let id = self.dicts[g].len() as u32;
                    self.dicts[g].push(value.clone());
                    self.dict_ids[g].insert(value, id);
                    id
                }
            };
            self.group_ids[g].push(id);
        }
        self.id_hashes.push(doc.id_hash);
        self.terms.post(doc.terms.iter(), row);
        if self.blocks.last() != Some(block) {
            self.blocks.push(*block);
        }
    }

    /// The immutable, compressed form, ready to be written and searched.
    pub fn freeze(&self) -> Segment {
        let rows = self.occurred.len();
        // Sorted by the keys' first eight bytes as an integer, then by the whole key: most keys
        // (blinded tokens, words) differ early, so most comparisons never read the key again.
        let mut keys: Vec<(u64, &[u8], &[u32])> =
            self.terms.iter().map(|(k, t)| (key_prefix(k), k, t.as_slice())).collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        let keys = keys.into_iter().map(|(_, k, rows)| (k, rows));
        let mut term_bytes = Vec::new();
        let mut key_ends = Vec::with_capacity(keys.len());
        let mut encoded = Vec::new();
        let mut post_ends = Vec::with_capacity(keys.len());
        for (key, term_rows) in keys {
            term_bytes.extend_from_slice(key);
            key_ends.push(term_bytes.len() as u32);
            postings::encode(term_rows, rows, &mut encoded);
            post_ends.push(encoded.len() as u32);
        }
        let mut ids: Vec<(u32, u32)> =
            self.id_hashes.iter().enumerate().map(|(row, &h)| (h, row as u32)).collect();
        ids.sort_unstable();
        Segment::new(SegmentData {
            first_seq: self.first_seq,
            occurred: self.occurred.clone(),
            recorded: self.recorded.clone(),
            group_ids: self.group_ids.clone(),
            dicts: self.dicts.clone(),
            ids,
            term_bytes,
            key_ends,
            postings: encoded,
            post_ends,
            blocks: self.blocks.clone(),
        })
    }
}

impl Part for Memtable {
    fn first_seq(&self) -> u64 {
        self.first_seq
    }
    fn len(&self) -> usize {
        self.occurred.len()
    }
    fn occurred(&self, row: u32) -> i64 {
        self.occurred[row as usize]
    }
    fn occurred_column(&self) -> &[i64] {
        &self.occurred
    }
    fn recorded(&self, row: u32) -> i64 {
        self.recorded[row as usize]
    }
    fn postings(&self, key: &[u8]) -> Postings<'_> {
        match self.terms.get(key) {
            Some(t) => Postings::Rows(Cow::Borrowed(t.as_slice())),
            None => Postings::EMPTY,
        }
    }
    fn group_id(&self, group: usize, row: u32) -> u32 {
        self.group_ids[group][row as usize]
    }
    fn dict(&self, group: usize) -> &[String] {
        &self.dicts[group]
    }
    fn id_rows(&self, hash: u32) -> Vec<u32> {
        let rows = self.id_hashes.iter().enumerate();
        rows.filter(|&(_, &h)| h == hash).map(|(row, _)| row as u32).collect()
    }
    fn blocks(&self) -> &[BlockLocation] {
        &self.blocks
    }
    fn chunks(&self) -> &[Chunk] {
        &[]
    }
}

/// The arrays of a frozen segment (what its file holds).
#[derive(Debug, Clone, PartialEq)]
pub struct SegmentData {
    pub first_seq: u64,
    pub occurred: Vec<i64>,
    pub recorded: Vec<i64>,
    pub group_ids: [Vec<u32>; GROUP_FIELDS],
    pub dicts: [Vec<String>; GROUP_FIELDS],
    /// (id hash, row), sorted.
    pub ids: Vec<(u32, u32)>,
    /// Term keys, sorted and concatenated; `key_ends[i]` is where key `i` ends.
    pub term_bytes: Vec<u8>,
    pub key_ends: Vec<u32>,
    /// Encoded posting lists in key order; `post_ends[i]` is where term `i`'s list ends.
    pub postings: Vec<u8>,
    pub post_ends: Vec<u32>,
    pub blocks: Vec<BlockLocation>,
}

/// A frozen part: its data plus zone maps computed when it is built or loaded.
#[derive(Debug)]
pub struct Segment {
    pub data: SegmentData,
    chunks: Vec<Chunk>,
    /// Each block's end seq, in order: what [`Part::block_for`] searches, four times denser
    /// than the block locations (a lookup's 50 searches mostly miss the CPU caches).
    block_ends: Vec<u64>,
    /// Every [`FENCE_STRIDE`]th of `block_ends`: small enough to stay in the CPU caches, so a
    /// search touches only the few cache lines of one stride of `block_ends` beyond it.
    block_fence: Vec<u64>,
}

/// Block ends per entry of [`Segment`]'s `block_fence` (one stride is 8 cache lines).
const FENCE_STRIDE: usize = 64;

impl Segment {
    pub fn new(data: SegmentData) -> Segment {
        let chunks = build_chunks(&data.occurred, &data.group_ids);
        let block_ends: Vec<u64> = data.blocks.iter().map(|b| b.end_seq()).collect();
        let block_fence = block_ends.iter().step_by(FENCE_STRIDE).copied().collect();
        Segment { data, chunks, block_ends, block_fence }
    }

    fn key(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.data.key_ends[i - 1] as usize };
        &self.data.term_bytes[start..self.data.key_ends[i] as usize]
    }

    /// The encoded posting list of term `i`.
    pub fn encoded_postings(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.data.post_ends[i - 1] as usize };
        &self.data.postings[start..self.data.post_ends[i] as usize]
    }
}

impl Part for Segment {
    fn first_seq(&self) -> u64 {
        self.data.first_seq
    }
    fn len(&self) -> usize {
        self.data.occurred.len()
    }
    fn occurred(&self, row: u32) -> i64 {
        self.data.occurred[row as usize]
    }
    fn occurred_column(&self) -> &[i64] {
        &self.data.occurred
    }
    fn recorded(&self, row: u32) -> i64 {
        self.data.recorded[row as usize]
    }
    fn postings(&self, key: &[u8]) -> Postings<'_> {
        let (mut lo, mut hi) = (0, self.data.key_ends.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.key(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                // Lists were checked when the segment was built or loaded.
                std::cmp::Ordering::Equal => {
                    return Postings::decode(self.encoded_postings(mid)).unwrap_or(Postings::EMPTY);
                }
            }
        }
        Postings::EMPTY
    }
    fn group_id(&self, group: usize, row: u32) -> u32 {
        self.data.group_ids[group][row as usize]
    }
    fn dict(&self, group: usize) -> &[String] {
        &self.data.dicts[group]
    }
    fn id_rows(&self, hash: u32) -> Vec<u32> {
        let ids = &self.data.ids;
        let start = ids.partition_point(|&(h, _)| h < hash);
        ids[start..].iter().take_while(|&&(h, _)| h == hash).map(|&(_, r)| r).collect()
    }
    fn blocks(&self) -> &[BlockLocation] {
        &self.data.blocks
    }
    fn block_for(&self, seq: u64) -> Option<BlockLocation> {
        // The first block ending after `seq` lies after the last fence entry ending at or
        // before `seq`, and no later than the next fence entry: within two strides of it.
        let stride = self.block_fence.partition_point(|&end| end <= seq).saturating_sub(1);
        let from = stride * FENCE_STRIDE;
        let window = &self.block_ends[from..(from + 2 * FENCE_STRIDE).min(self.block_ends.len())];
        let i = from + window.partition_point(|&end| end <= seq);
        self.data.blocks.get(i).filter(|b| b.first_seq <= seq).copied()
    }
    fn chunks(&self) -> &[Chunk] {
        &self.chunks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment of `rows` events from seq 1000 in blocks of 1 to 9 events: only its blocks
    /// matter here.
    fn segment_of_blocks(rows: u64) -> Segment {
        let first_seq = 1000;
        let (mut blocks, mut seq, mut size) = (Vec::new(), first_seq, 1u32);
        while seq < first_seq + rows {
            let count = size.min((first_seq + rows - seq) as u32);
            blocks.push(BlockLocation { segment: 0, offset: seq * 10, first_seq: seq, count });
            seq += u64::from(count);
            size = size % 9 + 1;
        }
        let rows = rows as usize;
        Segment::new(SegmentData {
            first_seq,
            occurred: vec![0; rows],
            recorded: vec![0; rows],
            group_ids: std::array::from_fn(|_| vec![0; rows]),
            dicts: std::array::from_fn(|_| vec![String::new()]),
            ids: Vec::new(),
            term_bytes: Vec::new(),
            key_ends: Vec::new(),
            postings: Vec::new(),
            post_ends: Vec::new(),
            blocks,
        })
    }

    #[test]
    fn block_for_finds_the_block_of_every_seq_through_the_fence() {
        // Around the fence's stride: one block, under one stride, exactly one, and many.
        for rows in [1, 5, 300, 321, 5000] {
            let segment = segment_of_blocks(rows);
            assert!(segment.block_for(999).is_none());
            assert!(segment.block_for(1000 + rows).is_none());
            for seq in 1000..1000 + rows {
                let expected =
                    segment.data.blocks.iter().find(|b| (b.first_seq..b.end_seq()).contains(&seq));
                assert_eq!(segment.block_for(seq).as_ref(), expected, "seq {seq} of {rows}");
            }
        }
    }

    /// Keys that tie on their first eight bytes, are prefixes of one another, or hold zero
    /// bytes where a shorter key is padded: the frozen segment lists them in byte order, so
    /// its binary search finds every one with its rows.
    #[test]
    fn freeze_orders_keys_by_their_bytes_whatever_their_prefixes() {
        let keys: [&[u8]; 12] = [
            b"\x05abcdefgh",
            b"\x05abcdefg",
            b"\x05abcdefg\x00",
            b"\x05abcdefgz",
            b"\x05a",
            b"\x05a\x00",
            b"\x05",
            b"\x09\xff\xff\xff\xff\xff\xff\xff\x01",
            b"\x09\xff\xff\xff\xff\xff\xff\xff",
            b"\x01",
            b"\x05abcdefgh\x00\x00",
            b"\x05abcdefgha",
        ];
        let mut memtable = Memtable::new(0);
        for (seq, key) in keys.iter().enumerate() {
            let mut doc = Doc::placeholder(seq as u64, 0);
            doc.terms.push_key(key);
            doc.terms.push_key(keys[0]);
            let block = BlockLocation { segment: 0, offset: 0, first_seq: 0, count: 12 };
            memtable.push(doc, &block);
        }
        for (row, key) in keys.iter().enumerate().skip(1) {
            assert_eq!(memtable.postings(key).rows().as_ref(), &[row as u32], "{key:?}");
        }
        assert_eq!(memtable.postings(keys[0]).len(), keys.len());
        let segment = memtable.freeze();
        let frozen: Vec<&[u8]> = (0..segment.data.key_ends.len()).map(|i| segment.key(i)).collect();
        let mut sorted = keys.to_vec();
        sorted.sort();
        assert_eq!(frozen, sorted);
        for (row, key) in keys.iter().enumerate().skip(1) {
            assert_eq!(segment.postings(key).rows().as_ref(), &[row as u32], "{key:?}");
        }
        assert_eq!(segment.postings(keys[0]).len(), keys.len());
    }
}
