//! The C2SP `tlog-tiles` layout: tile coordinates, paths, partial widths, entry bundles, and
//! reading tree nodes out of tiles.

use crate::merkle::{Hash, NodeReader, root_of};

/// Tiles are 2^8 = 256 hashes wide; a tile at tile-level `L` holds Merkle nodes of height `8L`.
pub const TILE_HEIGHT: u32 = 8;
pub const TILE_WIDTH: u64 = 1 << TILE_HEIGHT;
/// A full tile: 256 hashes of 32 bytes.
pub const FULL_TILE_BYTES: usize = TILE_WIDTH as usize * 32;

/// Writes a tile index in 3-digit groups, every group but the last prefixed with `x`:
/// 1234067 → `x001/x234/067`, 5 → `005`.
pub fn encode_index(n: u64) -> String {
    let mut groups = Vec::new();
    let mut rest = n;
    loop {
        groups.push(rest % 1000);
        rest /= 1000;
        if rest == 0 {
            break;
        }
    }
    let last = groups.len() - 1;
    groups
        .iter()
        .rev()
        .enumerate()
        .map(|(i, g)| if i < last { format!("x{g:03}") } else { format!("{g:03}") })
        .collect::<Vec<_>>()
        .join("/")
}

/// Parses the inverse of [`encode_index`], strictly (the canonical spelling only).
pub fn decode_index(s: &str) -> Option<u64> {
    let groups: Vec<&str> = s.split('/').collect();
    let last = groups.len() - 1;
    let mut n: u64 = 0;
    for (i, g) in groups.iter().enumerate() {
        let digits = if i < last { g.strip_prefix('x')? } else { g };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = n.checked_mul(1000)?.checked_add(digits.parse::<u64>().ok()?)?;
    }
    // Reject non-canonical spellings such as a leading `x000/`.
    (encode_index(n) == s).then_some(n)
}

/// Which tile: a hash tile at `level`, or (with `level = None`) an entry bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileId {
    /// `None` for entry bundles (`tile/entries/...`).
    pub level: Option<u32>,
    pub index: u64,
    /// 1..=255 for a partial tile; 256 for a full one.
    pub width: u32,
}

impl TileId {
    pub fn hashes(level: u32, index: u64, width: u32) -> TileId {
        assert!((1..=256).contains(&width));
        TileId { level: Some(level), index, width }
    }

    pub fn entries(index: u64, width: u32) -> TileId {
        assert!((1..=256).contains(&width));
        TileId { level: None, index, width }
    }

    pub fn is_full(&self) -> bool {
        self.width == TILE_WIDTH as u32
    }

    /// The path relative to the log's root, e.g. `tile/0/x001/234.p/7`.
    pub fn path(&self) -> String {
        let level = match self.level {
            Some(l) => l.to_string(),
            None => "entries".to_string(),
        };
        let mut p = format!("tile/{level}/{}", encode_index(self.index));
        if !self.is_full() {
            p.push_str(&format!(".p/{}", self.width));
        }
        p
    }

    /// Parses a path written by [`TileId::path`].
    pub fn parse(path: &str) -> Option<TileId> {
        let rest = path.strip_prefix("tile/")?;
        let (level_str, rest) = rest.split_once('/')?;
        let level = if level_str == "entries" {
            None
        } else {
            if level_str.len() > 1 && level_str.starts_with('0') {
                return None;
            }
            Some(level_str.parse::<u32>().ok()?)
        };
        let (index_str, width) = match rest.split_once(".p/") {
            Some((i, w)) => {
                if w.starts_with('0') {
                    return None;
                }
                let w: u32 = w.parse().ok()?;
                if !(1..=255).contains(&w) {
                    return None;
                }
                (i, w)
            }
            None => (rest, TILE_WIDTH as u32),
        };
        Some(TileId { level, index: decode_index(index_str)?, width })
    }
}

/// The width of the partial tile at tile-level `level` for a tree of `size` leaves (0 = none).
pub fn partial_width(size: u64, level: u32) -> u32 {
    let shift = TILE_HEIGHT * level;
    if shift >= 64 { 0 } else { ((size >> shift) % TILE_WIDTH) as u32 }
}

/// Every tile (hash tiles and entry bundles) that a tree of `size` leaves consists of: full ones
/// and the right-edge partials.
pub fn tiles_for_size(size: u64) -> Vec<TileId> {
    let mut out = Vec::new();
    let mut level = 0;
    loop {
        let shift = TILE_HEIGHT * level;
        let count = if shift >= 64 { 0 } else { size >> shift };
        if count == 0 {
            break;
        }
        let full = count / TILE_WIDTH;
        for n in 0..full {
            out.push(TileId::hashes(level, n, 256));
            if level == 0 {
                out.push(TileId::entries(n, 256));
            }
        }
        let w = partial_width(size, level);
        if w > 0 {
            out.push(TileId::hashes(level, full, w));
            if level == 0 {
                out.push(TileId::entries(full, w));
            }
        }
        level += 1;
    }
    out
}

