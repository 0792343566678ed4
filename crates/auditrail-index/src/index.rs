//! The index: frozen segments plus one memtable, searched newest first; the follower that feeds
//! it from the log; and its files under `<data>/index/`.
//!
//! Invariant: the parts cover seqs `0..indexed_through` contiguously, and `indexed_through`
//! never exceeds the log's durable size, because the follower reads only durable blocks.
//!
//! A full memtable is frozen and written to its file on a thread of its own while the follower
//! goes on filling a new one (freezing and writing a quarter of a million events takes most of
//! a second, which the follower would otherwise spend not indexing). Until its file is written
//! it stays searchable as the `full` part; at most one waits, so a slow disk slows the follower
//! rather than piling up memtables.

use crate::doc::{self, Doc, FhirTerms, GroupBy, PatientTokens};
use crate::file;
use crate::part::{Memtable, Part, Segment};
use crate::postings::Postings;
use auditrail_store::Store;
use auditrail_store::crypto::{self, Sealer};
use auditrail_store::keys::MasterKeys;
use auditrail_store::tail::{BlockLocation, LogTail};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] auditrail_store::StoreError),
    #[error("index i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("index: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone)]
pub struct IndexOptions {
    /// The memtable freezes into a segment file at this many events.
    pub memtable_rows_max: usize,
}

impl Default for IndexOptions {
    fn default() -> IndexOptions {
        IndexOptions { memtable_rows_max: 1 << 18 }
    }
}

/// A search: every group of `all_of` must match (AND), and within a group any term (OR).
#[derive(Debug, Clone)]
pub struct Query {
    pub all_of: Vec<Vec<Vec<u8>>>,
    /// `occurred_at` in `[lo, hi)`, milliseconds.
    pub occurred: (i64, i64),
    /// `recorded_at` in `[lo, hi)`, milliseconds.
    pub recorded: (i64, i64),
    /// Only seqs in `[lo, hi)`: the cursor of a paged search.
    pub seqs: (u64, u64),
    /// Only these seqs (sorted), when given: the result of an `_id` lookup.
    pub within: Option<Vec<u64>>,
    pub newest_first: bool,
    pub limit: usize,
}

impl Default for Query {
    fn default() -> Query {
        Query {
            all_of: Vec::new(),
            occurred: (i64::MIN, i64::MAX),
            recorded: (i64::MIN, i64::MAX),
            seqs: (0, u64::MAX),
            within: None,
            newest_first: true,
            limit: 50,
        }
    }
}

/// A search stopped at its deadline ([`Index::search_until`]).
#[derive(Debug)]
pub struct Unfinished {
    found: Vec<u64>,
    rest: Query,
}

