//! Compressed posting lists of frozen segments, and the varints they and the segment file use.
//!
//! A list is stored as whichever is smaller: the gaps between its rows as LEB128 varints
//! (sparse terms: a patient, a user), or a bitmap with one bit per row of the segment (dense
//! terms: an action, an outcome). Measured on the benchmark workload: 80 bytes per event of
//! postings as varints alone, 50 with the choice, 237 as plain `u32`s.
//!
//! Encoded list: kind byte (0 = gaps, 1 = bitmap), varint count, then the gaps (the first row,
//! then each row minus the previous minus one) or `ceil(rows / 8)` bitmap bytes, least
//! significant bit first.

use std::borrow::Cow;

const GAPS: u8 = 0;
const BITMAP: u8 = 1;

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads a varint at `*at`, advancing it; `None` if it runs off the end or past 64 bits.
pub fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

pub fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

pub fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends the encoding of `rows` (ascending, distinct, each `< part_rows`) to `out`.
pub fn encode(rows: &[u32], part_rows: usize, out: &mut Vec<u8>) {
    let start = out.len();
    out.push(GAPS);
    put_varint(out, rows.len() as u64);
    let mut next = 0u32;
    for &r in rows {
        put_varint(out, u64::from(r - next));
        next = r + 1;
    }
    let bitmap_len = part_rows.div_ceil(8);
    if out.len() - start > bitmap_len + 6 {
        out.truncate(start);
        out.push(BITMAP);
        put_varint(out, rows.len() as u64);
        let at = out.len();
        out.resize(at + bitmap_len, 0);
        for &r in rows {
            out[at + r as usize / 8] |= 1 << (r % 8);
        }
    }
}

