//! Per-segment zstd dictionaries.
//!
//! Reading one event back decrypts and decompresses its whole block, so small blocks make
//! lookups cheap; on their own, small blocks compress badly. A dictionary trained on the
//! events just before a segment fixes that. Measured on one segment of the bench workload,
//! re-packed at several block sizes (table in `docs/performance.md`; the one-off harness is
//! not kept): 4 KiB blocks with a 16 KiB dictionary take 80.7 bytes per event against 85.8
//! for 16 KiB blocks without one, and decompress in 2.7 µs instead of 8.0; 2 KiB blocks (the
//! default since a 10M-event lookup measurement) take 94.5 bytes and 1.5 µs.
//!
//! The sequencer samples the records it appends ([`Samples`]); once a segment is half full it
//! trains the next segment's dictionary from them on a background thread. A segment without
//! a dictionary (a new log's first) trains one after its first MiB of samples and rolls as
//! soon as it is ready. A new segment
//! stores its dictionary sealed under its own data key, right after its header
//! (`docs/format.md`), so the dictionary (which holds fragments of events) is as secret as the
//! events and goes when the segment goes. A segment without one is written as before.

use std::sync::Arc;

/// A trained dictionary's size limit: measured best for audit JSON (64 KiB did no better).
pub const DICTIONARY_BYTES_MAX: usize = 16 << 10;
/// Sample bytes kept for training: about a hundred times the dictionary, as zstd advises.
pub const SAMPLE_BYTES_MAX: usize = 2 << 20;
/// Fewer sampled records than this train no dictionary: too little to learn from.
pub const SAMPLES_MIN: usize = 256;
/// A segment without a dictionary trains one as soon as it has sampled this much, and rolls
/// once it is ready: a new log's first segment stays small, not 64 MiB of large blocks.
pub const SAMPLE_BYTES_FIRST_TRAINING: usize = 1 << 20;

/// A segment's dictionary, ready to decompress with.
pub struct Dictionary {
    raw: Vec<u8>,
    decoder: zstd::dict::DecoderDictionary<'static>,
}

impl Dictionary {
    pub fn new(raw: Vec<u8>) -> Arc<Dictionary> {
        let decoder = zstd::dict::DecoderDictionary::copy(&raw);
        Arc::new(Dictionary { raw, decoder })
    }

    /// The dictionary's bytes, as trained and as stored.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn decoder(&self) -> &zstd::dict::DecoderDictionary<'static> {
        &self.decoder
    }
}

/// An evenly spread sample of the records appended to a segment. Every `stride`-th record is
/// kept; when the budget is full, every other sample is dropped and the stride doubles, so the
/// sample spans the whole segment however large it grows.
pub struct Samples {
    bytes: Vec<u8>,
    sizes: Vec<usize>,
    stride: u64,
    seen: u64,
}

impl Default for Samples {
    fn default() -> Samples {
        Samples { bytes: Vec::new(), sizes: Vec::new(), stride: 1, seen: 0 }
    }
}

impl Samples {
    pub fn offer(&mut self, record: &[u8]) {
        self.seen += 1;
        if !self.seen.is_multiple_of(self.stride) || record.len() > SAMPLE_BYTES_MAX / 4 {
            return;
        }
        if self.bytes.len() + record.len() > SAMPLE_BYTES_MAX {
            self.halve();
        }
        self.bytes.extend_from_slice(record);
        self.sizes.push(record.len());
    }

    fn halve(&mut self) {
        let mut kept = Vec::with_capacity(self.bytes.len() / 2 + 1);
        let mut sizes = Vec::with_capacity(self.sizes.len() / 2 + 1);
        let mut at = 0;
        for (i, &size) in self.sizes.iter().enumerate() {
            if i % 2 == 1 {
                kept.extend_from_slice(&self.bytes[at..at + size]);
                sizes.push(size);
            }
            at += size;
        }
        self.bytes = kept;
        self.sizes = sizes;
        self.stride *= 2;
    }

    pub fn len(&self) -> usize {
        self.sizes.len()
    }

    /// Bytes sampled.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sizes.is_empty()
    }

    /// Trains a dictionary from the samples, or `None` when there are too few of them or zstd
    /// finds nothing worth a dictionary (then the next segment goes without one).
    pub fn train(self) -> Option<Vec<u8>> {
        if self.sizes.len() < SAMPLES_MIN {
            return None;
        }
        zstd::dict::from_continuous(&self.bytes, &self.sizes, DICTIONARY_BYTES_MAX)
            .ok()
            .filter(|d| !d.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stay_in_budget_and_spread_over_everything_offered() {
        let mut s = Samples::default();
        let record =
            |i: u32| format!("{{\"seq\":{i:08},\"action\":\"patient.read\"}}").into_bytes();
        for i in 0..200_000 {
            s.offer(&record(i));
        }
        assert!(s.bytes.len() <= SAMPLE_BYTES_MAX);
        assert_eq!(s.sizes.iter().sum::<usize>(), s.bytes.len());
        // The newest half of what was offered is represented, not just the start.
        let text = String::from_utf8(s.bytes.clone()).unwrap();
        assert!(text.contains("\"seq\":0019"), "late records sampled");
        assert!(text.contains("\"seq\":0000"), "early records kept");
        assert!(s.train().is_some_and(|d| d.len() <= DICTIONARY_BYTES_MAX));
    }

    #[test]
    fn too_few_samples_train_nothing() {
        let mut s = Samples::default();
        for _ in 0..SAMPLES_MIN - 1 {
            s.offer(b"{\"action\":\"login\"}");
        }
        assert!(s.train().is_none());
    }
}