impl Unfinished {
    /// The whole answer: what was found, then what the parts not searched yet hold.
    pub fn finish(self, index: &Index) -> Hits {
        let Unfinished { mut found, rest } = self;
        let more = index.search(&rest);
        found.extend(more.seqs);
        Hits { seqs: found, more: more.more }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hits {
    pub seqs: Vec<u64>,
    /// More events match beyond `limit`.
    pub more: bool,
}

struct State {
    segments: Vec<Arc<Segment>>,
    /// A full memtable whose segment file is being written.
    full: Option<Arc<Memtable>>,
    mem: Memtable,
}

impl State {
    fn parts(&self) -> impl DoubleEndedIterator<Item = &dyn Part> {
        self.segments
            .iter()
            .map(|s| s.as_ref() as &dyn Part)
            .chain(self.full.as_deref().map(|m| m as &dyn Part))
            .chain(std::iter::once(&self.mem as &dyn Part))
    }

    /// The part holding `seq`: segments are contiguous and in seq order, then the full
    /// memtable, then the memtable.
    fn part_for(&self, seq: u64) -> Option<&dyn Part> {
        let i = self.segments.partition_point(|s| s.end_seq() <= seq);
        match self.segments.get(i) {
            Some(s) if s.first_seq() <= seq => Some(s.as_ref()),
            _ => self
                .full
                .as_deref()
                .map(|m| m as &dyn Part)
                .into_iter()
                .chain(std::iter::once(&self.mem as &dyn Part))
                .find(|m| (m.first_seq()..m.end_seq()).contains(&seq)),
        }
    }
}

/// What writes a full memtable's segment file, shared with the thread that does it.
struct Writer {
    dir: PathBuf,
    file_key: Sealer,
    state: RwLock<State>,
    persisted: AtomicU64,
}

impl Writer {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Freezes `full` into a segment, writes its file, and puts the segment in its place.
    fn write_segment(&self, full: &Memtable) -> Result<(), IndexError> {
        let frozen = Arc::new(full.freeze());
        let name = file::file_name(frozen.first_seq(), frozen.end_seq());
        let tmp = self.dir.join(format!("{name}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&file::encode(&frozen.data, &self.file_key))?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.dir.join(&name))?;
        sync_dir(&self.dir)?;
        let end = frozen.end_seq();
        let mut state = self.write();
        assert!(
            state.full.as_ref().is_some_and(|f| f.end_seq() == end),
            "the full memtable changed while it was written"
        );
        state.segments.push(frozen);
        state.full = None;
        self.persisted.store(end, Ordering::SeqCst);
        Ok(())
    }
}

pub struct Index {
    options: IndexOptions,
    patients: PatientTokens,
    fhir_terms: Option<FhirTerms>,
    /// The parts, and what writes their files (the sealer of `file.rs` among it).
    shared: Arc<Writer>,
    /// The thread writing the full memtable, if one is.
    writing: std::sync::Mutex<Option<std::thread::JoinHandle<Result<(), IndexError>>>>,
    indexed: AtomicU64,
    /// Seq ranges `[first, end)` retention purged, sorted: never answered, never counted.
    purged: RwLock<Arc<Vec<(u64, u64)>>>,
}

fn in_ranges(ranges: &[(u64, u64)], seq: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= seq);
    ranges.get(i).is_some_and(|r| r.0 <= seq)
}

fn overlaps(ranges: &[(u64, u64)], first: u64, end: u64) -> bool {
    ranges.iter().any(|&(a, b)| a < end && b > first)
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("indexed_through", &self.indexed_through())
            .field("persisted_through", &self.persisted_through())
            .finish_non_exhaustive()
    }
}

pub const INDEX_DIR: &str = "index";
pub const INDEX_KEY_FILE: &str = auditrail_store::keys::INDEX_KEY.path;

/// The index's keys, both derived from its secret (`keys/index.key`, sealed under the master
/// key): the key index files are sealed with, and the patient-token key. Without the master
/// key neither the files nor a token for a guessed patient id can be computed.
struct IndexKeys {
    file: Sealer,
    patients: PatientTokens,
}

impl IndexKeys {
    fn derive(secret: &[u8; 32]) -> IndexKeys {
        IndexKeys {
            file: Sealer::new(&crypto::derive_key(secret, b"auditrail/index/file-key/v1")),
            patients: PatientTokens::new(&crypto::derive_key(
                secret,
                b"auditrail/index/patient-token/v1",
            )),
        }
    }
}

/// Loads the index's secret, creating it on first use. A new secret makes any existing index
/// files useless, so they are removed. A secret written in the clear by an older version is
/// sealed now (its index files, unencrypted, are dropped as an old format and rebuilt).
fn load_or_create_secret(data_dir: &Path, master: &MasterKeys) -> Result<[u8; 32], IndexError> {
    let path = data_dir.join(INDEX_KEY_FILE);
    let purpose = auditrail_store::keys::INDEX_KEY.purpose;
    match std::fs::read(&path) {
        Ok(bytes) => {
            let (secret, sealed) = master.open_blob_or_legacy(purpose, &bytes).map_err(|e| {
                IndexError::Invalid(format!(
                    "{INDEX_KEY_FILE}: {e}; if the master keys are the right ones, delete \
                     {INDEX_KEY_FILE} and the index is rebuilt from the log with a new key"
                ))
            })?;
            let secret: [u8; 32] = secret
                .try_into()
                .map_err(|_| IndexError::Invalid(format!("{INDEX_KEY_FILE} must hold 32 bytes")))?;
            if !sealed {
                write_private(&path, &master.seal_blob(purpose, &secret))?;
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = crypto::random();
            let dir = data_dir.join(INDEX_DIR);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)?;
            }
            write_private(&path, &master.seal_blob(purpose, &secret))?;
            Ok(secret)
        }
        Err(e) => Err(e.into()),
    }
}

/// Replaces `path` durably with a private (0600) file: temporary file, fsync, rename, fsync of
/// the directory.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), IndexError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new();
    f.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut f, 0o600);
    let mut f = f.open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().expect("keys dir"))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Index {
    /// Opens the index of a data directory, loading every intact segment file that continues
    /// the chain from seq 0. Files that do not (damaged, from another key, a gap) are removed;
    /// the follower re-reads those events from the log.
    ///
    /// `master` opens the index's secret (`keys/index.key`): the index files are sealed under
    /// a key derived from it.
    pub fn open(
        data_dir: &Path,
        master: &MasterKeys,
        options: IndexOptions,
        fhir_terms: Option<FhirTerms>,
    ) -> Result<Index, IndexError> {
        let keys = IndexKeys::derive(&load_or_create_secret(data_dir, master)?);
        let dir = data_dir.join(INDEX_DIR);
        std::fs::create_dir_all(&dir)?;
        let mut files: Vec<(u64, u64, String)> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let (a, b) = file::parse_file_name(&name)?;
                Some((a, b, name))
            })
            .collect();
        files.sort();
        let mut segments = Vec::new();
        let mut next = 0;
        for (first, end, name) in files {
            let path = dir.join(&name);
            let loaded = (first == next)
                .then(|| std::fs::read(&path).ok())
                .flatten()
                .and_then(|bytes| file::decode(&bytes, &keys.file).ok())
                .filter(|d| d.first_seq == first && first + d.occurred.len() as u64 == end);
            match loaded {
                Some(d) => {
                    segments.push(Arc::new(Segment::new(d)));
                    next = end;
                }
                None => std::fs::remove_file(&path)?,
            }
        }
        // Temporary files of an interrupted write.
        for e in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            if e.file_name().to_string_lossy().ends_with(".tmp") {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(Index {
            options,
            patients: keys.patients,
            fhir_terms,
            shared: Arc::new(Writer {
                dir,
                file_key: keys.file,
                state: RwLock::new(State { segments, full: None, mem: Memtable::new(next) }),
                persisted: AtomicU64::new(next),
            }),
            writing: std::sync::Mutex::new(None),
            indexed: AtomicU64::new(next),
            purged: RwLock::new(Arc::new(Vec::new())),
        })
    }

    /// Removes every index file: the next follower rebuilds from seq 0.
    pub fn reset(&self) -> Result<(), IndexError> {
        self.settle()?;
        let mut state = self.write();
        for s in &state.segments {
            let path = self.shared.dir.join(file::file_name(s.first_seq(), s.end_seq()));
            std::fs::remove_file(&path)?;
        }
        sync_dir(&self.shared.dir)?;
        state.segments.clear();
        state.mem = Memtable::new(0);
        self.indexed.store(0, Ordering::SeqCst);
        self.shared.persisted.store(0, Ordering::SeqCst);
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.read()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.shared.write()
    }

    /// Tells the index which seq ranges retention purged (sorted `[first, end)`): searches,
    /// counts and statistics leave them out from now on.
    pub fn set_purged(&self, ranges: Vec<(u64, u64)>) {
        *self.purged.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ranges);
    }

    fn purged(&self) -> Arc<Vec<(u64, u64)>> {
        self.purged.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn patients(&self) -> &PatientTokens {
        &self.patients
    }

    /// Events `0..indexed_through` are searchable.
    pub fn indexed_through(&self) -> u64 {
        self.indexed.load(Ordering::SeqCst)
    }

    /// Events `0..persisted_through` are in index files and need not be re-read after a restart.
    pub fn persisted_through(&self) -> u64 {
        self.shared.persisted.load(Ordering::SeqCst)
    }

    /// Builds documents for stored events (no lock held: this is the expensive part).
    pub fn extract(&self, seq: u64, stored: &[u8]) -> Result<Doc, IndexError> {
        doc::extract(seq, stored, &self.patients, self.fhir_terms).map_err(IndexError::Invalid)
    }

    /// Adds the next events, in seq order.
    pub fn add(&self, docs: Vec<(Doc, BlockLocation)>) {
        let Some(last) = docs.last().map(|d| d.0.seq) else { return };
        let mut state = self.write();
        for (doc, block) in docs {
            state.mem.push(doc, &block);
        }
        self.indexed.store(last + 1, Ordering::SeqCst);
    }

    /// Rows for events retention purged before they were indexed (a rebuild after a purge):
    /// rows stay contiguous with seqs, so each gets an empty placeholder that nothing matches.
    fn add_purged(
        &self,
        (first, end): (u64, u64),
        purged: &auditrail_store::retention::Purged,
    ) -> Result<(), IndexError> {
        let p = purged.find(first).expect("skipped because it was purged");
        let block = BlockLocation {
            segment: p.first_seq,
            offset: 0,
            first_seq: p.first_seq,
            count: u32::try_from(p.end_seq - p.first_seq).unwrap_or(u32::MAX),
        };
        let mut seq = first;
        while seq < end {
            let n = (self.memtable_room() as u64).min(end - seq);
            self.add(
                (seq..seq + n)
                    .map(|s| (Doc::placeholder(s, p.oldest_recorded_ms), block))
                    .collect(),
            );
            self.flush(false)?;
            seq += n;
        }
        Ok(())
    }

    /// Events the memtable takes before it is full (at least 1).
    fn memtable_room(&self) -> usize {
        self.options.memtable_rows_max.saturating_sub(self.read().mem.len()).max(1)
    }

    /// Freezes the memtable into a segment file when it is full, on a thread of its own; with
    /// `force`, freezes it whatever its size and returns once every part is written.
    pub fn flush(&self, force: bool) -> Result<(), IndexError> {
        let (empty, full) = {
            let state = self.read();
            (state.mem.is_empty(), state.mem.len() >= self.options.memtable_rows_max)
        };
        if !full && !force {
            return Ok(());
        }
        // At most one full memtable waits for its file.
        self.settle()?;
        if empty {
            return Ok(());
        }
        let full = {
            let mut state = self.write();
            let next = Memtable::after(&state.mem);
            let full = Arc::new(std::mem::replace(&mut state.mem, next));
            state.full = Some(full.clone());
            full
        };
        if force {
            return self.shared.write_segment(&full);
        }
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("index-writer".into())
            .spawn(move || shared.write_segment(&full))?;
        *self.writing.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        Ok(())
    }

    /// Waits for the full memtable's file to be written. A write that failed is tried again
    /// here, so its error reaches the caller (the follower reports it and retries).
    fn settle(&self) -> Result<(), IndexError> {
        let writing = self.writing.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = writing
            && let Ok(Ok(())) = handle.join()
        {
            return Ok(());
        }
        let full = self.read().full.clone();
        match full {
            Some(full) => self.shared.write_segment(&full),
            None => Ok(()),
        }
    }

    /// The block holding `seq`, if it is indexed.
    pub fn block_for(&self, seq: u64) -> Option<BlockLocation> {
        self.read().part_for(seq)?.block_for(seq)
    }

    /// [`Index::block_for`] of each of `seqs`, under one lock.
    pub fn blocks_for(&self, seqs: &[u64]) -> Vec<Option<BlockLocation>> {
        let state = self.read();
        seqs.iter().map(|&seq| state.part_for(seq)?.block_for(seq)).collect()
    }

    /// The indexed `occurred_at` of `seq` (the event date FHIR sorts by).
    pub fn occurred_of(&self, seq: u64) -> Option<i64> {
        let state = self.read();
        let part = state.part_for(seq)?;
        Some(part.occurred((seq - part.first_seq()) as u32))
    }

    /// Seqs of the events whose `id` may be `id` (hash matches; compare after reading).
    pub fn id_candidates(&self, id: &str) -> Vec<u64> {
        let hash = doc::id_hash(id);
        let state = self.read();
        state
            .parts()
            .flat_map(|p| {
                p.id_rows(hash)
                    .into_iter()
                    // A placeholder (a seq purged before it was indexed) has no id to match.
                    .filter(move |&r| p.occurred(r) != doc::PLACEHOLDER_OCCURRED_MS)
                    .map(move |r| p.first_seq() + u64::from(r))
            })
            .collect()
    }

    pub fn search(&self, q: &Query) -> Hits {
        let finished = self.search_until(q, None);
        finished.unwrap_or_else(|_| unreachable!("a search without a deadline finishes"))
    }

    /// [`Index::search`], stopping between two parts once `deadline` has passed. Then the
    /// answer is what was found so far and the query for the parts not searched yet, which
    /// [`Unfinished::finish`] runs (on a thread that may take its time).
    pub fn search_until(
        &self,
        q: &Query,
        deadline: Option<Instant>,
    ) -> Result<Hits, Box<Unfinished>> {
        let purged = self.purged();
        let state = self.read();
        let mut seqs = Vec::new();
        let want = q.limit.saturating_add(1);
        let mut visit = |part: &dyn Part| {
            for_each_match(part, q, q.newest_first, &mut |seq| {
                if !in_ranges(&purged, seq) {
                    seqs.push(seq);
                }
                seqs.len() < want
            });
            seqs.len() < want
        };
        let mut parts: Vec<&dyn Part> = state.parts().collect();
        if q.newest_first {
            parts.reverse();
        }
        for part in parts {
            if !visit(part) {
                break;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                // The rest of the seqs, on the side of this part not searched yet.
                let mut rest = q.clone();
                if q.newest_first {
                    rest.seqs.1 = rest.seqs.1.min(part.first_seq());
                } else {
                    rest.seqs.0 = rest.seqs.0.max(part.end_seq());
                }
                rest.limit = q.limit - seqs.len();
                return Err(Box::new(Unfinished { found: seqs, rest }));
            }
        }
        let more = seqs.len() > q.limit;
        seqs.truncate(q.limit);
        Ok(Hits { seqs, more })
    }

    /// How many events match (ignores `limit` and the order).
    pub fn count(&self, q: &Query) -> u64 {
        let purged = self.purged();
        let state = self.read();
        let mut n = 0u64;
        for part in state.parts() {
            let some_purged = overlaps(&purged, part.first_seq(), part.end_seq());
            if !some_purged
                && q.all_of.len() == 1
                && q.all_of[0].len() == 1
                && q.occurred == (i64::MIN, i64::MAX)
                && q.recorded == (i64::MIN, i64::MAX)
                && q.seqs == (0, u64::MAX)
                && q.within.is_none()
            {
                n += part.postings(&q.all_of[0][0]).len() as u64;
                continue;
            }
            for_each_match(part, q, false, &mut |seq| {
                if !some_purged || !in_ranges(&purged, seq) {
                    n += 1;
                }
                true
            });
        }
        n
    }

    /// Counts of events with `occurred_at` in `[from, to)` per value of `group`, largest first.
    pub fn stats(&self, group: GroupBy, from: i64, to: i64) -> Vec<(String, u64)> {
        let g = group as usize;
        let purged = self.purged();
        let state = self.read();
        let mut totals: HashMap<&str, u64> = HashMap::new();
        for part in state.parts() {
            let mut local = vec![0u64; part.dict(g).len()];
            // Chunk totals count purged rows too: a part with any is scanned row by row.
            let some_purged = overlaps(&purged, part.first_seq(), part.end_seq());
            let chunks = if some_purged { &[][..] } else { part.chunks() };
            let first = part.first_seq();
            let scan = |local: &mut Vec<u64>, rows: std::ops::Range<usize>| {
                for row in rows {
                    let t = part.occurred(row as u32);
                    if t >= from
                        && t < to
                        && !(some_purged && in_ranges(&purged, first + row as u64))
                    {
                        local[part.group_id(g, row as u32) as usize] += 1;
                    }
                }
            };
            if chunks.is_empty() {
                scan(&mut local, 0..part.len());
            } else {
                for (c, chunk) in chunks.iter().enumerate() {
                    if chunk.occurred_max < from || chunk.occurred_min >= to {
                        continue;
                    }
                    let whole = |local: &mut Vec<u64>| {
                        for &(id, count) in &chunk.counts[g] {
                            local[id as usize] += u64::from(count);
                        }
                    };
                    if chunk.occurred_min >= from && chunk.occurred_max < to {
                        whole(&mut local);
                        continue;
                    }
                    // Partly covered: tally the rows inside, or the whole chunk less the rows
                    // outside, whichever touches fewer rows.
                    let start = c * crate::part::CHUNK_ROWS;
                    let times = &part.occurred_column()[start..start + chunk.by_time.len()];
                    let [before, inside, after] = chunk.split_by_time(times, from, to);
                    let group_of = |offset: u16| part.group_id(g, (start + offset as usize) as u32);
                    if inside.len() <= before.len() + after.len() {
                        for &r in inside {
                            local[group_of(r) as usize] += 1;
                        }
                    } else {
                        whole(&mut local);
                        for &r in before.iter().chain(after) {
                            local[group_of(r) as usize] -= 1;
                        }
                    }
                }
            }
            for (id, count) in local.into_iter().enumerate() {
                if count > 0 {
                    *totals.entry(part.dict(g)[id].as_str()).or_default() += count;
                }
            }
        }
        let mut out: Vec<(String, u64)> =
            totals.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Bytes of index files on disk.
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.shared.dir)
            .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0)
    }

    pub fn segment_count(&self) -> usize {
        self.read().segments.len()
    }
}

