//! The index segment file: `index/<first seq, 20 digits>-<end seq, 20 digits>.idx`.
//!
//! Layout: magic `ATRLIDX1`, version byte (5), three zero bytes, then little-endian u64s
//! `first_seq`, `rows` and the payload's length before compression (36 bytes in all), a
//! 12-byte random nonce, then the payload as one zstd frame sealed with AES-256-GCM under the
//! index's file key (associated data: the first 36 bytes), and finally a CRC-32C of everything
//! before it. The terms (user ids, actions, addresses, words of free text) are as sensitive as
//! the events, so without the master key, which seals the index's secret, nothing in the file
//! is readable. Version 2 files (the same without encryption) are dropped and rebuilt.
//!
//! The payload is a sequence of varints (LEB128; "zz" marks zigzag-encoded signed values):
//! - `occurred_at` of each row as the zz difference from the previous row's (the first from 0),
//!   then `recorded_at` the same way;
//! - four group-id columns (action, user, outcome, category), one varint per row each;
//! - four dictionaries: count, then per string its length and UTF-8 bytes;
//! - the id table sorted by hash: count, then per entry the hash's difference from the
//!   previous hash and the row;
//! - the terms in key order: count, then per term the length of the prefix it shares with the
//!   previous key, the length of the rest, the rest, the length of its encoded posting list
//!   (see `postings.rs`) and the list;
//! - the log blocks: count, then per block its segment, offset, first seq and event count.
//!
//! The file is derived data: a file that fails any check (a checksum, the authentication tag
//! under this index's key) is deleted and rebuilt from the log.

use crate::doc::GROUP_FIELDS;
use crate::part::SegmentData;
use crate::postings::{Postings, get_varint, put_varint, unzigzag, zigzag};
use auditrail_store::crypto::{self, NONCE_BYTES, Sealer, TAG_BYTES};
use auditrail_store::tail::BlockLocation;

const MAGIC: &[u8; 8] = b"ATRLIDX1";
/// 3: every event carries a `Field::Stream` term (client or repository).
/// 4: the payload is sealed (encrypted at rest). Files of an older version fail the check,
/// are dropped, and are rebuilt from the log on start.
/// 5: a blinded term's HMAC covers only the value (the key's first byte is the tag).
const VERSION: u8 = 5;
/// Magic, version, padding and the three u64s: the associated data of the sealed payload.
const HEADER_BYTES: usize = 36;
/// The smallest file: header, nonce, an empty sealed payload (its tag) and the CRC.
const FILE_BYTES_MIN: usize = HEADER_BYTES + NONCE_BYTES + TAG_BYTES + 4;
/// Largest payload a file may declare (a damaged length must not allocate without bound).
const PAYLOAD_MAX: u64 = 1 << 34;

pub fn file_name(first_seq: u64, end_seq: u64) -> String {
    format!("{first_seq:020}-{end_seq:020}.idx")
}

pub fn parse_file_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".idx")?;
    let (a, b) = stem.split_once('-')?;
    if a.len() != 20 || b.len() != 20 {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Encodes a segment, compressed and sealed under `key` (the index's file key).
pub fn encode(d: &SegmentData, key: &Sealer) -> Vec<u8> {
    let mut p = Vec::with_capacity(d.occurred.len() * 64);
    for times in [&d.occurred, &d.recorded] {
        let mut prev = 0i64;
        for &t in times {
            put_varint(&mut p, zigzag(t.wrapping_sub(prev)));
            prev = t;
        }
    }
    for ids in &d.group_ids {
        ids.iter().for_each(|&id| put_varint(&mut p, id.into()));
    }
    for dict in &d.dicts {
        put_varint(&mut p, dict.len() as u64);
        for s in dict {
            put_varint(&mut p, s.len() as u64);
            p.extend_from_slice(s.as_bytes());
        }
    }
    put_varint(&mut p, d.ids.len() as u64);
    let mut prev = 0u32;
    for &(hash, row) in &d.ids {
        put_varint(&mut p, (hash - prev).into());
        put_varint(&mut p, row.into());
        prev = hash;
    }
    put_varint(&mut p, d.key_ends.len() as u64);
    let (mut key_start, mut post_start, mut prev_key): (usize, usize, &[u8]) = (0, 0, &[]);
    for (&key_end, &post_end) in d.key_ends.iter().zip(&d.post_ends) {
        let key = &d.term_bytes[key_start..key_end as usize];
        let shared = key.iter().zip(prev_key).take_while(|(a, b)| a == b).count();
        put_varint(&mut p, shared as u64);
        put_varint(&mut p, (key.len() - shared) as u64);
        p.extend_from_slice(&key[shared..]);
        let list = &d.postings[post_start..post_end as usize];
        put_varint(&mut p, list.len() as u64);
        p.extend_from_slice(list);
        (key_start, post_start, prev_key) = (key_end as usize, post_end as usize, key);
    }
    put_varint(&mut p, d.blocks.len() as u64);
    for b in &d.blocks {
        for v in [b.segment, b.offset, b.first_seq, b.count.into()] {
            put_varint(&mut p, v);
        }
    }

    let mut out = Vec::with_capacity(p.len() / 2);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&d.first_seq.to_le_bytes());
    out.extend_from_slice(&(d.occurred.len() as u64).to_le_bytes());
    out.extend_from_slice(&(p.len() as u64).to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_BYTES);
    let compressed = zstd::bulk::compress(&p, 1).expect("compressing to memory cannot fail");
    let nonce = crypto::random::<NONCE_BYTES>();
    let sealed = key.seal(&nonce, &out[..HEADER_BYTES], &compressed);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads the payload; every read is bounds-checked, so damage is an error, never a panic.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        get_varint(self.bytes, &mut self.at).ok_or_else(|| format!("bad varint at {}", self.at))
    }

    /// A count or length, refused when larger than what is left to read could hold.
    fn len(&mut self) -> Result<usize, String> {
        let n = self.varint()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(format!("length {n} at {} runs past the end", self.at));
        }
        Ok(n as usize)
    }

    fn u32(&mut self) -> Result<u32, String> {
        u32::try_from(self.varint()?).map_err(|_| format!("value too large at {}", self.at))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or("truncated")?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }
}

