//! A simulated disk for crash tests: it keeps, for every file, the bytes written so far and the
//! bytes known to be durable, and for every directory the entries known to be durable. It can
//! fail a chosen sync (to test fsync-failure poisoning) or "crash" at one (every later call
//! fails), and then produce the disk image a power cut could leave behind, with torn tails chosen
//! by a seeded generator.

use crate::io::Io;
use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
struct Inode {
    data: Vec<u8>,
    durable: Vec<u8>,
    /// Replaced whole since the last sync (`write_file`): a crash may leave any prefix of the
    /// new contents. Otherwise unsynced changes are appends and in-place overwrites.
    replaced: bool,
}

#[derive(Debug, Default)]
struct Disk {
    next_inode: u64,
    inodes: BTreeMap<u64, Inode>,
    /// path → inode, as the running program sees it.
    names: BTreeMap<String, u64>,
    /// path → inode, as it would be found after a crash.
    durable_names: BTreeMap<String, u64>,
    syncs: u64,
    /// Crash when the sync counter reaches this value: that sync and everything after fail.
    crash_at_sync: Option<u64>,
    /// Fail exactly this sync (the disk keeps working afterwards).
    fail_sync: Option<u64>,
    crashed: bool,
    /// Files not in memory, as if the page cache had dropped them: `read_at_resident` finds
    /// nothing until a prefetch brings the file back. (Whole files, so a plain read of one
    /// block does not: its neighbours would still be on disk.)
    evicted: std::collections::BTreeSet<String>,
    prefetches: u64,
}

/// A cheap, clonable handle to one simulated disk.
#[derive(Debug, Clone, Default)]
pub struct SimDisk(Arc<Mutex<Disk>>);

fn crashed() -> io::Error {
    io::Error::other("simulated crash: the disk is gone")
}

fn parent(path: &str) -> &str {
    path.rsplit_once('/').map_or("", |(d, _)| d)
}

/// A small deterministic generator (SplitMix64) so crash images reproduce from a seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

impl SimDisk {
    pub fn new() -> SimDisk {
        SimDisk::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many syncs (file, directory or whole-disk) have been issued.
    pub fn syncs(&self) -> u64 {
        self.lock().syncs
    }

    /// Crash at the `n`-th sync from now (1 = the next one).
    pub fn crash_at_sync(&self, n: u64) {
        let mut d = self.lock();
        d.crash_at_sync = Some(d.syncs + n);
    }

    /// Fail the `n`-th sync from now, once.
    pub fn fail_sync(&self, n: u64) {
        let mut d = self.lock();
        d.fail_sync = Some(d.syncs + n);
    }

    pub fn crash_now(&self) {
        self.lock().crashed = true;
    }

    /// The disk a power cut leaves: durable directory entries, durable bytes, and for each file
    /// a random prefix of what was written but not synced (a torn write), or, for a file whose
    /// unsynced contents do not extend its durable contents, either version.
    pub fn after_power_cut(&self, rng: &mut Rng) -> SimDisk {
        let d = self.lock();
        let mut out = Disk::default();
        // A name whose creation or rename was not made durable may or may not survive.
        let mut names: BTreeMap<String, u64> = d.durable_names.clone();
        for (name, ino) in &d.names {
            if d.durable_names.get(name) != Some(ino) && rng.below(2) == 0 {
                names.insert(name.clone(), *ino);
            }
        }
        for (name, ino) in names {
            let inode = &d.inodes[&ino];
            let data = if inode.data.starts_with(&inode.durable) {
                let extra = (inode.data.len() - inode.durable.len()) as u64;
                let keep = inode.durable.len() + rng.below(extra + 1) as usize;
                inode.data[..keep].to_vec()
            } else if !inode.replaced {
                torn_overwrite(inode, rng)
            } else if rng.below(2) == 0 {
                inode.durable.clone()
            } else {
                let keep = rng.below(inode.data.len() as u64 + 1) as usize;
                inode.data[..keep].to_vec()
            };
            let id = out.next_inode;
            out.next_inode += 1;
            out.inodes.insert(id, Inode { durable: data.clone(), data, replaced: false });
            out.names.insert(name.clone(), id);
            out.durable_names.insert(name, id);
        }
        SimDisk(Arc::new(Mutex::new(out)))
    }

    /// Reads what a crash would find of a file right now (its durable bytes), for tests.
    pub fn durable_bytes(&self, path: &str) -> Option<Vec<u8>> {
        let d = self.lock();
        let ino = d.durable_names.get(path)?;
        Some(d.inodes[ino].durable.clone())
    }

    /// Drops a file from memory (see [`Io::read_at_resident`]).
    pub fn evict(&self, path: &str) {
        self.lock().evicted.insert(path.to_string());
    }

    /// How many ranges were prefetched.
    pub fn prefetches(&self) -> u64 {
        self.lock().prefetches
    }

    /// Changes one byte of a file, as a tamperer or a failing disk would.
    pub fn flip_byte(&self, path: &str, offset: usize) {
        let mut d = self.lock();
        let ino = d.names[path];
        let inode = d.inodes.get_mut(&ino).unwrap();
        inode.data[offset] ^= 0x01;
        inode.durable = inode.data.clone();
    }

    pub fn paths(&self) -> Vec<String> {
        self.lock().names.keys().cloned().collect()
    }

    fn sync_point(d: &mut Disk) -> io::Result<()> {
        if d.crashed {
            return Err(crashed());
        }
        d.syncs += 1;
        if d.crash_at_sync == Some(d.syncs) {
            d.crashed = true;
            return Err(crashed());
        }
        if d.fail_sync == Some(d.syncs) {
            return Err(io::Error::other("simulated fsync failure"));
        }
        Ok(())
    }

    fn check(d: &Disk) -> io::Result<()> {
        if d.crashed { Err(crashed()) } else { Ok(()) }
    }

    fn inode_mut<'a>(d: &'a mut Disk, path: &str, create: bool) -> io::Result<&'a mut Inode> {
        let ino = match d.names.get(path) {
            Some(i) => *i,
            None if create => {
                let i = d.next_inode;
                d.next_inode += 1;
                d.inodes.insert(i, Inode::default());
                d.names.insert(path.to_string(), i);
                i
            }
            None => return Err(io::Error::new(io::ErrorKind::NotFound, path.to_string())),
        };
        Ok(d.inodes.get_mut(&ino).unwrap())
    }
}

