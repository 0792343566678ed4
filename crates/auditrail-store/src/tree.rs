//! The tree on disk: integrating leaves into C2SP tiles and entry bundles under `log/`, the
//! right edge kept in memory, and reading tiles back for roots and proofs.
//!
//! Tiles are derived state. Full tiles are written as they fill, without a sync; right-edge
//! partial tiles are written only when a checkpoint is about to be published, then one
//! `sync_all` makes everything durable before the checkpoint names it.

use crate::io::Io;
use auditrail_core::leaf::LEAF_ENTRY_BYTES;
use auditrail_core::merkle::{self, CompactRange, Hash};
use auditrail_core::tile::{self, TILE_HEIGHT, TILE_WIDTH, TileId, TileReader};
use std::io;

pub const LOG_DIR: &str = "log";

pub fn tile_path(t: &TileId) -> String {
    format!("{LOG_DIR}/{}", t.path())
}

/// Every partial tile and bundle file under `log/tile`. Removes the temporary files of tile
/// writes a crash interrupted (called when the store opens, before anything writes a tile).
pub fn partial_tiles_on_disk(io: &dyn Io) -> io::Result<Vec<TileId>> {
    let mut partials = Vec::new();
    for path in io.list_tree(&format!("{LOG_DIR}/tile"))? {
        if path.ends_with(TMP_SUFFIX) {
            io.remove(&path)?;
        } else if let Some(t) = path.strip_prefix(&format!("{LOG_DIR}/")).and_then(TileId::parse)
            && !t.is_full()
        {
            partials.push(t);
        }
    }
    Ok(partials)
}

/// Writes a file, creating its directory on first use. Full tiles and bundles are written
/// this way: once, before any checkpoint names them (a torn one after a crash is written
/// again when recovery re-integrates its entries).
pub fn write_creating_dirs(io: &dyn Io, path: &str, data: &[u8]) -> io::Result<()> {
    match io.write_file(path, data) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some((dir, _)) = path.rsplit_once('/') {
                io.create_dir_all(dir)?;
            }
            io.write_file(path, data)
        }
        other => other,
    }
}

/// Writes a partial tile or bundle unless it is there already (a partial of a given width
/// never changes: the tree only grows), and then whole: to a temporary name, renamed into
/// place. Partials are written at every checkpoint while the audit, the tile server and
/// backups read the ones already published; a plain rewrite is briefly empty, and a full
/// audit racing one reported the tile as tampered with.
fn write_partial(io: &dyn Io, t: &TileId, data: &[u8]) -> io::Result<()> {
    let path = tile_path(t);
    if io.len(&path)? == Some(data.len() as u64) {
        return Ok(());
    }
    let tmp = format!("{path}{TMP_SUFFIX}");
    write_creating_dirs(io, &tmp, data)?;
    io.rename(&tmp, &path)
}

/// The suffix of a tile file being written; one left by a crash is never read as a tile.
pub const TMP_SUFFIX: &str = ".tmp";

/// The right edge of the tree: the hashes of the partial tile at each level and the entries of
/// the partial bundle. Everything to their left is in full tiles on disk.
#[derive(Debug, Clone)]
pub struct TreeWriter {
    size: u64,
    /// `levels[L]` = hashes of the partial tile at tile-level `L` (fewer than 256).
    levels: Vec<Vec<Hash>>,
    /// The partial entry bundle, already framed (u16 length + entry).
    bundle: Vec<u8>,
}