/// Encodes an entry bundle: each entry as a big-endian `u16` length and its bytes.
pub fn encode_bundle<'a>(entries: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let len = u16::try_from(e.len()).expect("entry longer than 65,535 bytes");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// Splits an entry bundle into its entries; `None` if the framing is broken.
pub fn decode_bundle(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 2 {
            return None;
        }
        let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
        rest = &rest[2..];
        if rest.len() < len {
            return None;
        }
        out.push(&rest[..len]);
        rest = &rest[len..];
    }
    Some(out)
}

/// Splits a hash tile's bytes into hashes; `None` unless it is a whole number of hashes.
pub fn decode_hashes(bytes: &[u8]) -> Option<Vec<Hash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(bytes.chunks_exact(32).map(|c| c.try_into().unwrap()).collect())
}

/// Reads the hashes of one tile: `level` is the tile level, `index` the tile number, and `width`
/// how many hashes the caller needs (at least); the reader may return more.
pub trait TileReader {
    type Error;
    fn tile_hashes(&self, level: u32, index: u64, width: u32) -> Result<Vec<Hash>, Self::Error>;
}

/// Adapts a [`TileReader`] for a tree of `size` leaves into a Merkle [`NodeReader`].
#[derive(Debug)]
pub struct TileNodes<'a, T> {
    pub tiles: &'a T,
    pub size: u64,
}

impl<T: TileReader> NodeReader for TileNodes<'_, T> {
    type Error = T::Error;

    fn node(&self, height: u32, index: u64) -> Result<Hash, T::Error> {
        let level = height / TILE_HEIGHT;
        let within = height % TILE_HEIGHT;
        // The node covers `2^within` consecutive hashes of tile-level `level`.
        let first = index << within;
        let count = 1u64 << within;
        let tile = first / TILE_WIDTH;
        let offset = (first % TILE_WIDTH) as usize;
        // How many hashes of this tile exist in a tree of `size` leaves.
        let level_count = self.size >> (TILE_HEIGHT * level);
        let available = (level_count - tile * TILE_WIDTH).min(TILE_WIDTH) as u32;
        let hashes = self.tiles.tile_hashes(level, tile, available)?;
        Ok(root_of(&hashes[offset..offset + count as usize]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_encoding_matches_the_spec() {
        for (n, s) in
            [(0, "000"), (5, "005"), (999, "999"), (1000, "x001/000"), (1234067, "x001/x234/067")]
        {
            assert_eq!(encode_index(n), s);
            assert_eq!(decode_index(s), Some(n));
        }
        for bad in ["5", "x000/005", "0005", "x1/000", "001/000", ""] {
            assert_eq!(decode_index(bad), None, "{bad}");
        }
    }

    #[test]
    fn partial_widths_match_the_spec_example() {
        // tlog-tiles: s = 70,000 → 273 full level-0 tiles and .p/112, one full level-1 and .p/17, level-2 .p/1.
        let tiles = tiles_for_size(70_000);
        let count = |level| tiles.iter().filter(|t| t.level == Some(level) && t.is_full()).count();
        assert_eq!(count(0), 273);
        assert_eq!(count(1), 1);
        assert!(tiles.contains(&TileId::hashes(0, 273, 112)));
        assert!(tiles.contains(&TileId::hashes(1, 1, 17)));
        assert!(tiles.contains(&TileId::hashes(2, 0, 1)));
        assert!(tiles.contains(&TileId::entries(273, 112)));
        assert_eq!(TileId::hashes(0, 273, 112).path(), "tile/0/273.p/112");
        assert_eq!(TileId::entries(1234067, 256).path(), "tile/entries/x001/x234/067");
    }

    #[test]
    fn paths_round_trip_and_reject_noncanonical() {
        for t in tiles_for_size(300_000) {
            assert_eq!(TileId::parse(&t.path()), Some(t));
        }
        for bad in
            ["tile/00/000", "tile/0/000.p/0", "tile/0/000.p/256", "tile/0/000.p/07", "tile/x/000"]
        {
            assert_eq!(TileId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn bundles_round_trip() {
        let entries: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; i as usize * 7]).collect();
        let bytes = encode_bundle(entries.iter().map(|e| e.as_slice()));
        let back = decode_bundle(&bytes).unwrap();
        assert_eq!(back, entries.iter().map(|e| e.as_slice()).collect::<Vec<_>>());
        assert_eq!(decode_bundle(&bytes[..bytes.len() - 1]), None);
    }
}
