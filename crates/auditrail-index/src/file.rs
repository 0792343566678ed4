//! The index segment file: `index/<first seq, 20 digits>-<end seq, 20 digits>.idx`.
//!
//! Layout (little-endian): magic `ATRLIDX1`, version byte (1), three zero bytes, `first_seq`
//! u64, `rows` u64, then sections in a fixed order, each a u64 byte length and its bytes:
//! occurred i64×rows, recorded i64×rows, four group-id columns u32×rows, four dictionaries
//! (u32 count, then u32 length + UTF-8 per string), id table (u64 hash, u32 row)×n, term bytes,
//! key ends u32×terms, postings u32×n, posting ends u32×terms, blocks (u64 segment, u64
//! offset, u64 first seq, u32 count)×n; finally a CRC-32C of everything before it.
//! The file is derived data: a file that fails any check is deleted and rebuilt from the log.

use crate::doc::GROUP_FIELDS;
use crate::part::SegmentData;
use auditrail_store::tail::BlockLocation;

const MAGIC: &[u8; 8] = b"ATRLIDX1";
const VERSION: u8 = 1;

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

fn section(out: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; 8]);
    f(out);
    let len = (out.len() - at - 8) as u64;
    out[at..at + 8].copy_from_slice(&len.to_le_bytes());
}

pub fn encode(d: &SegmentData) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, 0, 0, 0]);
    out.extend_from_slice(&d.first_seq.to_le_bytes());
    out.extend_from_slice(&(d.occurred.len() as u64).to_le_bytes());
    section(&mut out, |o| d.occurred.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    section(&mut out, |o| d.recorded.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    for ids in &d.group_ids {
        section(&mut out, |o| ids.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    }
    for dict in &d.dicts {
        section(&mut out, |o| {
            o.extend_from_slice(&(dict.len() as u32).to_le_bytes());
            for s in dict {
                o.extend_from_slice(&(s.len() as u32).to_le_bytes());
                o.extend_from_slice(s.as_bytes());
            }
        });
    }
    section(&mut out, |o| {
        for (h, r) in &d.ids {
            o.extend_from_slice(&h.to_le_bytes());
            o.extend_from_slice(&r.to_le_bytes());
        }
    });
    section(&mut out, |o| o.extend_from_slice(&d.term_bytes));
    section(&mut out, |o| d.key_ends.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    section(&mut out, |o| d.postings.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    section(&mut out, |o| d.post_ends.iter().for_each(|x| o.extend_from_slice(&x.to_le_bytes())));
    section(&mut out, |o| {
        for b in &d.blocks {
            o.extend_from_slice(&b.segment.to_le_bytes());
            o.extend_from_slice(&b.offset.to_le_bytes());
            o.extend_from_slice(&b.first_seq.to_le_bytes());
            o.extend_from_slice(&b.count.to_le_bytes());
        }
    });
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.rest.len() < n {
            return Err("truncated".into());
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn section(&mut self) -> Result<Cursor<'a>, String> {
        let len = usize::try_from(self.u64()?).map_err(|_| "section too large")?;
        Ok(Cursor { rest: self.take(len)? })
    }
    fn array<T>(&mut self, width: usize, f: impl Fn(&[u8]) -> T) -> Result<Vec<T>, String> {
        let s = self.section()?.rest;
        if s.len() % width != 0 {
            return Err("section length is not a whole number of items".into());
        }
        Ok(s.chunks_exact(width).map(f).collect())
    }
}

pub fn decode(bytes: &[u8]) -> Result<SegmentData, String> {
    if bytes.len() < 32 || &bytes[..8] != MAGIC {
        return Err("not an index segment".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body).to_le_bytes() != crc {
        return Err("checksum mismatch".into());
    }
    if bytes[8] != VERSION {
        return Err(format!("unsupported version {}", bytes[8]));
    }
    let mut c = Cursor { rest: &body[12..] };
    let first_seq = c.u64()?;
    let rows = usize::try_from(c.u64()?).map_err(|_| "too many rows")?;
    let i64s = |b: &[u8]| i64::from_le_bytes(b.try_into().expect("8 bytes"));
    let u32s = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes"));
    let occurred = c.array(8, i64s)?;
    let recorded = c.array(8, i64s)?;
    let mut group_ids: [Vec<u32>; GROUP_FIELDS] = Default::default();
    for g in &mut group_ids {
        *g = c.array(4, u32s)?;
    }
    let mut dicts: [Vec<String>; GROUP_FIELDS] = Default::default();
    for d in &mut dicts {
        let mut s = c.section()?;
        let n = s.u32()?;
        for _ in 0..n {
            let len = s.u32()? as usize;
            let text = std::str::from_utf8(s.take(len)?).map_err(|_| "dictionary not UTF-8")?;
            d.push(text.to_string());
        }
    }
    let ids =
        c.array(12, |b| (u64::from_le_bytes(b[..8].try_into().expect("8")), u32s(&b[8..])))?;
    let term_bytes = c.section()?.rest.to_vec();
    let key_ends = c.array(4, u32s)?;
    let postings = c.array(4, u32s)?;
    let post_ends = c.array(4, u32s)?;
    let blocks = c.array(28, |b| BlockLocation {
        segment: u64::from_le_bytes(b[..8].try_into().expect("8")),
        offset: u64::from_le_bytes(b[8..16].try_into().expect("8")),
        first_seq: u64::from_le_bytes(b[16..24].try_into().expect("8")),
        count: u32s(&b[24..28]),
    })?;
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

/// Every offset and id in range, so reads of a loaded segment cannot go out of bounds.
fn check(d: &SegmentData, rows: usize) -> Result<(), String> {
    let ok = d.occurred.len() == rows
        && d.recorded.len() == rows
        && d.group_ids
            .iter()
            .zip(&d.dicts)
            .all(|(ids, dict)| ids.len() == rows && ids.iter().all(|&i| (i as usize) < dict.len()))
        && d.ids.iter().all(|&(_, r)| (r as usize) < rows)
        && d.key_ends.len() == d.post_ends.len()
        && d.key_ends.windows(2).all(|w| w[0] <= w[1])
        && d.key_ends.last().is_none_or(|&e| e as usize == d.term_bytes.len())
        && d.post_ends.windows(2).all(|w| w[0] <= w[1])
        && d.post_ends.last().is_none_or(|&e| e as usize == d.postings.len())
        && d.postings.iter().all(|&r| (r as usize) < rows)
        && d.blocks.windows(2).all(|w| w[0].end_seq() <= w[1].first_seq);
    if ok { Ok(()) } else { Err("inconsistent sections".into()) }
}
