//! The tar archives that carry evidence bundles: POSIX ustar written in exactly one way
//! (regular files only, mode 0644, owner and group 0, one modification time for every member,
//! no directory entries, two zero blocks at the end and nothing after them). A reader insists
//! that an archive is byte for byte what its members encode, so no byte of it is slack: damage
//! to a header, to the padding or to the end marker is found as surely as damage to a member.
//! Any tar program reads these archives.

/// Tar works in blocks of 512 bytes: a header, then the data padded to whole blocks.
pub const BLOCK_BYTES: usize = 512;
/// Member names are kept within the ustar `name` field (and below its 100 bytes, so they are
/// always NUL-terminated there); the `prefix` field is never used.
pub const NAME_BYTES_MAX: usize = 99;
/// The largest member the 11 octal digits of the size field can describe.
pub const MEMBER_BYTES_MAX: u64 = 0o77_777_777_777;

const SIZE_AT: usize = 124;
const MTIME_AT: usize = 136;
const CHECKSUM_AT: usize = 148;
const TYPE_AT: usize = 156;

/// The header of a regular file `name` of `size` bytes modified at `mtime_s` (Unix seconds).
pub fn header(name: &str, size: u64, mtime_s: u64) -> [u8; BLOCK_BYTES] {
    assert!(!name.is_empty() && name.len() <= NAME_BYTES_MAX && !name.contains('\0'), "{name:?}");
    assert!(size <= MEMBER_BYTES_MAX && mtime_s <= MEMBER_BYTES_MAX);
    let mut h = [0u8; BLOCK_BYTES];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[SIZE_AT..SIZE_AT + 12].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[MTIME_AT..MTIME_AT + 12].copy_from_slice(format!("{mtime_s:011o}\0").as_bytes());
    h[TYPE_AT] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[329..337].copy_from_slice(b"0000000\0");
    h[337..345].copy_from_slice(b"0000000\0");
    let sum = checksum(&h);
    h[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// The sum of the header's bytes with the checksum field counted as eight spaces.
fn checksum(h: &[u8]) -> u32 {
    h.iter()
        .enumerate()
        .map(|(i, &b)| if (CHECKSUM_AT..CHECKSUM_AT + 8).contains(&i) { 32 } else { u32::from(b) })
        .sum()
}

fn padding(size: usize) -> usize {
    (BLOCK_BYTES - size % BLOCK_BYTES) % BLOCK_BYTES
}

/// Appends one member (header, data, zero padding) to `out`.
pub fn append(out: &mut Vec<u8>, name: &str, mtime_s: u64, data: &[u8]) {
    out.extend_from_slice(&header(name, data.len() as u64, mtime_s));
    out.extend_from_slice(data);
    out.resize(out.len() + padding(data.len()), 0);
}

/// Appends the end of the archive: two zero blocks.
pub fn finish(out: &mut Vec<u8>) {
    out.resize(out.len() + 2 * BLOCK_BYTES, 0);
}

/// One member of a parsed archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
    /// Where its header starts in the archive.
    pub offset: usize,
}

/// Why an archive is not one auditrail wrote: the byte offset where it goes wrong, and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("archive byte {offset}: {what}")]
pub struct TarError {
    pub offset: usize,
    pub what: String,
}

fn fail<T>(offset: usize, what: impl Into<String>) -> Result<T, TarError> {
    Err(TarError { offset, what: what.into() })
}

/// A field of `n - 1` octal digits and a NUL, as [`header`] writes it.
fn octal(field: &[u8]) -> Option<u64> {
    let (digits, nul) = field.split_at(field.len() - 1);
    if nul != b"\0" || !digits.iter().all(|b| (b'0'..=b'7').contains(b)) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 8).ok()
}

