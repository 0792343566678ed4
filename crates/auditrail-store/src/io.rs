//! The storage seam. Everything the store writes goes through [`Io`], so crash tests can run the
//! real store over a simulated disk ([`crate::sim::SimDisk`]) that keeps a "written" and a
//! "durable" image of every file and crashes at any sync point.
//!
//! Paths are relative to the data directory.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub trait Io: Send + Sync + 'static {
    /// The whole file; `NotFound` if it does not exist.
    fn read(&self, path: &str) -> io::Result<Vec<u8>>;
    /// Up to `len` bytes from `offset` (fewer at the end of the file).
    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Like [`Io::read_at`], but `None` rather than waiting for the disk when some of the
    /// range is not in memory (the page cache). A store that cannot tell reads.
    fn read_at_resident(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        self.read_at(path, offset, len).map(Some)
    }
    /// Asks for the range to be brought into memory without waiting for it, so that reads of
    /// several ranges wait for the disk once, together. A hint: it may do nothing.
    fn prefetch(&self, _path: &str, _offset: u64, _len: usize) {}
    /// The file's length, or `None` if it does not exist.
    fn len(&self, path: &str) -> io::Result<Option<u64>>;
    /// Appends to a file, creating it if needed. Not durable until [`Io::sync_file`].
    fn append(&self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Creates or replaces a file's contents. Not durable until synced.
    fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()>;
    /// Like [`Io::write_file`], but a new file is readable by its owner only (mode 0600 on
    /// a real disk): for key files.
    fn write_private_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
        self.write_file(path, data)
    }
    /// Overwrites bytes of an existing file in place at `offset` (a key rewrap rewrites
    /// segment headers this way, under a journal). Not durable until synced; a crash may
    /// leave any mix of old and new bytes in the range.
    fn write_at(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Makes a file's contents durable (fdatasync).
    fn sync_file(&self, path: &str) -> io::Result<()>;
    /// Makes a directory's entries (created, renamed, removed files) durable.
    fn sync_dir(&self, path: &str) -> io::Result<()>;
    /// Makes everything written so far under the data directory durable (syncfs): one call for
    /// the thousands of tile files a publication may cover.
    fn sync_all(&self) -> io::Result<()>;
    fn rename(&self, from: &str, to: &str) -> io::Result<()>;
    fn remove(&self, path: &str) -> io::Result<()>;
    fn truncate(&self, path: &str, len: u64) -> io::Result<()>;
    /// File names (not paths) in a directory; empty if it does not exist.
    fn list(&self, dir: &str) -> io::Result<Vec<String>>;
    /// Paths of every file below a directory, at any depth, relative to the data directory.
    fn list_tree(&self, dir: &str) -> io::Result<Vec<String>>;
    fn create_dir_all(&self, dir: &str) -> io::Result<()>;
    /// How many syncs (of any kind) have been issued: for benchmarks and tests.
    fn sync_count(&self) -> u64 {
        0
    }
    /// The file's Unix permission bits, where the disk has them (`None` for a simulated one
    /// or a missing file): key files readable by others are refused.
    fn permissions(&self, _path: &str) -> io::Result<Option<u32>> {
        Ok(None)
    }
}

/// The real file system, rooted at the data directory.
#[derive(Debug)]
pub struct StdIo {
    root: PathBuf,
    /// The file most recently appended to, kept open: the active segment.
    append_handle: Mutex<Option<(String, File)>>,
    /// Files read at offsets, kept open: a search reads dozens of blocks, and two `open`s per
    /// block were a third of reading one back. Forgotten when a file is replaced or removed.
    read_handles: Mutex<std::collections::HashMap<String, std::sync::Arc<File>>>,
    syncs: std::sync::atomic::AtomicU64,
}

/// Read handles kept open at most (the map is emptied when it would grow past this).
const READ_HANDLES_MAX: usize = 64;

impl StdIo {
    pub fn new(root: impl Into<PathBuf>) -> StdIo {
        StdIo {
            root: root.into(),
            append_handle: Mutex::new(None),
            read_handles: Mutex::new(std::collections::HashMap::new()),
            syncs: Default::default(),
        }
    }

    fn read_handle(&self, path: &str) -> io::Result<std::sync::Arc<File>> {
        let mut handles = self.read_handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = handles.get(path) {
            return Ok(f.clone());
        }
        let f = std::sync::Arc::new(File::open(self.path(path))?);
        if handles.len() >= READ_HANDLES_MAX {
            handles.clear();
        }
        handles.insert(path.to_string(), f.clone());
        Ok(f)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root.join(p)
    }

