//! Reading segments back: listing them, scanning blocks, decrypting records. Shared by recovery,
//! the idempotency window, event lookup and the audit.

use crate::crypto::SegmentKeys;
use crate::error::StoreError;
use crate::io::Io;
use crate::keys::MasterKeys;
use crate::segment::{
    self, BLOCK_HEADER_BYTES, BlockHeader, Record, SEGMENT_HEADER_BYTES, SegmentHeader,
};

pub const SEGMENTS_DIR: &str = "segments";

pub fn segment_path(first_seq: u64) -> String {
    format!("{SEGMENTS_DIR}/{}", segment::segment_file_name(first_seq))
}

/// Segment first seqs in order. Unknown files in the directory are ignored.
pub fn list_segments(io: &dyn Io) -> Result<Vec<u64>, StoreError> {
    let mut firsts: Vec<u64> =
        io.list(SEGMENTS_DIR)?.iter().filter_map(|n| segment::parse_segment_file_name(n)).collect();
    firsts.sort_unstable();
    Ok(firsts)
}

/// A segment read into memory with its header checked and its keys unwrapped.
pub struct LoadedSegment {
    pub first_seq: u64,
    pub path: String,
    pub header: SegmentHeader,
    pub keys: SegmentKeys,
    /// Where the first block begins: after the header and the dictionary.
    pub blocks_start: usize,
    pub bytes: Vec<u8>,
}

pub fn load_segment(
    io: &dyn Io,
    master: &MasterKeys,
    first_seq: u64,
) -> Result<LoadedSegment, StoreError> {
    let path = segment_path(first_seq);
    let bytes = io.read(&path)?;
    let (header, keys, blocks_start) = open_segment(&path, &bytes, master, first_seq)?;
    Ok(LoadedSegment { first_seq, path, header, keys, blocks_start, bytes })
}

/// Reads a segment's opening (its header and dictionary) and opens it: see [`open_segment`].
pub fn read_segment_opening(
    io: &dyn Io,
    master: &MasterKeys,
    first_seq: u64,
) -> Result<(SegmentHeader, SegmentKeys, usize), StoreError> {
    let path = segment_path(first_seq);
    let mut opening = io.read_at(&path, 0, segment::OPENING_PREFIX_BYTES)?;
    if let Ok(len) = segment::opening_len(&opening)
        && len > opening.len()
    {
        opening = io.read_at(&path, 0, len)?;
    }
    open_segment(&path, &opening, master, first_seq)
}

/// Opens a segment from its first bytes (`opening`: at least its header and dictionary): the
/// header, the keys with the dictionary, and where the blocks begin.
pub fn open_segment(
    path: &str,
    opening: &[u8],
    master: &MasterKeys,
    first_seq: u64,
) -> Result<(SegmentHeader, SegmentKeys, usize), StoreError> {
    let (header, mut keys) = open_segment_header(path, opening, master, first_seq)?;
    let corrupted = |e| StoreError::corrupted(format!("{path} offset {SEGMENT_HEADER_BYTES}"), e);
    let blocks_start = segment::opening_len(opening).map_err(corrupted)?;
    header.open_dictionary(opening, &mut keys).map_err(corrupted)?;
    Ok((header, keys, blocks_start))
}

/// Decodes and checks a segment header (it must name `first_seq`) and unwraps its keys,
/// without the dictionary (that needs the bytes after the header: [`open_segment`]).
pub fn open_segment_header(
    path: &str,
    bytes: &[u8],
    master: &MasterKeys,
    first_seq: u64,
) -> Result<(SegmentHeader, SegmentKeys), StoreError> {
    let header = SegmentHeader::decode(bytes)
        .map_err(|e| StoreError::corrupted(format!("{path} offset 0"), e))?;
    if header.first_seq != first_seq {
        return Err(StoreError::corrupted(
            format!("{path} offset 0"),
            "header first_seq differs from file name",
        ));
    }
    let sealer = master.get(header.key_version).ok_or_else(|| {
        StoreError::Unavailable(format!(
            "{path} needs master key version {}, which the master keys from {} lack",
            header.key_version,
            master.origin()
        ))
    })?;
    // The header's CRC held, so a failed unwrap is most likely the wrong key (a tamperer
    // who recomputed the CRC is the other possibility): say which key was tried.
    let keys = header.keys(sealer).map_err(|e| {
        StoreError::corrupted(
            format!("{path} offset 0"),
            format!(
                "master key version {} from {} does not unwrap this segment's key: the wrong \
                 master key, or an altered header ({e})",
                header.key_version,
                master.origin()
            ),
        )
    })?;
    Ok((header, keys))
}

