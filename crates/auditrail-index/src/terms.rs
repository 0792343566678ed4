//! The memtable's map from term keys to the rows holding them, built to post all of an event's
//! terms at once.
//!
//! Posting is most of the cost of indexing an event, and most of that is waiting for memory. A
//! full memtable holds a million or more distinct terms (every patient under several
//! parameters, every entity's id), far more than the caches, so finding a rare term misses the
//! cache twice (its slot, then its entry) and posting its row misses a third time (the row
//! list's tail). Probed one after another, an event's ~60 terms wait for each miss in turn.
//! [`TermTable::post`] instead works in phases over all of them: hash every key and prefetch its
//! slot; then read the slots and prefetch the entries they point to; then find or insert each
//! entry and prefetch its list's tail; then post. Misses of one event overlap, and the work
//! between them is the same as before.

use rustc_hash::FxHasher;
use std::hash::Hasher;

/// Bytes of a term key kept inside its entry; longer keys live on the heap.
const KEY_INLINE: usize = 30;

/// A term key, inside its entry when short (nearly all are: a blinded token is 17 bytes), so
/// comparing it reads the entry's cache line and no other.
#[derive(Debug)]
enum TermKey {
    Inline { len: u8, bytes: [u8; KEY_INLINE] },
    Heap(Box<[u8]>),
}

impl TermKey {
    fn new(key: &[u8]) -> TermKey {
        if key.len() <= KEY_INLINE {
            let mut bytes = [0; KEY_INLINE];
            bytes[..key.len()].copy_from_slice(key);
            TermKey::Inline { len: key.len() as u8, bytes }
        } else {
            TermKey::Heap(key.into())
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            TermKey::Inline { len, bytes } => &bytes[..*len as usize],
            TermKey::Heap(bytes) => bytes,
        }
    }
}

/// A term's rows, ascending. Most terms of a memtable occur in one event only (an entity's id,
/// under three parameters), so a single row lives in `last` and the list starts at the second.
#[derive(Debug, Default)]
pub struct TermRows {
    /// Every row, once there are two or more; empty before.
    rows: Vec<u32>,
    /// The last row, beside the key: checking it there saves reading the list's tail.
    last: Option<u32>,
}

impl TermRows {
    fn push(&mut self, row: u32) {
        match self.last {
            // A term repeated within one event is posted once.
            Some(last) if last == row => return,
            Some(last) if self.rows.is_empty() => self.rows.extend([last, row]),
            Some(_) => self.rows.push(row),
            None => {}
        }
        self.last = Some(row);
    }

    pub fn as_slice(&self) -> &[u32] {
        if self.rows.is_empty() { self.last.as_slice() } else { &self.rows }
    }

    /// Where the next row will be written, to prefetch.
    fn tail(&self) -> *const u32 {
        self.rows.as_ptr().wrapping_add(self.rows.len())
    }
}

#[derive(Debug)]
struct Entry {
    key: TermKey,
    rows: TermRows,
}

/// Term keys to rows: open addressing with linear probing over a power-of-two array of slots,
/// at most half full. A slot is 0 when empty, else 32 bits of its key's hash (to skip most
/// mismatches without reading the entry) above its entry's index plus one. Entries are kept
/// in the order their terms first appeared.
#[derive(Debug, Default)]
pub struct TermTable {
    slots: Vec<u64>,
    entries: Vec<Entry>,
}

/// Keys posted per phase: enough misses in flight to fill the memory system, few enough that
/// the first prefetched lines are still cached when their phase reads them.
const POST_BATCH: usize = 32;

impl TermTable {
    /// A table that takes `terms` terms before it grows.
    pub fn with_capacity(terms: usize) -> TermTable {
        let slots = if terms == 0 { 0 } else { (terms * 2).next_power_of_two().max(16) };
        TermTable { slots: vec![0; slots], entries: Vec::with_capacity(terms) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The rows holding `key`.
    pub fn get(&self, key: &[u8]) -> Option<&TermRows> {
        if self.slots.is_empty() {
            return None;
        }
        let index = self.probe(hash(key), key).ok()?;
        Some(&self.entries[index].rows)
    }

    /// Every term and its rows, in the order the terms first appeared.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &TermRows)> {
        self.entries.iter().map(|e| (e.key.as_bytes(), &e.rows))
    }

    /// Posts `row` under every key (a key given twice is posted once).
    pub fn post<'k>(&mut self, keys: impl Iterator<Item = &'k [u8]>, row: u32) {
        let mut keys = keys.peekable();
        while keys.peek().is_some() {
            let mut batch = [&[][..]; POST_BATCH];
            let mut n = 0;
            for key in keys.by_ref().take(POST_BATCH) {
                batch[n] = key;
                n += 1;
            }
            self.post_batch(&batch[..n], row);
        }
    }

    fn post_batch(&mut self, keys: &[&[u8]], row: u32) {
        // Room for every key to be new, so no insert below moves the slots.
        self.reserve(keys.len());
        let mut hashes = [0u64; POST_BATCH];
        for (h, key) in hashes.iter_mut().zip(keys) {
            *h = hash(key);
            prefetch(&self.slots[home(*h, self.slots.len())]);
        }
        for &h in &hashes[..keys.len()] {
            if let Some(index) = self.first_match(h) {
                prefetch(&self.entries[index]);
            }
        }
        let mut found = [0usize; POST_BATCH];
        for ((index, &h), key) in found.iter_mut().zip(&hashes).zip(keys) {
            *index = self.find_or_insert(h, key);
            prefetch(self.entries[*index].rows.tail());
        }
        for &index in &found[..keys.len()] {
            self.entries[index].rows.push(row);
        }
    }

