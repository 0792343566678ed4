//! Segment files: the payload store and the write-ahead log in one. A segment is a header,
//! its compression dictionary if it has one, and blocks; each block holds a few KiB of
//! plaintext of one group commit: its events' records, zstd-compressed (with the segment's
//! dictionary, when it has one), then sealed with AES-256-GCM under the segment's data key.
//! Byte layouts are in `docs/format.md`; every structure carries a version byte and a CRC-32C.

use std::sync::Arc;

use crate::crypto::{self, KEY_BYTES, NONCE_BYTES, Sealer, SegmentKeys, TAG_BYTES};
use crate::dictionary::Dictionary;

pub const SEGMENT_MAGIC: &[u8; 8] = b"ATRLSEG1";
/// A segment without a dictionary: blocks start right after the header.
pub const SEGMENT_VERSION: u8 = 1;
/// A segment whose header is followed by its sealed dictionary.
pub const SEGMENT_VERSION_DICTIONARY: u8 = 2;
pub const SEGMENT_HEADER_BYTES: usize = 96;
pub const DICTIONARY_MAGIC: &[u8; 4] = b"ATDC";
/// The dictionary's framing: magic, sealed length (u32), nonce, CRC-32C of the sealed bytes.
pub const DICTIONARY_FRAME_BYTES: usize = 24;
/// The largest sealed dictionary a reader accepts: anything larger is corruption.
pub const DICTIONARY_SEALED_BYTES_MAX: usize = 1 << 20;
/// Enough of a segment's start to learn where its blocks begin ([`opening_len`]).
pub const OPENING_PREFIX_BYTES: usize = SEGMENT_HEADER_BYTES + DICTIONARY_FRAME_BYTES;
pub const BLOCK_MAGIC: &[u8; 4] = b"ATBK";
pub const BLOCK_VERSION: u8 = 1;
pub const BLOCK_HEADER_BYTES: usize = 52;
const COMPRESSION_ZSTD: u8 = 1;
/// zstd with the segment's dictionary.
const COMPRESSION_ZSTD_DICTIONARY: u8 = 2;
/// Bytes of a block header that the GCM tag authenticates (everything but the nonce and CRCs).
const BLOCK_AAD_BYTES: usize = 32;
/// Per-record framing inside a block's plaintext: `recorded_at` (u64) and length (u32).
pub const RECORD_HEADER_BYTES: usize = 12;
/// The largest sealed block body a reader accepts: anything larger is corruption.
pub const BLOCK_SEALED_BYTES_MAX: usize = 256 << 20;
/// zstd level: 1 is the fastest and compresses audit JSON about 5x in 100 KB blocks.
pub const ZSTD_LEVEL: i32 = 1;

pub fn segment_file_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())?
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHeader {
    /// [`SEGMENT_VERSION`] or [`SEGMENT_VERSION_DICTIONARY`].
    pub version: u8,
    pub key_version: u32,
    pub first_seq: u64,
    pub created_ms: i64,
    pub wrap_nonce: [u8; NONCE_BYTES],
    pub wrapped_secret: [u8; KEY_BYTES + TAG_BYTES],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported version {0}")]
    UnsupportedVersion(u8),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("body checksum mismatch")]
    BodyChecksum,
    #[error("authentication tag mismatch (altered bytes or wrong key)")]
    Authentication,
    #[error("decompression failed")]
    Decompression,
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

impl SegmentHeader {
    /// A new segment's header, with a fresh secret wrapped under `master` (version
    /// `key_version`), its keys, and its opening: the bytes that start the file (the header,
    /// then `dictionary` sealed under the new data key, if given).
    pub fn create(
        key_version: u32,
        master: &Sealer,
        first_seq: u64,
        created_ms: i64,
        dictionary: Option<Arc<Dictionary>>,
    ) -> (SegmentHeader, SegmentKeys, Vec<u8>) {
        let secret: [u8; KEY_BYTES] = crypto::random();
        let wrap_nonce = crypto::random();
        let version =
            if dictionary.is_some() { SEGMENT_VERSION_DICTIONARY } else { SEGMENT_VERSION };
        let mut h = SegmentHeader {
            version,
            key_version,
            first_seq,
            created_ms,
            wrap_nonce,
            wrapped_secret: [0; 48],
        };
        let sealed = master.seal(&wrap_nonce, &h.aad(), &secret);
        h.wrapped_secret.copy_from_slice(&sealed);
        let mut keys = SegmentKeys::derive(&secret);
        let mut opening = h.encode().to_vec();
        if let Some(d) = dictionary {
            opening.extend_from_slice(&h.seal_dictionary(&keys, d.raw()));
            keys.dictionary = Some(d);
        }
        (h, keys, opening)
    }