/// One block found by [`LoadedSegment::blocks`].
pub struct BlockAt<'a> {
    pub offset: usize,
    pub header: BlockHeader,
    pub body: &'a [u8],
}

/// How a walk over a segment's blocks ended.
pub enum BlocksEnd {
    /// Every byte belongs to a whole, well-formed block.
    Clean,
    /// A block could not be read at `offset`: `detail` says why.
    Broken { offset: usize, detail: String },
}

impl LoadedSegment {
    /// Walks the block headers in order, checking framing, header CRCs and seq contiguity (not
    /// bodies). Stops at the first problem.
    pub fn blocks(&self) -> (Vec<BlockAt<'_>>, BlocksEnd) {
        let mut out = Vec::new();
        let mut offset = self.blocks_start;
        let mut expect = self.first_seq;
        while offset < self.bytes.len() {
            let header = match BlockHeader::decode(&self.bytes[offset..]) {
                Ok(h) => h,
                Err(e) => {
                    return (
                        out,
                        BlocksEnd::Broken { offset, detail: format!("block header: {e}") },
                    );
                }
            };
            if header.first_seq != expect {
                return (
                    out,
                    BlocksEnd::Broken {
                        offset,
                        detail: format!(
                            "block starts at seq {} but seq {expect} was expected",
                            header.first_seq
                        ),
                    },
                );
            }
            let end = offset + header.total_len() as usize;
            if end > self.bytes.len() {
                return (
                    out,
                    BlocksEnd::Broken {
                        offset,
                        detail: "block extends past the end of the file".into(),
                    },
                );
            }
            out.push(BlockAt {
                offset,
                header,
                body: &self.bytes[offset + BLOCK_HEADER_BYTES..end],
            });
            expect = header.end_seq();
            offset = end;
        }
        (out, BlocksEnd::Clean)
    }

    pub fn decode(&self, block: &BlockAt<'_>) -> Result<Vec<Record>, StoreError> {
        segment::decode_block_body(&block.header, block.body, &self.keys)
            .map_err(|e| StoreError::corrupted(format!("{} offset {}", self.path, block.offset), e))
    }

    /// Whether any well-formed block header for seq `>= after_seq` appears after `offset`: used
    /// to tell a torn tail (nothing valid follows) from damage in the middle (something does).
    pub fn valid_block_after(&self, offset: usize, after_seq: u64) -> bool {
        let magic = segment::BLOCK_MAGIC;
        let mut i = offset + 1;
        while i + BLOCK_HEADER_BYTES <= self.bytes.len() {
            if &self.bytes[i..i + 4] == magic
                && let Ok(h) = BlockHeader::decode(&self.bytes[i..])
                && h.first_seq >= after_seq
            {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// Calls `f` for every record with seq in `[from, to)`, in order, decrypting whole blocks.
pub fn for_each_record(
    io: &dyn Io,
    master: &MasterKeys,
    from: u64,
    to: u64,
    mut f: impl FnMut(u64, &Record, &SegmentKeys) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    if from >= to {
        return Ok(());
    }
    let segments = list_segments(io)?;
    for (i, first) in segments.iter().enumerate() {
        let next = segments.get(i + 1).copied().unwrap_or(u64::MAX);
        if next <= from || *first >= to {
            continue;
        }
        let seg = load_segment(io, master, *first)?;
        let (blocks, _) = seg.blocks();
        for b in &blocks {
            if b.header.end_seq() <= from || b.header.first_seq >= to {
                continue;
            }
            let records = seg.decode(b)?;
            for (k, r) in records.iter().enumerate() {
                let seq = b.header.first_seq + k as u64;
                if (from..to).contains(&seq) {
                    f(seq, r, &seg.keys)?;
                }
            }
        }
    }
    Ok(())
}