    /// The entry of the first slot along `hash`'s probe whose tag matches, without reading
    /// any entry (to prefetch it).
    fn first_match(&self, hash: u64) -> Option<usize> {
        let mask = self.slots.len() - 1;
        let mut at = home(hash, self.slots.len());
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                return None;
            }
            if slot_tag(slot) == tag(hash) {
                return Some(slot_index(slot));
            }
            at = (at + 1) & mask;
        }
    }

    /// The entry holding `key`, or the empty slot where it would go.
    fn probe(&self, hash: u64, key: &[u8]) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        let mut at = home(hash, self.slots.len());
        loop {
            let slot = self.slots[at];
            if slot == 0 {
                return Err(at);
            }
            if slot_tag(slot) == tag(hash) && self.entries[slot_index(slot)].key.as_bytes() == key {
                return Ok(slot_index(slot));
            }
            at = (at + 1) & mask;
        }
    }

    fn find_or_insert(&mut self, hash: u64, key: &[u8]) -> usize {
        match self.probe(hash, key) {
            Ok(index) => index,
            Err(at) => {
                let index = self.entries.len();
                assert!(index < u32::MAX as usize, "a memtable holds fewer than 2^32 terms");
                self.entries.push(Entry { key: TermKey::new(key), rows: TermRows::default() });
                self.slots[at] = (u64::from(tag(hash)) << 32) | (index as u64 + 1);
                index
            }
        }
    }

    /// Makes room for `more` new terms within the load limit, doubling the slots if needed.
    fn reserve(&mut self, more: usize) {
        let wanted = (self.entries.len() + more) * 2;
        if wanted <= self.slots.len() {
            return;
        }
        let len = wanted.next_power_of_two().max(16).max(self.slots.len() * 2);
        let mut slots = vec![0u64; len];
        for (index, entry) in self.entries.iter().enumerate() {
            let h = hash(entry.key.as_bytes());
            let mut at = home(h, len);
            while slots[at] != 0 {
                at = (at + 1) & (len - 1);
            }
            slots[at] = (u64::from(tag(h)) << 32) | (index as u64 + 1);
        }
        self.slots = slots;
    }
}

fn hash(key: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(key);
    // Spread the bits, so the top ones (the home slot) depend on every byte.
    h.finish().wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The slot a probe for `hash` starts at, in a table of `len` (a power of two) slots.
fn home(hash: u64, len: usize) -> usize {
    (hash >> (64 - len.trailing_zeros())) as usize & (len - 1)
}

fn tag(hash: u64) -> u32 {
    hash as u32
}

fn slot_tag(slot: u64) -> u32 {
    (slot >> 32) as u32
}

fn slot_index(slot: u64) -> usize {
    (slot as u32 - 1) as usize
}

/// Asks the CPU to bring `p`'s cache line in; never faults, whatever `p` points at.
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: a prefetch is a hint that reads nothing architecturally visible and cannot
        // fault, even for an address outside any mapping.
        #[allow(unsafe_code)]
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_posts_each_row_once_and_keeps_a_single_row_without_a_list() {
        let rows_after = |pushes: &[u32]| {
            let mut t = TermRows::default();
            for &r in pushes {
                t.push(r);
            }
            (t.as_slice().to_vec(), t.rows.capacity() > 0)
        };
        assert_eq!(rows_after(&[]), (vec![], false));
        assert_eq!(rows_after(&[3]), (vec![3], false));
        assert_eq!(rows_after(&[3, 3]), (vec![3], false));
        assert_eq!(rows_after(&[3, 5]), (vec![3, 5], true));
        assert_eq!(rows_after(&[3, 5, 5, 9, 9]), (vec![3, 5, 9], true));
    }

    /// Against a `BTreeMap` of the same posts: keys repeated within a row and across rows,
    /// keys sharing a home slot, long keys, more keys than one batch, and growth from empty
    /// through many doublings.
    #[test]
    fn the_table_holds_what_a_map_would() {
        use std::collections::BTreeMap;
        let mut table = TermTable::default();
        let mut model: BTreeMap<Vec<u8>, Vec<u32>> = BTreeMap::new();
        let mut seed = 7u64;
        for row in 0..3000u32 {
            let mut keys: Vec<Vec<u8>> = Vec::new();
            for k in 0..(row % 70) {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let key = match k % 4 {
                    0 => vec![1, (seed >> 60) as u8], // hot: few distinct values
                    1 => format!("\x05{}", seed >> 40).into_bytes(), // rare
                    2 => vec![9; 31 + (seed >> 62) as usize], // long, on the heap
                    _ => keys.first().cloned().unwrap_or_default(), // repeated in this row
                };
                keys.push(key);
            }
            table.post(keys.iter().map(Vec::as_slice), row);
            for key in keys {
                let rows = model.entry(key).or_default();
                if rows.last() != Some(&row) {
                    rows.push(row);
                }
            }
        }
        assert_eq!(table.len(), model.len());
        for (key, rows) in &model {
            assert_eq!(table.get(key).map(TermRows::as_slice), Some(rows.as_slice()), "{key:?}");
        }
        let listed: BTreeMap<Vec<u8>, Vec<u32>> =
            table.iter().map(|(k, r)| (k.to_vec(), r.as_slice().to_vec())).collect();
        assert_eq!(listed, model);
        assert!(table.get(b"\x05absent").is_none());
        assert!(TermTable::default().get(b"x").is_none());
    }
}