/// Checks, opens (with `key`) and decodes a segment file.
pub fn decode(bytes: &[u8], key: &Sealer) -> Result<SegmentData, String> {
    if bytes.len() < FILE_BYTES_MIN || &bytes[..8] != MAGIC {
        return Err("not an index segment".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if bytes[8] != VERSION {
        return Err(format!("unsupported version {}", bytes[8]));
    }
    let word = |i: usize| u64::from_le_bytes(body[12 + 8 * i..20 + 8 * i].try_into().expect("8"));
    let (first_seq, rows, payload_len) = (word(0), word(1), word(2));
    if payload_len > PAYLOAD_MAX || rows > payload_len {
        return Err("implausible sizes".into());
    }
    let nonce: [u8; NONCE_BYTES] =
        body[HEADER_BYTES..HEADER_BYTES + NONCE_BYTES].try_into().expect("nonce bytes");
    let compressed =
        key.open(&nonce, &body[..HEADER_BYTES], &body[HEADER_BYTES + NONCE_BYTES..])
            .map_err(|_| "cannot decrypt: another index key, or altered bytes".to_string())?;
    let payload = zstd::bulk::decompress(&compressed, payload_len as usize)
        .map_err(|e| format!("cannot decompress: {e}"))?;
    if payload.len() as u64 != payload_len {
        return Err("payload length mismatch".into());
    }
    let rows = rows as usize;
    let mut r = Reader { bytes: &payload, at: 0 };
    let mut times = || -> Result<Vec<i64>, String> {
        let mut out = Vec::with_capacity(rows);
        let mut prev = 0i64;
        for _ in 0..rows {
            prev = prev.wrapping_add(unzigzag(r.varint()?));
            out.push(prev);
        }
        Ok(out)
    };
    let occurred = times()?;
    let recorded = times()?;
    let mut group_ids: [Vec<u32>; GROUP_FIELDS] = Default::default();
    for g in &mut group_ids {
        *g = (0..rows).map(|_| r.u32()).collect::<Result<_, _>>()?;
    }
    let mut dicts: [Vec<String>; GROUP_FIELDS] = Default::default();
    for d in &mut dicts {
        for _ in 0..r.len()? {
            let len = r.len()?;
            let text = std::str::from_utf8(r.take(len)?).map_err(|_| "dictionary not UTF-8")?;
            d.push(text.to_string());
        }
    }
    let mut ids = Vec::with_capacity(rows);
    let mut hash = 0u32;
    for _ in 0..r.len()? {
        hash = hash.checked_add(r.u32()?).ok_or("id hashes out of order")?;
        ids.push((hash, r.u32()?));
    }
    let terms = r.len()?;
    let (mut term_bytes, mut key_ends) = (Vec::new(), Vec::with_capacity(terms));
    let (mut postings, mut post_ends) = (Vec::new(), Vec::with_capacity(terms));
    let mut prev_start = 0;
    for _ in 0..terms {
        let shared = r.len()?;
        let rest = r.len()?;
        let start = term_bytes.len();
        if shared > start - prev_start {
            return Err("a key shares more than the previous key holds".into());
        }
        term_bytes.extend_from_within(prev_start..prev_start + shared);
        term_bytes.extend_from_slice(r.take(rest)?);
        key_ends.push(u32::try_from(term_bytes.len()).map_err(|_| "too many key bytes")?);
        prev_start = start;
        let len = r.len()?;
        let list = r.take(len)?;
        if !Postings::decode(list).is_some_and(|p| p.check(rows)) {
            return Err(format!("posting list {} is damaged", key_ends.len() - 1));
        }
        postings.extend_from_slice(list);
        post_ends.push(u32::try_from(postings.len()).map_err(|_| "too many posting bytes")?);
    }
    let mut blocks = Vec::new();
    for _ in 0..r.len()? {
        blocks.push(BlockLocation {
            segment: r.varint()?,
            offset: r.varint()?,
            first_seq: r.varint()?,
            count: r.u32()?,
        });
    }
    if r.at != payload.len() {
        return Err("trailing bytes".into());
    }
    let d = SegmentData {
        first_seq,
        occurred,
        recorded,
        group_ids,
        dicts,
        ids,
        term_bytes,
        key_ends,
        postings,
        post_ends,
        blocks,
    };
    check(&d, rows)?;
    Ok(d)
}

/// Every id and key in range and in order, so reads of a loaded segment cannot go wrong.
fn check(d: &SegmentData, rows: usize) -> Result<(), String> {
    let mut keys = d.key_ends.iter().scan(0usize, |start, &end| {
        let key = &d.term_bytes[*start..end as usize];
        *start = end as usize;
        Some(key)
    });
    let mut sorted = true;
    if let Some(mut prev) = keys.next() {
        for key in keys {
            sorted &= prev < key;
            prev = key;
        }
    }
    let ok = sorted
        && d.occurred.len() == rows
        && d.recorded.len() == rows
        && d.group_ids
            .iter()
            .zip(&d.dicts)
            .all(|(ids, dict)| ids.len() == rows && ids.iter().all(|&i| (i as usize) < dict.len()))
        && d.ids.len() == rows
        && d.ids.iter().all(|&(_, r)| (r as usize) < rows)
        && d.blocks.windows(2).all(|w| w[0].end_seq() <= w[1].first_seq);
    if ok { Ok(()) } else { Err("inconsistent sections".into()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doc::{Doc, Terms};
    use crate::part::{Memtable, Part};

    fn sample() -> SegmentData {
        let mut m = Memtable::new(1000);
        for i in 0..3000u64 {
            let mut terms = Terms::default();
            terms.push(1, if i % 3 == 0 { b"patient.read" } else { b"login.success" });
            terms.push(9, format!("p{}", i % 97).as_bytes());
            terms.push(9, format!("p{}", i % 97).as_bytes());
            let doc = Doc {
                seq: 1000 + i,
                occurred_ms: 1_795_000_000_000 + (i as i64 * 7919) % 100_000,
                recorded_ms: 1_795_000_000_000 + i as i64,
                id_hash: (i * 2_654_435_761) as u32,
                group: [
                    format!("a{}", i % 5),
                    format!("u{}", i % 50),
                    "success".into(),
                    "c".into(),
                ],
                terms,
            };
            let block = BlockLocation {
                segment: 1,
                offset: i / 100 * 4096,
                first_seq: 1000 + i / 100 * 100,
                count: 100,
            };
            m.push(doc, &block);
        }
        m.freeze().data
    }

    fn key() -> Sealer {
        Sealer::new(&[5; 32])
    }

    #[test]
    fn segments_round_trip() {
        let d = sample();
        assert_eq!(decode(&encode(&d, &key()), &key()).unwrap(), d);
        let seg = crate::part::Segment::new(d);
        assert_eq!(seg.postings(b"\x09p5").rows().len(), 3000 / 97 + 1);
        assert_eq!(seg.postings(b"\x01patient.read").len(), 1000);
    }

    #[test]
    fn damage_is_an_error_not_a_panic() {
        let bytes = encode(&sample(), &key());
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x20;
            assert!(decode(&b, &key()).is_err(), "a flip at {i} went unnoticed");
        }
        for n in [0, 10, 39, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..n], &key()).is_err());
        }
    }

    #[test]
    fn files_are_unreadable_without_the_key() {
        let d = sample();
        let bytes = encode(&d, &key());
        let e = decode(&bytes, &Sealer::new(&[6; 32])).unwrap_err();
        assert!(e.contains("cannot decrypt"), "{e}");
        // Neither the terms nor the dictionaries are there in the clear, nor a zstd frame
        // that would hold them.
        let zstd_magic = [0x28, 0xb5, 0x2f, 0xfd];
        for needle in [&b"patient.read"[..], b"login.success", &zstd_magic] {
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "{needle:?} is readable");
        }
        // Even with a valid checksum, a file sealed under another key is refused.
        let other = encode(&d, &Sealer::new(&[6; 32]));
        assert!(decode(&other, &key()).is_err());
    }
}