    fn with_append_handle<T>(
        &self,
        path: &str,
        f: impl FnOnce(&mut File) -> io::Result<T>,
    ) -> io::Result<T> {
        let mut guard = self.append_handle.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_none_or(|(p, _)| p != path) {
            let file = OpenOptions::new().create(true).append(true).open(self.path(path))?;
            *guard = Some((path.to_string(), file));
        }
        f(&mut guard.as_mut().unwrap().1)
    }

    fn forget_handle(&self, path: &str) {
        let mut guard = self.append_handle.lock().unwrap_or_else(|e| e.into_inner());
        if guard.as_ref().is_some_and(|(p, _)| p == path) {
            *guard = None;
        }
        self.read_handles.lock().unwrap_or_else(|e| e.into_inner()).remove(path);
    }
}

impl Io for StdIo {
    fn read(&self, path: &str) -> io::Result<Vec<u8>> {
        std::fs::read(self.path(path))
    }

    fn read_at(&self, path: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt as _;
        let f = self.read_handle(path)?;
        read_fully(len, |buf, from| f.read_at(buf, offset + from as u64))
    }

    fn read_at_resident(&self, path: &str, offset: u64, len: usize) -> io::Result<Option<Vec<u8>>> {
        let f = self.read_handle(path)?;
        match read_fully(len, |buf, from| read_at_nowait(&f, buf, offset + from as u64)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            // A kernel or file system without the flag: read as usual.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                self.read_at(path, offset, len).map(Some)
            }
            Err(e) => Err(e),
        }
    }

    fn prefetch(&self, path: &str, offset: u64, len: usize) {
        if let Ok(f) = self.read_handle(path) {
            will_need(&f, offset, len);
        }
    }

    fn len(&self, path: &str) -> io::Result<Option<u64>> {
        match std::fs::metadata(self.path(path)) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn append(&self, path: &str, data: &[u8]) -> io::Result<()> {
        self.with_append_handle(path, |f| f.write_all(data))
    }

    fn write_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
        self.forget_handle(path);
        std::fs::write(self.path(path), data)
    }

    fn write_private_file(&self, path: &str, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt as _;
        self.forget_handle(path);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(self.path(path))?;
        f.write_all(data)
    }

    fn write_at(&self, path: &str, offset: u64, data: &[u8]) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        self.forget_handle(path);
        let f = OpenOptions::new().write(true).open(self.path(path))?;
        f.write_all_at(data, offset)
    }

    fn sync_file(&self, path: &str) -> io::Result<()> {
        self.count_sync();
        let guard = self.append_handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((p, f)) = guard.as_ref()
            && p == path
        {
            return f.sync_data();
        }
        drop(guard);
        File::open(self.path(path))?.sync_data()
    }

    fn sync_dir(&self, path: &str) -> io::Result<()> {
        self.count_sync();
        File::open(self.path(path))?.sync_all()
    }

    fn sync_all(&self) -> io::Result<()> {
        self.count_sync();
        syncfs(&self.root)
    }

    fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        self.forget_handle(from);
        self.forget_handle(to);
        std::fs::rename(self.path(from), self.path(to))
    }

    fn remove(&self, path: &str) -> io::Result<()> {
        self.forget_handle(path);
        std::fs::remove_file(self.path(path))
    }

    fn truncate(&self, path: &str, len: u64) -> io::Result<()> {
        self.forget_handle(path);
        let f = OpenOptions::new().write(true).open(self.path(path))?;
        f.set_len(len)?;
        f.sync_all()
    }

    fn list(&self, dir: &str) -> io::Result<Vec<String>> {
        match std::fs::read_dir(self.path(dir)) {
            Ok(rd) => {
                let mut names = Vec::new();
                for e in rd {
                    names.push(e?.file_name().to_string_lossy().into_owned());
                }
                names.sort();
                Ok(names)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn list_tree(&self, dir: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_string()];
        while let Some(d) = stack.pop() {
            let rd = match std::fs::read_dir(self.path(&d)) {
                Ok(rd) => rd,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for e in rd {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                let p = if d.is_empty() { name } else { format!("{d}/{name}") };
                if e.file_type()?.is_dir() { stack.push(p) } else { out.push(p) }
            }
        }
        out.sort();
        Ok(out)
    }

    fn create_dir_all(&self, dir: &str) -> io::Result<()> {
        std::fs::create_dir_all(self.path(dir))
    }

    fn sync_count(&self) -> u64 {
        self.syncs.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn permissions(&self, path: &str) -> io::Result<Option<u32>> {
        use std::os::unix::fs::PermissionsExt as _;
        match std::fs::metadata(self.path(path)) {
            Ok(m) => Ok(Some(m.permissions().mode() & 0o7777)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl StdIo {
    fn count_sync(&self) {
        self.syncs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Up to `len` bytes through `read(buf, bytes read so far)`, which returns 0 at the end of
/// the file; retried when interrupted.
fn read_fully(
    len: usize,
    mut read: impl FnMut(&mut [u8], usize) -> io::Result<usize>,
) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let mut filled = 0;
    while filled < len {
        match read(&mut buf[filled..], filled) {
            Ok(0) => break, // end of file: fewer bytes, as documented
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// `preadv2(2)` with `RWF_NOWAIT`: reads only what is in the page cache, and fails with
/// `WouldBlock` when the first byte is not.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn read_at_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: `iov` describes `buf`, which outlives the call; `f` is an open descriptor.
    let n =
        unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, offset as libc::off_t, libc::RWF_NOWAIT) };
    if n >= 0 { Ok(n as usize) } else { Err(io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn read_at_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(f, buf, offset)
}

/// `posix_fadvise(WILLNEED)`: starts reading the range into the page cache.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn will_need(f: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: a hint about an open descriptor; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            f.as_raw_fd(),
            offset as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_WILLNEED,
        );
    }
}

#[cfg(not(target_os = "linux"))]
fn will_need(_f: &File, _offset: u64, _len: usize) {}

/// `syncfs(2)` on the file system holding `dir`: flushes every dirty page and all metadata.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn syncfs(dir: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(dir)?;
    // SAFETY: `f` is an open file descriptor for the duration of the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(not(target_os = "linux"))]
fn syncfs(_dir: &Path) -> io::Result<()> {
    // Portable fallback: `sync(2)` flushes every file system, which is a superset.
    std::process::Command::new("sync").status().map(|_| ())
}

#[cfg(all(test, target_os = "linux"))]
#[allow(unsafe_code)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// Drops a synced file's pages from the page cache; false on a file system that keeps
    /// files in memory (tmpfs), where nothing can be evicted.
    fn evict(path: &Path) -> bool {
        let f = File::open(path).unwrap();
        // SAFETY: `statfs` fills the struct it is given; `f` is an open descriptor.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::fstatfs(f.as_raw_fd(), &mut fs) }, 0);
        if fs.f_type == libc::TMPFS_MAGIC {
            return false;
        }
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        true
    }

    /// A read that must not wait finds nothing in a file the page cache dropped, a prefetch
    /// brings the range back, and then it reads the same bytes as a plain read.
    #[test]
    fn resident_reads_give_up_on_evicted_pages_until_a_prefetch() {
        let dir = tempfile::tempdir().unwrap();
        let io = StdIo::new(dir.path());
        let data: Vec<u8> = (0..256 << 10).map(|i: u32| (i * 7 % 251) as u8).collect();
        io.write_file("f", &data).unwrap();
        io.sync_file("f").unwrap();
        let (offset, len) = (100_000u64, 3000usize);
        let want = &data[offset as usize..offset as usize + len];
        assert_eq!(io.read_at_resident("f", offset, len).unwrap().as_deref(), Some(want));
        // Past the end: fewer bytes, as `read_at`.
        let tail = io.read_at_resident("f", data.len() as u64 - 10, 100).unwrap().unwrap();
        assert_eq!(tail, &data[data.len() - 10..]);

        if !evict(&dir.path().join("f")) {
            eprintln!("tmpfs keeps every page: nothing to evict");
            return;
        }
        assert_eq!(io.read_at_resident("f", offset, len).unwrap(), None);
        io.prefetch("f", offset, len);
        let mut read = None;
        for _ in 0..200 {
            read = io.read_at_resident("f", offset, len).unwrap();
            if read.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(read.as_deref(), Some(want), "the prefetch brought the range back within 2 s");
        assert_eq!(io.read_at("f", offset, len).unwrap(), want);
    }
}