impl TreeWriter {
    pub fn empty() -> TreeWriter {
        TreeWriter { size: 0, levels: vec![Vec::new()], bundle: Vec::new() }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Adds one leaf entry; writes the bundle and tiles it completes. Returns the leaf hash.
    pub fn append(&mut self, io: &dyn Io, entry: &[u8; LEAF_ENTRY_BYTES]) -> io::Result<Hash> {
        let leaf = merkle::leaf_hash(entry);
        self.bundle.extend_from_slice(&(LEAF_ENTRY_BYTES as u16).to_be_bytes());
        self.bundle.extend_from_slice(entry);
        self.levels[0].push(leaf);
        self.size += 1;
        if self.levels[0].len() == TILE_WIDTH as usize {
            let index = (self.size - 1) / TILE_WIDTH;
            write_creating_dirs(io, &tile_path(&TileId::entries(index, 256)), &self.bundle)?;
            self.bundle.clear();
            self.complete_tile(io, 0)?;
        }
        Ok(leaf)
    }

    fn complete_tile(&mut self, io: &dyn Io, level: usize) -> io::Result<()> {
        let hashes = std::mem::take(&mut self.levels[level]);
        assert_eq!(hashes.len(), TILE_WIDTH as usize);
        let index = (self.size >> (TILE_HEIGHT * (level as u32 + 1))) - 1;
        write_creating_dirs(
            io,
            &tile_path(&TileId::hashes(level as u32, index, 256)),
            &hashes.concat(),
        )?;
        if self.levels.len() == level + 1 {
            self.levels.push(Vec::new());
        }
        self.levels[level + 1].push(merkle::root_of(&hashes));
        if self.levels[level + 1].len() == TILE_WIDTH as usize {
            self.complete_tile(io, level + 1)?;
        }
        Ok(())
    }

    pub fn root(&self) -> Hash {
        let mut cr = SubtreeRange::default();
        for (level, hashes) in self.levels.iter().enumerate().rev() {
            for h in hashes {
                cr.push(*h, TILE_HEIGHT * level as u32);
            }
        }
        assert_eq!(cr.size, self.size, "the right edge covers the whole tree");
        cr.root()
    }

    /// Writes the right edge's partial tiles and bundle for the current size; returns them.
    pub fn write_partials(&self, io: &dyn Io) -> io::Result<Vec<TileId>> {
        let mut written = Vec::new();
        for (level, hashes) in self.levels.iter().enumerate() {
            if hashes.is_empty() {
                continue;
            }
            let index = self.size >> (TILE_HEIGHT * (level as u32 + 1));
            let t = TileId::hashes(level as u32, index, hashes.len() as u32);
            write_partial(io, &t, &hashes.concat())?;
            written.push(t);
        }
        if !self.levels[0].is_empty() {
            let t = TileId::entries(self.size / TILE_WIDTH, self.levels[0].len() as u32);
            write_partial(io, &t, &self.bundle)?;
            written.push(t);
        }
        Ok(written)
    }

    /// Rebuilds the right edge of a tree of `size` leaves from the tiles on disk.
    pub fn restore(io: &dyn Io, size: u64) -> Result<TreeWriter, String> {
        let reader = DiskTiles { io };
        let mut levels = Vec::new();
        let mut level = 0u32;
        loop {
            let shift = TILE_HEIGHT * level;
            let count = if shift >= 64 { 0 } else { size >> shift };
            let w = tile::partial_width(size, level);
            if w > 0 {
                let hashes = reader
                    .tile_hashes(level, count / TILE_WIDTH, w)
                    .map_err(|e| format!("right-edge tile at level {level}: {e}"))?;
                levels.push(hashes[..w as usize].to_vec());
            } else {
                levels.push(Vec::new());
            }
            level += 1;
            if count < TILE_WIDTH {
                break;
            }
        }
        let w0 = tile::partial_width(size, 0);
        let bundle = if w0 > 0 {
            let bytes = reader
                .bundle(size / TILE_WIDTH, w0)
                .map_err(|e| format!("right-edge entry bundle: {e}"))?;
            let entries =
                tile::decode_bundle(&bytes).ok_or("right-edge entry bundle is malformed")?;
            if entries.len() < w0 as usize {
                return Err("right-edge entry bundle is short".into());
            }
            tile::encode_bundle(entries[..w0 as usize].iter().copied())
        } else {
            Vec::new()
        };
        Ok(TreeWriter { size, levels, bundle })
    }
}

/// A compact range built from perfect subtrees of any height, left to right.
#[derive(Debug, Default)]
struct SubtreeRange {
    size: u64,
    peaks: Vec<(Hash, u32)>,
}

impl SubtreeRange {
    fn push(&mut self, hash: Hash, height: u32) {
        assert_eq!(self.size % (1 << height), 0, "subtrees must be aligned");
        self.size += 1 << height;
        let (mut hash, mut height) = (hash, height);
        while let Some((left, h)) = self.peaks.last().copied() {
            if h != height {
                break;
            }
            self.peaks.pop();
            hash = merkle::node_hash(&left, &hash);
            height += 1;
        }
        self.peaks.push((hash, height));
        // Peaks strictly shrink from left to right, like the set bits of the size.
        debug_assert!(self.peaks.windows(2).all(|w| w[0].1 > w[1].1));
    }