/// Rows of `part` matching the term groups, ascending; `None` means every row.
fn candidate_rows<'a>(
    part: &'a dyn Part,
    all_of: &[Vec<Vec<u8>>],
    within: Option<&[u64]>,
) -> Option<Cow<'a, [u32]>> {
    if all_of.is_empty() && within.is_none() {
        return None;
    }
    let mut lists: Vec<Postings<'a>> = Vec::with_capacity(all_of.len() + 1);
    if let Some(seqs) = within {
        let (first, end) = (part.first_seq(), part.end_seq());
        let rows: Vec<u32> =
            seqs.iter().filter(|&&s| s >= first && s < end).map(|&s| (s - first) as u32).collect();
        lists.push(Postings::Rows(Cow::Owned(rows)));
    }
    for group in all_of {
        let list = if group.len() == 1 {
            part.postings(&group[0])
        } else {
            let mut union: Vec<u32> =
                group.iter().flat_map(|k| part.postings(k).rows().into_owned()).collect();
            union.sort_unstable();
            union.dedup();
            Postings::Rows(Cow::Owned(union))
        };
        lists.push(list);
    }
    // Walk the shortest list and test its rows against the others.
    lists.sort_by_key(Postings::len);
    let mut lists = lists.into_iter();
    let shortest = lists.next()?.rows();
    let rest: Vec<Postings<'a>> = lists.map(Postings::into_matcher).collect();
    if rest.is_empty() || shortest.is_empty() {
        return Some(shortest);
    }
    Some(Cow::Owned(
        shortest.iter().copied().filter(|&r| rest.iter().all(|l| l.contains(r))).collect(),
    ))
}