/// What a power cut leaves of a file overwritten in place (and perhaps appended to) since its
/// last sync: the overwritten range torn at a random byte, new bytes before it and old bytes
/// after it, and the appended tail kept only if the tear is past the overwrite.
fn torn_overwrite(inode: &Inode, rng: &mut Rng) -> Vec<u8> {
    let common = inode.data.len().min(inode.durable.len());
    let first = (0..common).find(|&i| inode.data[i] != inode.durable[i]).unwrap_or(common);
    let last =
        (0..common).rev().find(|&i| inode.data[i] != inode.durable[i]).map_or(common, |i| i + 1);
    let tear = first + rng.below((last - first) as u64 + 1) as usize;
    let mut out = inode.durable.clone();
    out[..tear].copy_from_slice(&inode.data[..tear]);
    if tear == last && inode.data.len() > inode.durable.len() {
        let extra = (inode.data.len() - inode.durable.len()) as u64;
        let keep = inode.durable.len() + rng.below(extra + 1) as usize;
        out.extend_from_slice(&inode.data[inode.durable.len()..keep]);
    }
    out
}

impl Io for SimDisk {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        let mut d = self.lock();
        Self::check(&d)?;
        Ok(Self::inode_mut(&mut d, path, false)?.data.clone())
    }

    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut d = self.lock();
        Self::check(&d)?;
        let data = &Self::inode_mut(&mut d, path, false)?.data;
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(len).min(data.len());
        Ok(data[start..end].to_vec())
    }

    fn read_at_resident(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        if self.lock().evicted.contains(path) {
            return Ok(None);
        }
        self.read_at(path, offset, len).map(Some)
    }

    fn prefetch(&self, path: &str, _offset: u64, _len: usize) {
        let mut d = self.lock();
        d.prefetches += 1;
        d.evicted.remove(path);
    }

    fn len(&self, path: &str) -> io::Result<Option<u64>> {
        let mut d = self.lock();
        Self::check(&d)?;
        Ok(Self::inode_mut(&mut d, path, false).ok().map(|i| i.data.len() as u64))
    }

    fn append(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        Self::inode_mut(&mut d, path, true)?.data.extend_from_slice(data);
        Ok(())
    }

    fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        let inode = Self::inode_mut(&mut d, path, true)?;
        inode.data = data.to_vec();
        inode.replaced = true;
        Ok(())
    }

    fn write_at(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        let inode = Self::inode_mut(&mut d, path, false)?;
        let (start, end) = (offset as usize, offset as usize + data.len());
        if inode.data.len() < end {
            inode.data.resize(end, 0);
        }
        inode.data[start..end].copy_from_slice(data);
        Ok(())
    }

    fn sync_file(&self, path: &str) -> io::Result<()> {
        let mut d = self.lock();
        Self::sync_point(&mut d)?;
        let inode = Self::inode_mut(&mut d, path, false)?;
        inode.durable = inode.data.clone();
        inode.replaced = false;
        Ok(())
    }

    fn sync_dir(&self, dir: &str) -> io::Result<()> {
        let mut d = self.lock();
        Self::sync_point(&mut d)?;
        let in_dir = |p: &str| parent(p) == dir;
        d.durable_names.retain(|p, _| !in_dir(p));
        let current: Vec<(String, u64)> =
            d.names.iter().filter(|(p, _)| in_dir(p)).map(|(p, i)| (p.clone(), *i)).collect();
        d.durable_names.extend(current);
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        let mut d = self.lock();
        Self::sync_point(&mut d)?;
        d.durable_names = d.names.clone();
        for inode in d.inodes.values_mut() {
            inode.durable = inode.data.clone();
            inode.replaced = false;
        }
        Ok(())
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        let ino = d
            .names
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, from.to_string()))?;
        d.names.insert(to.to_string(), ino);
        Ok(())
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        d.names
            .remove(path)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, path.to_string()))?;
        Ok(())
    }

    fn truncate(&self, path: &str, len: u64) -> io::Result<()> {
        let mut d = self.lock();
        Self::check(&d)?;
        let inode = Self::inode_mut(&mut d, path, false)?;
        inode.data.truncate(len as usize);
        inode.durable.truncate(len as usize);
        Ok(())
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        let d = self.lock();
        Self::check(&d)?;
        // Files in `dir`, and the subdirectories that hold files (directories are implicit).
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let names: std::collections::BTreeSet<String> = d
            .names
            .keys()
            .filter_map(|p| p.strip_prefix(&prefix))
            .map(|rest| rest.split_once('/').map_or(rest, |(first, _)| first).to_string())
            .collect();
        Ok(names.into_iter().collect())
    }

    fn sync_count(&self) -> u64 {
        self.syncs()
    }

    fn list_tree(&self, dir: &str) -> io::Result<Vec<String>> {
        let d = self.lock();
        Self::check(&d)?;
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        Ok(d.names.keys().filter(|p| p.starts_with(&prefix)).cloned().collect())
    }

    fn create_dir_all(&self, _dir: &str) -> io::Result<()> {
        // Directories are implicit in the simulation: they exist when a file is in them.
        Ok(())
    }
}