    fn aad(&self) -> [u8; 32] {
        let mut a = [0u8; 32];
        a[..8].copy_from_slice(SEGMENT_MAGIC);
        a[8] = self.version;
        a[12..16].copy_from_slice(&self.key_version.to_be_bytes());
        a[16..24].copy_from_slice(&self.first_seq.to_be_bytes());
        a[24..32].copy_from_slice(&self.created_ms.to_be_bytes());
        a
    }

    pub fn encode(&self) -> [u8; SEGMENT_HEADER_BYTES] {
        let mut b = [0u8; SEGMENT_HEADER_BYTES];
        b[..32].copy_from_slice(&self.aad());
        b[32..44].copy_from_slice(&self.wrap_nonce);
        b[44..92].copy_from_slice(&self.wrapped_secret);
        let crc = crc32c::crc32c(&b[..92]);
        b[92..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SegmentHeader, FormatError> {
        if b.len() < SEGMENT_HEADER_BYTES {
            return Err(FormatError::Truncated { need: SEGMENT_HEADER_BYTES, have: b.len() });
        }
        if &b[..8] != SEGMENT_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if crc32c::crc32c(&b[..92]).to_be_bytes() != b[92..96] {
            return Err(FormatError::HeaderChecksum);
        }
        if b[8] != SEGMENT_VERSION && b[8] != SEGMENT_VERSION_DICTIONARY {
            return Err(FormatError::UnsupportedVersion(b[8]));
        }
        Ok(SegmentHeader {
            version: b[8],
            key_version: u32::from_be_bytes(b[12..16].try_into().unwrap()),
            first_seq: u64::from_be_bytes(b[16..24].try_into().unwrap()),
            created_ms: i64::from_be_bytes(b[24..32].try_into().unwrap()),
            wrap_nonce: b[32..44].try_into().unwrap(),
            wrapped_secret: b[44..92].try_into().unwrap(),
        })
    }

    /// Unwraps the segment secret with the master key of this header's version.
    pub fn keys(&self, master: &Sealer) -> Result<SegmentKeys, FormatError> {
        Ok(SegmentKeys::derive(&self.secret(master)?))
    }

    fn secret(&self, master: &Sealer) -> Result<[u8; KEY_BYTES], FormatError> {
        let secret = master
            .open(&self.wrap_nonce, &self.aad(), &self.wrapped_secret)
            .map_err(|_| FormatError::Authentication)?;
        secret.try_into().map_err(|_| FormatError::Malformed("secret length"))
    }

    /// What the dictionary's seal authenticates besides itself: the segment it belongs to, by
    /// the header fields a rewrap leaves alone (a rewrap changes the key version).
    fn dictionary_aad(&self) -> [u8; 24] {
        let mut a = [0u8; 24];
        a[..4].copy_from_slice(DICTIONARY_MAGIC);
        a[4] = self.version;
        a[8..16].copy_from_slice(&self.first_seq.to_be_bytes());
        a[16..24].copy_from_slice(&self.created_ms.to_be_bytes());
        a
    }

    /// The dictionary section: its frame, then `dictionary` sealed under the data key.
    fn seal_dictionary(&self, keys: &SegmentKeys, dictionary: &[u8]) -> Vec<u8> {
        let nonce = crypto::random::<NONCE_BYTES>();
        let sealed = keys.data.seal(&nonce, &self.dictionary_aad(), dictionary);
        assert!(sealed.len() <= DICTIONARY_SEALED_BYTES_MAX, "dictionaries are small");
        let mut out = Vec::with_capacity(DICTIONARY_FRAME_BYTES + sealed.len());
        out.extend_from_slice(DICTIONARY_MAGIC);
        out.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&crc32c::crc32c(&sealed).to_be_bytes());
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens the dictionary of a [`SEGMENT_VERSION_DICTIONARY`] segment and adds it to `keys`.
    /// `opening` is the file from its start to (at least) where the blocks begin.
    pub fn open_dictionary(
        &self,
        opening: &[u8],
        keys: &mut SegmentKeys,
    ) -> Result<(), FormatError> {
        if self.version != SEGMENT_VERSION_DICTIONARY {
            return Ok(());
        }
        let end = opening_len(opening)?;
        if opening.len() < end {
            return Err(FormatError::Truncated { need: end, have: opening.len() });
        }
        let frame = &opening[SEGMENT_HEADER_BYTES..OPENING_PREFIX_BYTES];
        let sealed = &opening[OPENING_PREFIX_BYTES..end];
        if crc32c::crc32c(sealed).to_be_bytes() != frame[20..24] {
            return Err(FormatError::BodyChecksum);
        }
        let nonce: [u8; NONCE_BYTES] = frame[8..20].try_into().unwrap();
        let raw = keys
            .data
            .open(&nonce, &self.dictionary_aad(), sealed)
            .map_err(|_| FormatError::Authentication)?;
        keys.dictionary = Some(Dictionary::new(raw));
        Ok(())
    }

    /// The same segment's header with its secret wrapped anew under master key `new_version`
    /// (`old` is the master key of this header's version). The secret, and so every block and
    /// salt of the segment, stays as it is: only the 96 header bytes change.
    pub fn rewrapped(
        &self,
        old: &Sealer,
        new_version: u32,
        new: &Sealer,
    ) -> Result<SegmentHeader, FormatError> {
        let secret = self.secret(old)?;
        let mut h = SegmentHeader {
            key_version: new_version,
            wrap_nonce: crypto::random(),
            wrapped_secret: [0; KEY_BYTES + TAG_BYTES],
            ..self.clone()
        };
        let sealed = new.seal(&h.wrap_nonce, &h.aad(), &secret);
        h.wrapped_secret.copy_from_slice(&sealed);
        Ok(h)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockHeader {
    /// Compressed with the segment's dictionary.
    pub dictionary: bool,
    pub key_version: u32,
    pub first_seq: u64,
    pub count: u32,
    pub plain_len: u32,
    pub sealed_len: u32,
    pub nonce: [u8; NONCE_BYTES],
    pub body_crc: u32,
}

impl BlockHeader {
    pub fn total_len(&self) -> u64 {
        BLOCK_HEADER_BYTES as u64 + u64::from(self.sealed_len)
    }

    pub fn end_seq(&self) -> u64 {
        self.first_seq + u64::from(self.count)
    }

    fn encode(&self) -> [u8; BLOCK_HEADER_BYTES] {
        let mut b = [0u8; BLOCK_HEADER_BYTES];
        b[..4].copy_from_slice(BLOCK_MAGIC);
        b[4] = BLOCK_VERSION;
        b[5] = if self.dictionary { COMPRESSION_ZSTD_DICTIONARY } else { COMPRESSION_ZSTD };
        b[8..12].copy_from_slice(&self.key_version.to_be_bytes());
        b[12..20].copy_from_slice(&self.first_seq.to_be_bytes());
        b[20..24].copy_from_slice(&self.count.to_be_bytes());
        b[24..28].copy_from_slice(&self.plain_len.to_be_bytes());
        b[28..32].copy_from_slice(&self.sealed_len.to_be_bytes());
        b[32..44].copy_from_slice(&self.nonce);
        b[44..48].copy_from_slice(&self.body_crc.to_be_bytes());
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes and checks a block header (magic, CRC, version, sane lengths).
    pub fn decode(b: &[u8]) -> Result<BlockHeader, FormatError> {
        if b.len() < BLOCK_HEADER_BYTES {
            return Err(FormatError::Truncated { need: BLOCK_HEADER_BYTES, have: b.len() });
        }
        if &b[..4] != BLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        if crc32c::crc32c(&b[..48]).to_be_bytes() != b[48..52] {
            return Err(FormatError::HeaderChecksum);
        }
        if b[4] != BLOCK_VERSION {
            return Err(FormatError::UnsupportedVersion(b[4]));
        }
        if b[5] != COMPRESSION_ZSTD && b[5] != COMPRESSION_ZSTD_DICTIONARY {
            return Err(FormatError::Malformed("unknown compression"));
        }
        let h = BlockHeader {
            dictionary: b[5] == COMPRESSION_ZSTD_DICTIONARY,
            key_version: u32::from_be_bytes(b[8..12].try_into().unwrap()),
            first_seq: u64::from_be_bytes(b[12..20].try_into().unwrap()),
            count: u32::from_be_bytes(b[20..24].try_into().unwrap()),
            plain_len: u32::from_be_bytes(b[24..28].try_into().unwrap()),
            sealed_len: u32::from_be_bytes(b[28..32].try_into().unwrap()),
            nonce: b[32..44].try_into().unwrap(),
            body_crc: u32::from_be_bytes(b[44..48].try_into().unwrap()),
        };
        if h.count == 0
            || h.sealed_len as usize > BLOCK_SEALED_BYTES_MAX
            || (h.sealed_len as usize) < TAG_BYTES
        {
            return Err(FormatError::Malformed("impossible block lengths"));
        }
        Ok(h)
    }
}

/// One event as stored in a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub recorded_at_ms: u64,
    /// Whether the client supplied the event's `id` (it then scopes idempotent retries).
    pub client_id: bool,
    pub canonical: Vec<u8>,
}

/// Where a segment's blocks begin, from its first [`OPENING_PREFIX_BYTES`] (fewer will do for
/// a segment without a dictionary). Needs no keys: the archiver walks blocks without them.
pub fn opening_len(prefix: &[u8]) -> Result<usize, FormatError> {
    let header = SegmentHeader::decode(prefix)?;
    if header.version != SEGMENT_VERSION_DICTIONARY {
        return Ok(SEGMENT_HEADER_BYTES);
    }
    if prefix.len() < OPENING_PREFIX_BYTES {
        return Err(FormatError::Truncated { need: OPENING_PREFIX_BYTES, have: prefix.len() });
    }
    let frame = &prefix[SEGMENT_HEADER_BYTES..OPENING_PREFIX_BYTES];
    if &frame[..4] != DICTIONARY_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let sealed_len = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as usize;
    if !(TAG_BYTES..=DICTIONARY_SEALED_BYTES_MAX).contains(&sealed_len) {
        return Err(FormatError::Malformed("impossible dictionary length"));
    }
    Ok(OPENING_PREFIX_BYTES + sealed_len)
}

/// Builds one block: records are framed into `plain`, compressed, sealed, and framed. The
/// compressor must hold the segment's dictionary if `keys` has one.
pub fn encode_block(
    keys: &SegmentKeys,
    key_version: u32,
    first_seq: u64,
    count: u32,
    plain: &[u8],
    compressor: &mut zstd::bulk::Compressor<'_>,
) -> Vec<u8> {
    assert!(count > 0);
    let compressed = compressor.compress(plain).expect("zstd compression into a growable buffer");
    let nonce = crypto::random::<NONCE_BYTES>();
    let mut header = BlockHeader {
        dictionary: keys.dictionary.is_some(),
        key_version,
        first_seq,
        count,
        plain_len: u32::try_from(plain.len()).expect("block plaintext under 4 GiB"),
        sealed_len: u32::try_from(compressed.len() + TAG_BYTES).expect("block under 4 GiB"),
        nonce,
        body_crc: 0,
    };
    let aad = header.encode();
    let sealed = keys.data.seal(&nonce, &aad[..BLOCK_AAD_BYTES], &compressed);
    header.body_crc = crc32c::crc32c(&sealed);
    let mut out = Vec::with_capacity(BLOCK_HEADER_BYTES + sealed.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(&sealed);
    out
}

/// Appends one record's framing and bytes to a block's plaintext.
pub fn push_record(plain: &mut Vec<u8>, recorded_at_ms: u64, client_id: bool, canonical: &[u8]) {
    assert!(canonical.len() < RECORD_CLIENT_ID_FLAG as usize);
    let len_and_flags = canonical.len() as u32 | if client_id { RECORD_CLIENT_ID_FLAG } else { 0 };
    plain.extend_from_slice(&recorded_at_ms.to_be_bytes());
    plain.extend_from_slice(&len_and_flags.to_be_bytes());
    plain.extend_from_slice(canonical);
}

/// The top bit of a record's length word: the client supplied the `id`.
pub const RECORD_CLIENT_ID_FLAG: u32 = 1 << 31;

thread_local! {
    /// One zstd context per reading thread: creating one per block (about 100 KiB of fresh
    /// memory, page faults included) cost more than decompressing a block.
    static DECOMPRESSOR: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> =
        std::cell::RefCell::new(zstd::zstd_safe::DCtx::create());
}

/// Decompresses a block's body into exactly `plain_len` bytes.
fn decompress(
    compressed: &[u8],
    plain_len: usize,
    dictionary: Option<&Dictionary>,
) -> Result<Vec<u8>, FormatError> {
    let mut plain = Vec::with_capacity(plain_len);
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            match dictionary {
                Some(dict) => {
                    d.decompress_using_ddict(&mut plain, compressed, dict.decoder().as_ddict())
                }
                None => d.decompress(&mut plain, compressed),
            }
        })
        .map_err(|_| FormatError::Decompression)?;
    Ok(plain)
}

/// Checks a block body's CRC, authenticates and decrypts it, and decompresses it: the block's
/// plaintext, to be split with [`RecordIter`]. `body` is the sealed bytes after the header.
pub fn open_block_body(
    header: &BlockHeader,
    body: &[u8],
    keys: &SegmentKeys,
) -> Result<Vec<u8>, FormatError> {
    if body.len() != header.sealed_len as usize {
        return Err(FormatError::Truncated { need: header.sealed_len as usize, have: body.len() });
    }
    if crc32c::crc32c(body) != header.body_crc {
        return Err(FormatError::BodyChecksum);
    }
    let aad = header.encode();
    let compressed = keys
        .data
        .open(&header.nonce, &aad[..BLOCK_AAD_BYTES], body)
        .map_err(|_| FormatError::Authentication)?;
    let dictionary = match (header.dictionary, &keys.dictionary) {
        (false, _) => None,
        (true, Some(d)) => Some(d.as_ref()),
        (true, None) => {
            return Err(FormatError::Malformed("block needs a dictionary its segment lacks"));
        }
    };
    let plain = decompress(&compressed, header.plain_len as usize, dictionary)?;
    if plain.len() != header.plain_len as usize {
        return Err(FormatError::Malformed("decompressed length differs from header"));
    }
    let count = RecordIter::new(&plain).try_fold(0u32, |n, r| r.map(|_| n + 1))?;
    if count != header.count {
        return Err(FormatError::Malformed("record count differs from header"));
    }
    Ok(plain)
}

/// A record borrowed from a block's plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub recorded_at_ms: u64,
    pub client_id: bool,
    pub canonical: &'a [u8],
}

/// Splits a block's plaintext into records.
#[derive(Debug, Clone)]
pub struct RecordIter<'a> {
    rest: &'a [u8],
}

impl<'a> RecordIter<'a> {
    pub fn new(plain: &'a [u8]) -> RecordIter<'a> {
        RecordIter { rest: plain }
    }
}

impl<'a> Iterator for RecordIter<'a> {
    type Item = Result<RecordRef<'a>, FormatError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        if self.rest.len() < RECORD_HEADER_BYTES {
            self.rest = &[];
            return Some(Err(FormatError::Malformed("truncated record header")));
        }
        let recorded_at_ms = u64::from_be_bytes(self.rest[..8].try_into().unwrap());
        let len_and_flags = u32::from_be_bytes(self.rest[8..12].try_into().unwrap());
        let len = (len_and_flags & !RECORD_CLIENT_ID_FLAG) as usize;
        let rest = &self.rest[RECORD_HEADER_BYTES..];
        if rest.len() < len {
            self.rest = &[];
            return Some(Err(FormatError::Malformed("truncated record")));
        }
        self.rest = &rest[len..];
        Some(Ok(RecordRef {
            recorded_at_ms,
            client_id: len_and_flags & RECORD_CLIENT_ID_FLAG != 0,
            canonical: &rest[..len],
        }))
    }
}