/// Calls `f` with each matching seq of `part` in the given order until it returns false.
fn for_each_match(part: &dyn Part, q: &Query, newest_first: bool, f: &mut dyn FnMut(u64) -> bool) {
    let first = part.first_seq();
    if part.is_empty() || q.seqs.1 <= first || q.seqs.0 >= part.end_seq() {
        return;
    }
    // Rows allowed by the seq bounds; recorded_at is non-decreasing in seq, so its bounds narrow
    // the same range by binary search.
    let mut lo = q.seqs.0.saturating_sub(first).min(part.len() as u64) as usize;
    let mut hi = (q.seqs.1.saturating_sub(first)).min(part.len() as u64) as usize;
    if q.recorded != (i64::MIN, i64::MAX) {
        lo = lo.max(partition(part.len(), |r| part.recorded(r) < q.recorded.0));
        hi = hi.min(partition(part.len(), |r| part.recorded(r) < q.recorded.1));
    }
    if lo >= hi {
        return;
    }
    let chunks = part.chunks();
    let time_ok = |row: u32| {
        let t = part.occurred(row);
        t >= q.occurred.0 && t < q.occurred.1
    };
    let chunk_may_match = |row: u32| {
        q.occurred == (i64::MIN, i64::MAX)
            || chunks
                .get(row as usize / crate::part::CHUNK_ROWS)
                .is_none_or(|c| c.occurred_max >= q.occurred.0 && c.occurred_min < q.occurred.1)
    };
    let mut emit =
        |row: u32| -> bool { if time_ok(row) { f(first + u64::from(row)) } else { true } };
    match candidate_rows(part, &q.all_of, q.within.as_deref()) {
        Some(rows) => {
            let start = rows.partition_point(|&r| (r as usize) < lo);
            let end = rows.partition_point(|&r| (r as usize) < hi);
            let rows = &rows[start..end];
            if newest_first {
                for &r in rows.iter().rev() {
                    if !emit(r) {
                        return;
                    }
                }
            } else {
                for &r in rows {
                    if !emit(r) {
                        return;
                    }
                }
            }
        }
        None => {
            let step = crate::part::CHUNK_ROWS;
            if newest_first {
                let mut r = hi;
                while r > lo {
                    let row = (r - 1) as u32;
                    if !chunk_may_match(row) {
                        // Skip to the end of the previous chunk.
                        r = (row as usize / step * step).max(lo);
                        continue;
                    }
                    if !emit(row) {
                        return;
                    }
                    r -= 1;
                }
            } else {
                let mut r = lo;
                while r < hi {
                    let row = r as u32;
                    if !chunk_may_match(row) {
                        r = ((row as usize / step + 1) * step).min(hi);
                        continue;
                    }
                    if !emit(row) {
                        return;
                    }
                    r += 1;
                }
            }
        }
    }
}