/// A posting list as a query reads it.
#[derive(Debug, Clone)]
pub enum Postings<'a> {
    Rows(Cow<'a, [u32]>),
    Gaps { count: usize, bytes: &'a [u8] },
    Bitmap { count: usize, bits: &'a [u8] },
}

impl<'a> Postings<'a> {
    pub const EMPTY: Postings<'static> = Postings::Rows(Cow::Borrowed(&[]));

    /// Reads an encoded list (as written by [`encode`]); `None` if malformed.
    pub fn decode(bytes: &'a [u8]) -> Option<Postings<'a>> {
        let kind = *bytes.first()?;
        let mut at = 1;
        let count = usize::try_from(get_varint(bytes, &mut at)?).ok()?;
        let rest = &bytes[at..];
        match kind {
            GAPS => Some(Postings::Gaps { count, bytes: rest }),
            BITMAP => Some(Postings::Bitmap { count, bits: rest }),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Postings::Rows(r) => r.len(),
            Postings::Gaps { count, .. } | Postings::Bitmap { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows, ascending.
    pub fn rows(&self) -> Cow<'a, [u32]> {
        match self {
            Postings::Rows(r) => r.clone(),
            Postings::Gaps { count, bytes } => {
                let mut out = Vec::with_capacity(*count);
                let (mut at, mut next) = (0, 0u64);
                for _ in 0..*count {
                    let Some(gap) = get_varint(bytes, &mut at) else { break };
                    let row = next + gap;
                    out.push(row as u32);
                    next = row + 1;
                }
                Cow::Owned(out)
            }
            Postings::Bitmap { count, bits } => {
                let mut out = Vec::with_capacity(*count);
                for (i, &byte) in bits.iter().enumerate() {
                    let mut b = byte;
                    while b != 0 {
                        out.push(i as u32 * 8 + b.trailing_zeros());
                        b &= b - 1;
                    }
                }
                Cow::Owned(out)
            }
        }
    }

    /// A form that answers `contains` quickly: bitmaps stay as they are, gaps are decoded.
    pub fn into_matcher(self) -> Postings<'a> {
        match self {
            Postings::Gaps { .. } => Postings::Rows(self.rows()),
            other => other,
        }
    }

    /// Whether `row` is in the list; call on an [`into_matcher`](Self::into_matcher) result.
    pub fn contains(&self, row: u32) -> bool {
        match self {
            Postings::Rows(r) => r.binary_search(&row).is_ok(),
            Postings::Bitmap { bits, .. } => {
                bits.get(row as usize / 8).is_some_and(|b| b & (1 << (row % 8)) != 0)
            }
            Postings::Gaps { .. } => self.rows().binary_search(&row).is_ok(),
        }
    }

    /// Checks a list read from disk against its part: `count` rows, ascending, all `< rows`.
    pub fn check(&self, part_rows: usize) -> bool {
        match self {
            Postings::Bitmap { count, bits } => {
                bits.len() == part_rows.div_ceil(8)
                    && bits.iter().map(|b| b.count_ones() as usize).sum::<usize>() == *count
                    && (part_rows.is_multiple_of(8)
                        || bits.last().is_none_or(|&b| b >> (part_rows % 8) == 0))
            }
            Postings::Gaps { count, bytes } => {
                let (mut at, mut next, mut n) = (0, 0u64, 0);
                while at < bytes.len() {
                    let Some(gap) = get_varint(bytes, &mut at) else { return false };
                    next = match next.checked_add(gap) {
                        Some(row) if row < part_rows as u64 => row + 1,
                        _ => return false,
                    };
                    n += 1;
                }
                n == *count
            }
            Postings::Rows(r) => {
                r.windows(2).all(|w| w[0] < w[1])
                    && r.last().is_none_or(|&x| (x as usize) < part_rows)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn lists_round_trip_in_either_form(mut rows in proptest::collection::vec(0u32..5000, 0..3000)) {
            rows.sort_unstable();
            rows.dedup();
            let mut bytes = Vec::new();
            encode(&rows, 5000, &mut bytes);
            let p = Postings::decode(&bytes).unwrap();
            prop_assert!(p.check(5000));
            prop_assert_eq!(p.len(), rows.len());
            let decoded = p.rows();
            prop_assert_eq!(decoded.as_ref(), rows.as_slice());
            let m = p.into_matcher();
            for r in 0..5000u32 {
                prop_assert_eq!(m.contains(r), rows.binary_search(&r).is_ok());
            }
        }

        #[test]
        fn varints_round_trip(v: u64, s: i64) {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            put_varint(&mut out, zigzag(s));
            let mut at = 0;
            prop_assert_eq!(get_varint(&out, &mut at), Some(v));
            prop_assert_eq!(get_varint(&out, &mut at).map(unzigzag), Some(s));
            prop_assert_eq!(at, out.len());
        }
    }

    #[test]
    fn dense_lists_become_bitmaps_and_sparse_ones_gaps() {
        let dense: Vec<u32> = (0..1000).filter(|r| r % 3 != 0).collect();
        let mut bytes = Vec::new();
        encode(&dense, 1000, &mut bytes);
        assert!(matches!(Postings::decode(&bytes), Some(Postings::Bitmap { count: 666, .. })));
        assert!(bytes.len() < 140);
        let sparse = [5u32, 900, 70_000];
        bytes.clear();
        encode(&sparse, 100_000, &mut bytes);
        assert!(matches!(Postings::decode(&bytes), Some(Postings::Gaps { count: 3, .. })));
        assert_eq!(bytes.len(), 1 + 1 + 1 + 2 + 3);
    }

    #[test]
    fn malformed_lists_fail_the_check() {
        let mut bytes = Vec::new();
        encode(&[1, 2, 3], 10, &mut bytes);
        assert!(!Postings::decode(&bytes).unwrap().check(3), "row 3 is out of a 3-row part");
        bytes[1] = 4;
        assert!(!Postings::decode(&bytes).unwrap().check(10), "count disagrees");
        assert!(Postings::decode(&[9, 0]).is_none());
    }
}