    fn root(&self) -> Hash {
        let cr = CompactRange::from_peaks(self.size, self.peaks.iter().map(|p| p.0).collect());
        cr.root()
    }
}

/// Reads tiles from `log/`, falling back from a missing partial to the full tile or to a wider
/// partial of the same tile (both start with the same hashes). A file too short for the width
/// asked for is passed over like a missing one: on a live store it is a tile of a coming
/// publication caught while being written.
#[derive(Clone, Copy)]
pub struct DiskTiles<'a> {
    pub io: &'a dyn Io,
}

impl DiskTiles<'_> {
    fn read_tile(&self, level: Option<u32>, index: u64, width: u32) -> io::Result<Vec<u8>> {
        let make = |w| match level {
            Some(l) => TileId::hashes(l, index, w),
            None => TileId::entries(index, w),
        };
        let long_enough = |b: &[u8]| match level {
            Some(_) => b.len() >= width as usize * 32,
            None => tile::decode_bundle(b).is_some_and(|e| e.len() >= width as usize),
        };
        let candidates = std::iter::once(256).chain(width..256);
        for w in candidates {
            match self.io.read(&tile_path(&make(w))) {
                Ok(b) if long_enough(&b) => return Ok(b),
                Ok(_) => {}
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                Err(_) => {}
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is missing", tile_path(&make(width))),
        ))
    }

    pub fn bundle(&self, index: u64, width: u32) -> io::Result<Vec<u8>> {
        self.read_tile(None, index, width)
    }
}

impl TileReader for DiskTiles<'_> {
    type Error = io::Error;

    fn tile_hashes(&self, level: u32, index: u64, width: u32) -> io::Result<Vec<Hash>> {
        let bytes = self.read_tile(Some(level), index, width)?;
        let hashes = tile::decode_hashes(&bytes).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "tile is not a whole number of hashes")
        })?;
        if hashes.len() < width as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "tile is shorter than needed"));
        }
        Ok(hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::SimDisk;
    use auditrail_core::merkle::{MemoryTree, tree_root};
    use auditrail_core::tile::TileNodes;

    #[test]
    fn writer_root_matches_reference_and_restores_from_disk() {
        let disk = SimDisk::new();
        let mut w = TreeWriter::empty();
        let mut reference = MemoryTree::default();
        for i in 0..70_000u64 {
            let mut entry = [0u8; LEAF_ENTRY_BYTES];
            entry[1..9].copy_from_slice(&i.to_be_bytes());
            let leaf = w.append(&disk, &entry).unwrap();
            reference.leaf_hashes.push(leaf);
            if [1, 255, 256, 257, 65_536, 69_999].contains(&(i + 1)) {
                assert_eq!(w.root(), merkle::root_of(&reference.leaf_hashes), "size {}", i + 1);
                w.write_partials(&disk).unwrap();
                let restored = TreeWriter::restore(&disk, w.size()).unwrap();
                assert_eq!(restored.root(), w.root());
                let tiles = DiskTiles { io: &disk };
                let nodes = TileNodes { tiles: &tiles, size: w.size() };
                assert_eq!(tree_root(&nodes, w.size()).unwrap(), w.root());
            }
        }
        // At 70,000 leaves (the tlog-tiles example) the right edge is .p/112, .p/17 and .p/1.
        let written: Vec<String> =
            w.write_partials(&disk).unwrap().iter().map(TileId::path).collect();
        assert_eq!(
            written,
            ["tile/0/273.p/112", "tile/1/001.p/17", "tile/2/000.p/1", "tile/entries/273.p/112"]
        );
        for p in written {
            assert!(disk.paths().contains(&format!("log/{p}")), "{p}");
        }
    }
}