/// Opens a block and copies its records out.
pub fn decode_block_body(
    header: &BlockHeader,
    body: &[u8],
    keys: &SegmentKeys,
) -> Result<Vec<Record>, FormatError> {
    let plain = open_block_body(header, body, keys)?;
    RecordIter::new(&plain)
        .map(|r| {
            r.map(|r| Record {
                recorded_at_ms: r.recorded_at_ms,
                client_id: r.client_id,
                canonical: r.canonical.to_vec(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_round_trip_and_every_byte_matters() {
        let master = Sealer::new(&[9; 32]);
        let (sh, keys, opening) = SegmentHeader::create(1, &master, 100, 5, None);
        assert_eq!(opening, sh.encode());
        let sh2 = SegmentHeader::decode(&sh.encode()).unwrap();
        assert_eq!(sh2, sh);
        let keys2 = sh2.keys(&master).unwrap();
        assert_eq!(keys2.salts.salt(7), keys.salts.salt(7));
        // A rewrapped header opens with the new master key only, to the same keys.
        let newer = Sealer::new(&[10; 32]);
        let re = sh.rewrapped(&master, 2, &newer).unwrap();
        assert_eq!((re.key_version, re.first_seq, re.created_ms), (2, 100, 5));
        assert_eq!(re.keys(&newer).unwrap().salts.salt(7), keys.salts.salt(7));
        assert_eq!(re.keys(&master).unwrap_err(), FormatError::Authentication);
        assert_eq!(sh.rewrapped(&newer, 2, &newer).unwrap_err(), FormatError::Authentication);
        let mut plain = Vec::new();
        push_record(&mut plain, 1, false, b"{\"a\":1}");
        push_record(&mut plain, 2, true, b"{\"b\":2}");
        let mut z = zstd::bulk::Compressor::new(ZSTD_LEVEL).unwrap();
        let block = encode_block(&keys, 1, 100, 2, &plain, &mut z);
        let h = BlockHeader::decode(&block).unwrap();
        let recs = decode_block_body(&h, &block[BLOCK_HEADER_BYTES..], &keys2).unwrap();
        assert_eq!(
            recs[1],
            Record { recorded_at_ms: 2, client_id: true, canonical: b"{\"b\":2}".to_vec() }
        );
        for i in 0..block.len() {
            let mut bad = block.clone();
            bad[i] ^= 0x40;
            let ok = BlockHeader::decode(&bad)
                .and_then(|h| decode_block_body(&h, &bad[BLOCK_HEADER_BYTES..], &keys2))
                .is_ok();
            assert!(!ok, "flipping byte {i} went unnoticed");
        }
    }

    #[test]
    fn a_dictionary_segment_opens_only_whole_and_its_blocks_need_the_dictionary() {
        let master = Sealer::new(&[9; 32]);
        let mut samples = crate::dictionary::Samples::default();
        let event = |i: u32| {
            format!(
                "{{\"action\":\"patient.read\",\"actor\":{{\"id\":\"dr{}\"}},\"patient\":\"p{i}\"}}",
                i % 7
            )
        };
        for i in 0..2000 {
            samples.offer(event(i).as_bytes());
        }
        let dictionary = Dictionary::new(samples.train().expect("enough samples"));
        let (sh, keys, opening) =
            SegmentHeader::create(1, &master, 100, 5, Some(dictionary.clone()));
        assert_eq!(sh.version, SEGMENT_VERSION_DICTIONARY);
        assert_eq!(opening_len(&opening[..OPENING_PREFIX_BYTES]), Ok(opening.len()));
        let mut opened = SegmentHeader::decode(&opening).unwrap().keys(&master).unwrap();
        assert!(opened.dictionary.is_none(), "the header alone has no dictionary");
        sh.open_dictionary(&opening, &mut opened).unwrap();
        assert_eq!(opened.dictionary.as_ref().unwrap().raw(), dictionary.raw());

        let mut plain = Vec::new();
        for i in 0..20 {
            push_record(&mut plain, 1, false, event(i).as_bytes());
        }
        let mut z = zstd::bulk::Compressor::with_dictionary(ZSTD_LEVEL, dictionary.raw()).unwrap();
        let block = encode_block(&keys, 1, 100, 20, &plain, &mut z);
        let h = BlockHeader::decode(&block).unwrap();
        assert!(h.dictionary);
        let body = &block[BLOCK_HEADER_BYTES..];
        assert_eq!(decode_block_body(&h, body, &opened).unwrap().len(), 20);
        let without = SegmentHeader::decode(&opening).unwrap().keys(&master).unwrap();
        assert!(decode_block_body(&h, body, &without).is_err());

        // Every byte of the opening matters: the header's by its CRC and seal, the
        // dictionary's by its frame, CRC and seal.
        for i in 0..opening.len() {
            let mut bad = opening.clone();
            bad[i] ^= 0x40;
            let ok = SegmentHeader::decode(&bad).and_then(|h| {
                let mut k = h.keys(&master)?;
                h.open_dictionary(&bad, &mut k)?;
                Ok(k.dictionary.is_some())
            });
            assert!(!matches!(ok, Ok(true)), "flipping opening byte {i} went unnoticed");
        }
        // A rewrap changes only the header: the dictionary still opens.
        let newer = Sealer::new(&[10; 32]);
        let re = sh.rewrapped(&master, 2, &newer).unwrap();
        let mut rewrapped = re.encode().to_vec();
        rewrapped.extend_from_slice(&opening[SEGMENT_HEADER_BYTES..]);
        let mut k = re.keys(&newer).unwrap();
        re.open_dictionary(&rewrapped, &mut k).unwrap();
        assert!(k.dictionary.is_some());
        // A torn opening says so.
        assert!(sh.open_dictionary(&opening[..opening.len() - 1], &mut k.clone()).is_err());
    }
}