/// The first row in `0..len` for which `before` is false (`before` must be monotonic).
fn partition(len: usize, before: impl Fn(u32) -> bool) -> usize {
    let (mut lo, mut hi) = (0, len);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if before(mid as u32) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

/// Events in one step above which documents are built on two threads.
const PARALLEL_BUILD_MIN: usize = 512;

/// Feeds the index from the log: reads durable blocks after `indexed_through` and adds them.
pub struct Follower {
    tail: LogTail,
}

impl Follower {
    pub fn new(index: &Index, store: &Store) -> Follower {
        Follower { tail: store.tail(index.indexed_through()) }
    }

    /// Indexes up to `blocks_max` durable blocks; returns how many events it added. Documents
    /// are built on two threads when there are enough of them (building is nine tenths of
    /// the work); they are added in seq order on this one.
    pub fn step(
        &mut self,
        index: &Index,
        store: &Store,
        blocks_max: usize,
    ) -> Result<u64, IndexError> {
        self.step_and_pass_on(index, store, blocks_max, |_| {})
    }

    /// Like [`Follower::step`], then hands `pass_on` the events it indexed, `(seq, stored
    /// bytes)` in seq order, for another reader of the log that would otherwise decrypt and
    /// decompress the same blocks again.
    pub fn step_and_pass_on(
        &mut self,
        index: &Index,
        store: &Store,
        blocks_max: usize,
        pass_on: impl FnOnce(Vec<(u64, Vec<u8>)>),
    ) -> Result<u64, IndexError> {
        assert_eq!(self.tail.next_seq(), index.indexed_through(), "one follower per index");
        let durable = store.stages().sequenced;
        if let Some(skipped) = self.tail.skip_purged(&store.purged()) {
            index.add_purged(skipped, &store.purged())?;
            return Ok(skipped.1 - skipped.0);
        }
        let mut records: Vec<(BlockLocation, u64, Vec<u8>)> = Vec::new();
        let n = self.tail.read(durable, blocks_max, |at, seq, record| {
            records.push((*at, seq, record.canonical.to_vec()));
            Ok(())
        })?;
        let build = |part: &[(BlockLocation, u64, Vec<u8>)]| {
            part.iter()
                .map(|(at, seq, bytes)| Ok((index.extract(*seq, bytes)?, *at)))
                .collect::<Result<Vec<_>, IndexError>>()
        };
        let docs = if records.len() >= PARALLEL_BUILD_MIN {
            let (first, second) = records.split_at(records.len() / 2);
            let (a, b) = std::thread::scope(|s| {
                let helper = s.spawn(|| build(second));
                (build(first), helper.join())
            });
            let mut docs = a?;
            docs.extend(b.map_err(|_| IndexError::Invalid("a document builder panicked".into()))??);
            docs
        } else {
            build(&records)?
        };
        // Added in pieces that fill the memtable exactly, so every segment file has
        // `memtable_rows_max` events. Every document is added even when a file cannot be
        // written, because the tail has moved past them all; the memtable then grows until a
        // later flush succeeds, and the error is returned once they are in.
        let mut docs = docs.into_iter().peekable();
        let mut flushed = Ok(());
        while docs.peek().is_some() {
            let room = if flushed.is_ok() { index.memtable_room() } else { usize::MAX };
            index.add(docs.by_ref().take(room).collect());
            if flushed.is_ok() {
                flushed = index.flush(false);
            }
        }
        if !records.is_empty() {
            pass_on(records.into_iter().map(|(_, seq, bytes)| (seq, bytes)).collect());
        }
        flushed.map(|()| n)
    }

    /// Indexes everything durable now.
    pub fn catch_up(&mut self, index: &Index, store: &Store) -> Result<u64, IndexError> {
        let mut total = 0;
        loop {
            let n = self.step(index, store, 64)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    }
}