/// Parses an archive and returns its members and their common modification time, provided
/// the archive is exactly what [`append`] and [`finish`] write for those members.
pub fn parse(bytes: &[u8]) -> Result<(Vec<Member<'_>>, u64), TarError> {
    let mut members = Vec::new();
    let mut mtime_s = None;
    let mut at = 0usize;
    loop {
        let Some(h) = bytes.get(at..at + BLOCK_BYTES) else {
            return fail(at, "the archive ends where a header or its end marker should be");
        };
        if h.iter().all(|&b| b == 0) {
            let end = at + 2 * BLOCK_BYTES;
            if let Some(i) =
                bytes.get(at..end.min(bytes.len())).and_then(|t| t.iter().position(|&b| b != 0))
            {
                return fail(at + i, "the end-of-archive marker is not two zero blocks");
            }
            if bytes.len() < end {
                return fail(bytes.len(), "the archive ends inside its end-of-archive marker");
            }
            if bytes.len() > end {
                return fail(end, "bytes follow the end-of-archive marker");
            }
            return Ok((members, mtime_s.unwrap_or(0)));
        }
        let stored = octal(&h[CHECKSUM_AT..CHECKSUM_AT + 7]).filter(|_| h[CHECKSUM_AT + 7] == b' ');
        if stored != Some(u64::from(checksum(h))) {
            return fail(at + CHECKSUM_AT, "header checksum does not match the header");
        }
        let name_len = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let Ok(name) = std::str::from_utf8(&h[..name_len]) else {
            return fail(at, "member name is not UTF-8");
        };
        let Some(size) = octal(&h[SIZE_AT..SIZE_AT + 12]) else {
            return fail(at + SIZE_AT, "size field is not 11 octal digits");
        };
        let Some(mtime) = octal(&h[MTIME_AT..MTIME_AT + 12]) else {
            return fail(at + MTIME_AT, "modification time is not 11 octal digits");
        };
        let mtime = *mtime_s.get_or_insert(mtime);
        if name.is_empty() || name_len > NAME_BYTES_MAX {
            return fail(at, "member name is empty or longer than 99 bytes");
        }
        let canonical = header(name, size, mtime);
        if let Some(i) = canonical.iter().zip(h).position(|(a, b)| a != b) {
            return fail(at + i, format!("header of {name} is not as auditrail writes it"));
        }
        let start = at + BLOCK_BYTES;
        let size = size as usize;
        let Some(data) = start.checked_add(size).and_then(|end| bytes.get(start..end)) else {
            return fail(at + SIZE_AT, format!("{name} is longer than the rest of the archive"));
        };
        let end = start + size + padding(size);
        let Some(pad) = bytes.get(start + size..end) else {
            return fail(bytes.len(), format!("the archive ends inside the padding of {name}"));
        };
        if let Some(i) = pad.iter().position(|&b| b != 0) {
            return fail(start + size + i, format!("the padding after {name} is not zeros"));
        }
        members.push(Member { name, data, offset: at });
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive() -> Vec<u8> {
        let mut out = Vec::new();
        append(&mut out, "dir/a.txt", 1_700_000_000, b"hello\n");
        append(&mut out, "dir/empty", 1_700_000_000, b"");
        append(&mut out, "dir/block", 1_700_000_000, &[7u8; 512]);
        finish(&mut out);
        out
    }

    #[test]
    fn round_trips_and_every_byte_matters() {
        let bytes = archive();
        let (members, mtime) = parse(&bytes).unwrap();
        assert_eq!(mtime, 1_700_000_000);
        let names: Vec<&str> = members.iter().map(|m| m.name).collect();
        assert_eq!(names, ["dir/a.txt", "dir/empty", "dir/block"]);
        assert_eq!(members[0].data, b"hello\n");
        assert_eq!(members[2].offset, 2 * 512 + 512);
        // Every byte outside the members' data is structure: changing it is an error.
        let data: Vec<std::ops::Range<usize>> = members
            .iter()
            .map(|m| m.offset + BLOCK_BYTES..m.offset + BLOCK_BYTES + m.data.len())
            .collect();
        for i in (0..bytes.len()).filter(|i| !data.iter().any(|r| r.contains(i))) {
            let mut damaged = bytes.clone();
            damaged[i] ^= 0x01;
            assert!(parse(&damaged).is_err(), "byte {i} changed unnoticed");
        }
        assert!(parse(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(parse(&longer).is_err());
    }

    #[test]
    fn header_fields_are_the_posix_ones() {
        // The end-to-end test extracts a bundle with the system's tar; this pins the fields.
        let h = header("dir/a.txt", 6, 1_700_000_000);
        assert_eq!(&h[124..136], b"00000000006\0");
        assert_eq!(&h[136..148], b"14524770400\0");
        assert_eq!(&h[148..156], format!("{:06o}\0 ", checksum(&h)).as_bytes());
        assert_eq!(&h[257..265], b"ustar\x0000");
    }
}
