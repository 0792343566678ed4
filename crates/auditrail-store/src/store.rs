//! The log store: one sequencer thread and one syncer thread around the files on disk.
//!
//! ```text
//!  callers ──append──▶ [sequencer] assign seq + recorded_at, canonical bytes, commitment,
//!                        compress + seal one block per group, write() to the active segment
//!                                │ batches (bounded channel)
//!                                ▼
//!                      [syncer]  fdatasync (one per group of batches) ─▶ acknowledge
//!                                integrate leaves into tiles; publish a checkpoint ≤ 1/s
//! ```
//!
//! Stages, each with a watermark: sequenced (durable, has a seq) ≥ integrated (in the tree) ≥
//! published (in a signed checkpoint). An event is acknowledged only after the fsync that
//! covers its block; its leaf entry is derived from that block, so it is durable too.

use crate::crypto::{self, SegmentKeys};
use crate::dictionary::{self, Dictionary, Samples};
use crate::error::StoreError;
use crate::io::{Io, StdIo};
use crate::keys::{Keys, MasterInit, MasterKeySource};
use crate::reader::{self, SEGMENTS_DIR, list_segments, load_segment, segment_path};
use crate::retention::{
    Hold, Purged, PurgedSegment, RetentionPolicy, SegmentDecision, SegmentSummary,
};
use crate::segment::{self, SegmentHeader};
use crate::tree::{LOG_DIR, TreeWriter};
use auditrail_core::checkpoint::Checkpoint;
use auditrail_core::event::{IdempotencyKey, PreparedEvent};
use auditrail_core::leaf::{self, LeafEntry};
use auditrail_core::merkle::{self, Hash};
use auditrail_core::note::{self, NoteVerifier};
use auditrail_core::tile::{self, TileId};
use auditrail_core::time::{UnixMillis, day_of};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const CHECKPOINT_PATH: &str = "log/checkpoint";
pub const HISTORY_PATH: &str = "checkpoints/history";

/// A clock in Unix milliseconds; tests pass a fake one.
pub type Clock = Arc<dyn Fn() -> UnixMillis + Send + Sync>;

pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as UnixMillis)
            .unwrap_or(0)
    })
}

/// Tuning and limits. Defaults suit a server; tests shrink them to reach edge cases.
#[derive(Clone)]
pub struct Options {
    /// A segment rolls once it is this large (and at every UTC day change).
    pub segment_bytes_max: u64,
    /// A new checkpoint is published at most this often while the tree grows.
    pub publish_interval_ms: u64,
    /// One group commit (one block, one fsync) holds at most this many events...
    pub batch_events_max: usize,
    /// ...and at most this many bytes of canonical events.
    pub batch_bytes_max: usize,
    /// How long the sequencer may wait for more appends to join a group before sealing it.
    /// 0 (the default) relies on natural batching: whatever arrives during one fsync forms the
    /// next group, which already gives thousands of events per fsync under load.
    pub batch_wait_us: u64,
    /// How long a group of only [`Store::submit`]ted events (nobody waits for them) may wait
    /// for more before it is sealed; an awaited append joining it seals it at once. A server
    /// answering reads one after another traces each one: coalesced, a millisecond of them
    /// costs one block, one fsync and one index step instead of one each, work that otherwise
    /// competed with the next reads for the cores (CPU pressure during 10M-event lookups fell
    /// by half to two thirds). Kept short: a read's trace is searchable that much later.
    pub submit_wait_us: u64,
    /// Append calls waiting for the sequencer; beyond this `try_append` answers `Backpressure`.
    pub queue_requests_max: usize,
    /// Client `id`s are remembered for the most recent this-many events.
    pub idempotency_window_events: u64,
    /// A group commit is cut into blocks of about this many plaintext bytes. Small blocks make
    /// reading one event back cheap (one block is decrypted and decompressed); large ones
    /// compress better.
    pub block_plain_bytes_target: usize,
    /// The same, in a segment with a compression dictionary (`crate::dictionary`): with one,
    /// small blocks compress nearly as well as large ones without. 2 KiB rather than 4: a
    /// 10M-event lookup's p99 fell by a fifth for 13 more bytes per event.
    pub dictionary_block_plain_bytes_target: usize,
    pub clock: Clock,
    /// Where the master keys are: `keys/master.keys` by default (see [`MasterKeySource`]).
    pub master_keys: MasterKeySource,
}

impl std::fmt::Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options")
            .field("segment_bytes_max", &self.segment_bytes_max)
            .field("publish_interval_ms", &self.publish_interval_ms)
            .field("batch_events_max", &self.batch_events_max)
            .field("batch_bytes_max", &self.batch_bytes_max)
            .field("master_keys", &self.master_keys)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Options {
        Options {
            segment_bytes_max: 64 << 20,
            publish_interval_ms: 1000,
            batch_wait_us: 0,
            submit_wait_us: 1_000,
            batch_events_max: 16_384,
            batch_bytes_max: 16 << 20,
            queue_requests_max: 1024,
            idempotency_window_events: 2_000_000,
            block_plain_bytes_target: 16 << 10,
            dictionary_block_plain_bytes_target: 2 << 10,
            clock: system_clock(),
            master_keys: MasterKeySource::DataDir,
        }
    }
}

/// What the store says about one appended event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub seq: u64,
    pub id: String,
    pub leaf_hash: Hash,
    /// The server's `recorded_at` of a newly appended event; 0 for a duplicate (the original's
    /// is in the log).
    pub recorded_at_ms: u64,
    /// The event repeated an `id` already in the log: nothing was appended, and this is the
    /// original's receipt.
    pub duplicate: bool,
}

/// How far each stage of the log has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stages {
    pub sequenced: u64,
    pub integrated: u64,
    pub published: u64,
}

/// What recovery found and did when the store opened.
#[derive(Debug, Clone, Default)]
pub struct RecoveryReport {
    /// Bytes cut from the end of the last segment: a write torn by a crash, never acknowledged.
    pub truncated_bytes: u64,
    pub removed_empty_segment: bool,
    /// Leaves re-integrated into tiles after the last published checkpoint.
    pub reintegrated: u64,
}

struct Shared {
    sequenced: AtomicU64,
    integrated: AtomicU64,
    published: AtomicU64,
    /// Events queued with [`Store::submit`], and those of them answered (durable or refused):
    /// the difference is what nobody waits for yet.
    submitted: AtomicU64,
    submitted_answered: AtomicU64,
    poisoned: AtomicBool,
    poison_reason: Mutex<String>,
}

impl Shared {
    fn poison(&self, why: String) {
        let mut r = self.poison_reason.lock().unwrap_or_else(|e| e.into_inner());
        if !self.poisoned.swap(true, Ordering::SeqCst) {
            *r = why;
        }
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.poisoned.load(Ordering::SeqCst) {
            Err(StoreError::Poisoned(
                self.poison_reason.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            ))
        } else {
            Ok(())
        }
    }
}

/// Where an append's answer goes. Called once, on the writer's or the syncer's thread, so it
/// must not block (a channel send, a waker); dropped uncalled only if the store stops first.
type Reply = Box<dyn FnOnce(Result<Vec<Receipt>, StoreError>) + Send>;

/// An answer sent on a channel, for the callers that wait on one.
fn reply_to(tx: SyncSender<Result<Vec<Receipt>, StoreError>>) -> Reply {
    Box::new(move |r| {
        let _ = tx.send(r);
    })
}

enum Request {
    /// `awaited`: a caller waits for the answer, so the group is sealed as soon as nothing
    /// more is queued (see [`Options::submit_wait_us`] for the rest).
    Append {
        events: Vec<PreparedEvent>,
        reply: Reply,
        awaited: bool,
    },
    Publish {
        reply: SyncSender<Result<Stages, StoreError>>,
    },
    Shutdown,
}

enum SyncMsg {
    Batch {
        path: Option<String>,
        entries: Vec<[u8; leaf::LEAF_ENTRY_BYTES]>,
        end_seq: u64,
        replies: Vec<(Reply, Vec<Receipt>)>,
    },
    Publish {
        reply: SyncSender<Result<Stages, StoreError>>,
    },
    Shutdown,
}

/// The open log. Appends are safe from many threads; one process owns a data directory.
pub struct Store {
    requests: SyncSender<Request>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    io: Arc<dyn Io>,
    keys: Keys,
    options: Options,
    recovery: RecoveryReport,
    retention: Mutex<RetentionState>,
    /// The purged segments, read by every lookup; replaced whole after a purge.
    purged: std::sync::RwLock<Arc<Purged>>,
    _lock: Option<std::fs::File>,
}

/// Retention's working state; its mutex serialises purges and changes to holds.
#[derive(Default)]
struct RetentionState {
    /// Sealed segments never change, so their summaries are kept once read.
    summaries: HashMap<u64, SegmentSummary>,
    /// The patient tokens the cached summaries were filtered to.
    held_patients: BTreeSet<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("stages", &self.stages()).finish_non_exhaustive()
    }
}

/// Creates a new data directory: key files and the directory layout.
pub fn init(dir: &std::path::Path, origin: &str) -> Result<NoteVerifier, StoreError> {
    Ok(init_with(dir, origin, &MasterKeySource::DataDir)?.0)
}

/// Like [`init`], with the master keys where `source` says (see [`crate::keys::init`]).
pub fn init_with(
    dir: &std::path::Path,
    origin: &str,
    source: &MasterKeySource,
) -> Result<(NoteVerifier, MasterInit), StoreError> {
    if !auditrail_core::checkpoint::valid_origin(origin) {
        return Err(StoreError::InvalidInput(format!(
            "origin {origin:?} must be non-empty, without spaces or '+'"
        )));
    }
    for sub in [SEGMENTS_DIR, LOG_DIR, "checkpoints"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let (keys, how) = crate::keys::init(dir, origin, source).map_err(StoreError::Unavailable)?;
    Ok((keys.signer.verifier(), how))
}

impl Store {
    /// Opens the log in `dir` on the real file system, holding an exclusive lock on it.
    pub fn open(dir: &std::path::Path, options: Options) -> Result<Store, StoreError> {
        let lock = lock_dir(dir)?;
        let io: Arc<dyn Io> = Arc::new(StdIo::new(dir));
        let mut store = Store::open_with(io, options)?;
        store._lock = Some(lock);
        Ok(store)
    }

    /// Opens the log over any [`Io`] (the crash tests pass a simulated disk). Recovers first:
    /// cuts a torn tail, re-integrates leaves past the last checkpoint, and refuses to open on
    /// real corruption with the location of the damage.
    pub fn open_with(io: Arc<dyn Io>, options: Options) -> Result<Store, StoreError> {
        let keys =
            Keys::load_with(io.as_ref(), &options.master_keys).map_err(StoreError::Unavailable)?;
        for d in [SEGMENTS_DIR, LOG_DIR, "checkpoints"] {
            io.create_dir_all(d)?;
        }
        // A key rewrap that crashed half way is finished (or rolled back) before any header
        // is read: until then some headers may be torn.
        crate::rekey::recover_journal(io.as_ref(), &keys.master)?;
        // Legal holds written before they were sealed are sealed now.
        crate::retention::seal_legacy_holds(io.as_ref(), &keys.master)?;
        // The history file is created once, durably (its directory entry too): later appends
        // sync only its data, and a checkpoint must never outlive its history record.
        if io.len(HISTORY_PATH)?.is_none() {
            io.write_file(HISTORY_PATH, b"")?;
            io.sync_file(HISTORY_PATH)?;
            io.sync_dir("checkpoints")?;
        }
        // A purge that crashed after recording a segment as purged finishes now.
        crate::retention::finish_interrupted(io.as_ref())?;
        let purged = Purged::load(io.as_ref())?;
        let recovered = recover(io.as_ref(), &keys, &options)?;
        let shared = Arc::new(Shared {
            sequenced: AtomicU64::new(recovered.next_seq),
            integrated: AtomicU64::new(recovered.tree.size()),
            published: AtomicU64::new(recovered.published),
            submitted: AtomicU64::new(0),
            submitted_answered: AtomicU64::new(0),
            poisoned: AtomicBool::new(false),
            poison_reason: Mutex::new(String::new()),
        });
        let (req_tx, req_rx) = mpsc::sync_channel(options.queue_requests_max);
        // A few batches may wait for the syncer: enough to overlap sealing with fsync.
        let (sync_tx, sync_rx) = mpsc::sync_channel(4);
        let sequencer = Sequencer {
            io: io.clone(),
            keys: keys.clone(),
            options: options.clone(),
            shared: shared.clone(),
            next_seq: recovered.next_seq,
            last_recorded_at: recovered.last_recorded_at,
            compressor: compressor_for(recovered.active.as_ref().map(|a| &a.keys))
                .map_err(StoreError::Io)?,
            active: recovered.active,
            dedup: recovered.dedup,
            samples: Samples::default(),
            training: None,
            trained: None,
            training_failed: false,
            to_syncer: sync_tx,
            plain: Vec::new(),
            stored: Vec::new(),
            id_randomness: crypto::RandomPool::new(),
        };
        let syncer = Syncer {
            io: io.clone(),
            keys: keys.clone(),
            options: options.clone(),
            shared: shared.clone(),
            tree: recovered.tree,
            published: recovered.published,
            last_publish: Instant::now(),
            // Partial tiles already on disk, including strays a crash left: the next
            // publication removes every one its checkpoint does not need.
            partials: crate::tree::partial_tiles_on_disk(io.as_ref())?,
        };
        let t1 = std::thread::Builder::new()
            .name("auditrail-sequencer".into())
            .spawn(move || sequencer.run(req_rx))?;
        let t2 = std::thread::Builder::new()
            .name("auditrail-syncer".into())
            .spawn(move || syncer.run(sync_rx))?;
        Ok(Store {
            requests: req_tx,
            shared,
            threads: Mutex::new(vec![t1, t2]),
            io,
            keys,
            options,
            recovery: recovered.report,
            retention: Mutex::new(RetentionState::default()),
            purged: std::sync::RwLock::new(Arc::new(purged)),
            _lock: None,
        })
    }

    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn verifier(&self) -> NoteVerifier {
        self.keys.signer.verifier()
    }

    /// The master keys, for other files sealed at rest ([`crate::keys::MasterKeys::seal_blob`]).
    pub fn master_keys(&self) -> &crate::keys::MasterKeys {
        &self.keys.master
    }

    pub fn io(&self) -> &Arc<dyn Io> {
        &self.io
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    pub fn stages(&self) -> Stages {
        Stages {
            sequenced: self.shared.sequenced.load(Ordering::SeqCst),
            integrated: self.shared.integrated.load(Ordering::SeqCst),
            published: self.shared.published.load(Ordering::SeqCst),
        }
    }

    fn check_batch(&self, events: &[PreparedEvent]) -> Result<(), StoreError> {
        self.shared.check()?;
        if events.len() > self.options.batch_events_max {
            return Err(StoreError::InvalidInput(format!(
                "a batch holds at most {} events, got {}",
                self.options.batch_events_max,
                events.len()
            )));
        }
        let bytes: usize = events.iter().map(PreparedEvent::approx_len).sum();
        if bytes > self.options.batch_bytes_max {
            return Err(StoreError::InvalidInput(format!(
                "a batch holds at most {} bytes of events, got {bytes}",
                self.options.batch_bytes_max
            )));
        }
        Ok(())
    }

    /// Appends a batch atomically and returns once it is durable: either every event of the
    /// batch is in the log after a crash, or none is. Waits while the queue is full.
    pub fn append(&self, events: Vec<PreparedEvent>) -> Result<Vec<Receipt>, StoreError> {
        self.check_batch(&events)?;
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let reply = reply_to(tx);
        self.requests
            .send(Request::Append { events, reply, awaited: true })
            .map_err(|_| self.closed())?;
        rx.recv().map_err(|_| self.closed())?
    }

    /// Like [`Store::append`], but answers `Backpressure` at once when the queue is full.
    pub fn try_append(&self, events: Vec<PreparedEvent>) -> Result<Vec<Receipt>, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.try_append_then(events, reply_to(tx))?;
        rx.recv().map_err(|_| self.closed())?
    }

    /// Like [`Store::try_append`], but without waiting: `done` is called with the answer once
    /// the batch is durable (or cannot be), on one of the store's threads, so it must not
    /// block. A caller on an async runtime waits for it without holding a thread. When this
    /// returns an error, `done` is never called.
    pub fn try_append_then(
        &self,
        events: Vec<PreparedEvent>,
        done: impl FnOnce(Result<Vec<Receipt>, StoreError>) + Send + 'static,
    ) -> Result<(), StoreError> {
        self.check_batch(&events)?;
        if events.is_empty() {
            done(Ok(Vec::new()));
            return Ok(());
        }
        match self.requests.try_send(Request::Append {
            events,
            reply: Box::new(done),
            awaited: true,
        }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StoreError::Backpressure),
            Err(TrySendError::Disconnected(_)) => Err(self.closed()),
        }
    }

    /// Queues a batch without waiting for it to be durable: it becomes durable with the next
    /// group commit, within [`Options::submit_wait_us`] plus an fsync, unless the process dies
    /// first. For records whose loss in a
    /// crash is tolerable but whose absence in normal operation is not (the server's trace of
    /// each read). Answers `Backpressure` at once when the queue is full, and refuses when the
    /// store is poisoned, so a caller that must leave a trace can refuse its own work instead.
    pub fn submit(&self, events: Vec<PreparedEvent>) -> Result<(), StoreError> {
        self.check_batch(&events)?;
        if events.is_empty() {
            return Ok(());
        }
        // Nobody waits for the writer's answer; it is only counted.
        let count = events.len() as u64;
        let shared = self.shared.clone();
        let reply: Reply = Box::new(move |_| {
            shared.submitted_answered.fetch_add(count, Ordering::SeqCst);
        });
        // Counted before it is queued: the answer may come before `try_send` returns.
        self.shared.submitted.fetch_add(count, Ordering::SeqCst);
        let queued = self.requests.try_send(Request::Append { events, reply, awaited: false });
        if queued.is_err() {
            self.shared.submitted_answered.fetch_add(count, Ordering::SeqCst);
        }
        match queued {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(StoreError::Backpressure),
            Err(TrySendError::Disconnected(_)) => Err(self.closed()),
        }
    }

    /// Events queued with [`Store::submit`] and not yet durable (nor refused). Once this is
    /// zero, [`Store::stages`] read afterwards counts every event submitted before: a reader
    /// that must see the traces of the reads it made waits for this first.
    pub fn submitted_pending(&self) -> u64 {
        // Answers first: an answer read late can only make the figure larger, never hide one.
        let answered = self.shared.submitted_answered.load(Ordering::SeqCst);
        self.shared.submitted.load(Ordering::SeqCst).saturating_sub(answered)
    }

    /// Integrates everything sequenced so far and publishes a checkpoint for it now.
    pub fn publish(&self) -> Result<Stages, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.requests.send(Request::Publish { reply: tx }).map_err(|_| self.closed())?;
        rx.recv().map_err(|_| self.closed())?
    }

    /// Why a request got no answer: the store is poisoned (and why), or closed.
    pub fn closed(&self) -> StoreError {
        match self.shared.check() {
            Err(e) => e,
            Ok(()) => StoreError::Closed,
        }
    }

    /// Stops accepting appends, publishes a final checkpoint and joins the threads.
    pub fn close(self) -> Result<Stages, StoreError> {
        let _ = self.requests.send(Request::Shutdown);
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
        self.shared.check()?;
        Ok(self.stages())
    }

    /// Calls `f` with each durable stored event in `[from, to)`, oldest first, as canonical
    /// bytes. Reads one segment at a time, so memory stays bounded whatever the range.
    pub fn for_each_event(
        &self,
        from: u64,
        to: u64,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let to = to.min(self.stages().sequenced);
        reader::for_each_record(self.io.as_ref(), &self.keys.master, from, to, |seq, r, _| {
            f(seq, &r.canonical)
        })
    }

    /// The signed checkpoint of tree size `size`, or the newest one.
    pub fn checkpoint(&self, size: Option<u64>) -> Result<String, StoreError> {
        find_checkpoint(self.io.as_ref(), &self.keys, size)
    }

    /// RFC 6962 inclusion proof of leaf `seq` in the published tree of `size` leaves.
    pub fn inclusion_proof(&self, seq: u64, size: u64) -> Result<Vec<Hash>, StoreError> {
        self.check_published(size)?;
        if seq >= size {
            return Err(StoreError::InvalidInput(format!(
                "seq {seq} is not in a tree of size {size}"
            )));
        }
        let tiles = crate::tree::DiskTiles { io: self.io.as_ref() };
        Ok(merkle::inclusion_proof(&tile::TileNodes { tiles: &tiles, size }, seq, size)?)
    }

    /// RFC 6962 consistency proof between two published tree sizes.
    pub fn consistency_proof(&self, from: u64, to: u64) -> Result<Vec<Hash>, StoreError> {
        self.check_published(to)?;
        if from > to {
            return Err(StoreError::InvalidInput(format!(
                "from ({from}) must not exceed to ({to})"
            )));
        }
        let tiles = crate::tree::DiskTiles { io: self.io.as_ref() };
        Ok(merkle::consistency_proof(&tile::TileNodes { tiles: &tiles, size: to }, from, to)?)
    }

    fn check_published(&self, size: u64) -> Result<(), StoreError> {
        let published = self.stages().published;
        if size == 0 || size > published {
            return Err(StoreError::InvalidInput(format!(
                "tree size {size} is not published: sizes 1 to {published} are"
            )));
        }
        Ok(())
    }

    /// The segments retention has purged.
    pub fn purged(&self) -> Arc<Purged> {
        self.purged.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Verifies this live store while it goes on appending and publishing; independent of the
    /// store's lifetime, so a long audit never holds up closing it.
    pub fn auditor(&self) -> crate::verify::Auditor {
        crate::verify::Auditor { io: self.io.clone(), keys: self.keys.clone() }
    }

    /// The leaf entry of `seq` in the newest published tree (it outlives a purge).
    pub fn leaf_entry(&self, seq: u64) -> Result<LeafEntry, StoreError> {
        crate::retention::leaf_entry(self.io.as_ref(), seq, self.stages().published)
    }

    /// What retention would do at `now_ms`: a decision for every sealed segment old enough
    /// to be considered.
    pub fn retention_plan(
        &self,
        policy: &RetentionPolicy,
        now_ms: i64,
    ) -> Result<Vec<SegmentDecision>, StoreError> {
        let mut state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        self.plan_locked(&mut state, policy, now_ms)
    }

    fn plan_locked(
        &self,
        state: &mut RetentionState,
        policy: &RetentionPolicy,
        now_ms: i64,
    ) -> Result<Vec<SegmentDecision>, StoreError> {
        let io = self.io.as_ref();
        let purged = self.purged();
        let candidates = crate::retention::sealed_candidates(
            io,
            &purged,
            policy,
            self.stages().published,
            now_ms,
        )?;
        let holds = crate::retention::load_holds(io, &self.keys.master)?;
        // Summaries keep only the patients some hold names, so the cache stays small however
        // long segments are held; a hold naming a new patient means reading them again.
        let held: BTreeSet<String> = holds.iter().filter_map(|h| h.patient_token.clone()).collect();
        if !held.is_subset(&state.held_patients) {
            state.summaries.clear();
            state.held_patients = held.clone();
        }
        let mut summaries = Vec::with_capacity(candidates.len());
        for (first, end) in candidates {
            let summary = match state.summaries.get(&first) {
                Some(s) => s.clone(),
                None => {
                    let tokens = crate::retention::PatientTokens::new(&self.keys);
                    let s = crate::retention::summarise(
                        io,
                        &self.keys.master,
                        &tokens,
                        &state.held_patients,
                        first,
                        end,
                    )?;
                    state.summaries.insert(first, s.clone());
                    s
                }
            };
            summaries.push(summary);
        }
        Ok(crate::retention::decide(&summaries, policy, &holds, now_ms))
    }

    /// Purges every sealed segment past retention at `now_ms` and not under a legal hold.
    /// First appends (durably) `retention.purge` events naming what goes and every run purged
    /// so far (`actor` is who asked); then, per segment, records it in `retention/purged` and
    /// deletes its file (crypto-erasure). Returns what went, oldest first.
    pub fn purge(
        &self,
        policy: &RetentionPolicy,
        now_ms: i64,
        actor: &str,
    ) -> Result<Vec<PurgedSegment>, StoreError> {
        self.shared.check()?;
        let mut state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        let plan = self.plan_locked(&mut state, policy, now_ms)?;
        let going: Vec<PurgedSegment> = plan
            .into_iter()
            .filter(|d| d.purge)
            .map(|d| PurgedSegment {
                first_seq: d.first_seq,
                end_seq: d.end_seq,
                oldest_recorded_ms: d.oldest_recorded_ms,
                newest_recorded_ms: d.newest_recorded_ms,
                purged_at_ms: now_ms,
            })
            .collect();
        if going.is_empty() {
            return Ok(going);
        }
        let mut all = self.purged().ranges();
        all.extend(going.iter().map(|p| (p.first_seq, p.end_seq)));
        let events = crate::retention::purge_events(actor, &going, &crate::retention::runs(all))?;
        self.append(events)?;
        for record in &going {
            let next =
                crate::retention::purge_segment(self.io.as_ref(), &self.purged(), record.clone())?;
            *self.purged.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
            state.summaries.remove(&record.first_seq);
        }
        Ok(going)
    }

    /// The token legal holds use for a patient id.
    pub fn patient_token(&self, patient_id: &str) -> String {
        crate::retention::PatientTokens::new(&self.keys).token(patient_id)
    }

    pub fn holds(&self) -> Result<Vec<Hold>, StoreError> {
        crate::retention::load_holds(self.io.as_ref(), &self.keys.master)
    }

    /// Adds a legal hold (its id must be new).
    pub fn add_hold(&self, hold: Hold) -> Result<(), StoreError> {
        hold.check().map_err(StoreError::InvalidInput)?;
        let _state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        let mut holds = crate::retention::load_holds(self.io.as_ref(), &self.keys.master)?;
        if holds.iter().any(|h| h.id == hold.id) {
            return Err(StoreError::InvalidInput(format!("a hold with id {:?} exists", hold.id)));
        }
        holds.push(hold);
        crate::retention::save_holds(self.io.as_ref(), &self.keys.master, &holds)
    }

    /// Releases a legal hold; returns it, or `None` if there was none with this id.
    pub fn release_hold(&self, id: &str) -> Result<Option<Hold>, StoreError> {
        let _state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        let mut holds = crate::retention::load_holds(self.io.as_ref(), &self.keys.master)?;
        let Some(i) = holds.iter().position(|h| h.id == id) else { return Ok(None) };
        let hold = holds.remove(i);
        crate::retention::save_holds(self.io.as_ref(), &self.keys.master, &holds)?;
        Ok(Some(hold))
    }

    /// Re-wraps every segment's secret and re-seals every sealed file under the newest master
    /// key (see [`crate::rekey`]). Call it on a store nothing else uses: `auditrail key rewrap`
    /// opens the directory, which takes its lock, so no server can be running. Purges wait.
    pub fn rewrap(&self) -> Result<crate::rekey::RewrapReport, StoreError> {
        self.shared.check()?;
        let _state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        crate::rekey::rewrap(self.io.as_ref(), &self.keys.master)
    }

    /// Removes the master key versions nothing uses from the key source (see
    /// [`crate::rekey::retire_unused`]).
    pub fn retire_unused_master_keys(&self) -> Result<crate::rekey::RetireReport, StoreError> {
        let _state = self.retention.lock().unwrap_or_else(|e| e.into_inner());
        crate::rekey::retire_unused(self.io.as_ref(), &self.keys.master, &self.options.master_keys)
    }

    /// A forward reader of the durable log starting at `from`.
    pub fn tail(&self, from: u64) -> crate::tail::LogTail {
        crate::tail::LogTail::new(self.io.clone(), self.keys.master.clone(), from)
    }

    /// A reader of single blocks at locations a [`crate::tail::LogTail`] reported.
    pub fn block_reader(&self) -> crate::tail::BlockReader {
        crate::tail::BlockReader::new(self.io.clone(), self.keys.master.clone())
    }

    /// The stored events with seq in `[from, to)`, as canonical bytes (for small ranges).
    pub fn read_events(&self, from: u64, to: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        self.for_each_event(from, to, |seq, bytes| {
            out.push((seq, bytes.to_vec()));
            Ok(())
        })?;
        Ok(out)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.requests.send(Request::Shutdown);
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File, StoreError> {
    if !dir.join(crate::keys::SIGNING_KEY_PATH).exists() {
        return Err(StoreError::Unavailable(format!(
            "{} is not an auditrail data directory (run `auditrail init --data {}`)",
            dir.display(),
            dir.display()
        )));
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))?;
    f.try_lock().map_err(|_| {
        StoreError::Unavailable(format!("{} is in use by another auditrail process", dir.display()))
    })?;
    Ok(f)
}

/// The segment being appended to.
struct ActiveSegment {
    first_seq: u64,
    path: String,
    day: i64,
    len: u64,
    key_version: u32,
    keys: SegmentKeys,
}

/// Client ids seen in the last `window` events: key → (seq, leaf hash).
struct Dedup {
    window: u64,
    map: HashMap<IdempotencyKey, (u64, Hash)>,
    order: VecDeque<(u64, IdempotencyKey)>,
}

impl Dedup {
    fn new(window: u64) -> Dedup {
        Dedup { window, map: HashMap::new(), order: VecDeque::new() }
    }

    fn insert(&mut self, key: IdempotencyKey, seq: u64, leaf: Hash) {
        self.map.insert(key, (seq, leaf));
        self.order.push_back((seq, key));
        while let Some((old_seq, old_key)) = self.order.front().copied() {
            if old_seq + self.window > seq {
                break;
            }
            self.order.pop_front();
            if self.map.get(&old_key).is_some_and(|v| v.0 == old_seq) {
                self.map.remove(&old_key);
            }
        }
    }
}

struct Sequencer {
    io: Arc<dyn Io>,
    keys: Keys,
    options: Options,
    shared: Arc<Shared>,
    next_seq: u64,
    last_recorded_at: UnixMillis,
    active: Option<ActiveSegment>,
    dedup: Dedup,
    /// Compresses the active segment's blocks, with its dictionary if it has one.
    compressor: zstd::bulk::Compressor<'static>,
    /// Records of the active segment, sampled to train the next segment's dictionary...
    samples: Samples,
    /// ...on this thread, started once the active segment is half full.
    training: Option<std::thread::JoinHandle<Option<Vec<u8>>>>,
    /// A dictionary trained and waiting for the next segment.
    trained: Option<Arc<Dictionary>>,
    /// A training on this segment's samples found nothing: no retry until the next segment.
    training_failed: bool,
    to_syncer: SyncSender<SyncMsg>,
    /// Reused buffers: the block's plaintext and one stored event.
    plain: Vec<u8>,
    stored: Vec<u8>,
    /// The random part of generated event ids.
    id_randomness: crypto::RandomPool,
}

impl Sequencer {
    fn run(mut self, requests: Receiver<Request>) {
        let batch_wait = Duration::from_micros(self.options.batch_wait_us);
        let submit_wait = batch_wait.max(Duration::from_micros(self.options.submit_wait_us));
        while let Ok(first) = requests.recv() {
            let group_started = Instant::now();
            let mut group = Vec::new();
            let mut events = 0;
            let mut bytes = 0;
            // Someone waits for this group: it is sealed as soon as nothing more is queued.
            let mut awaited = false;
            let mut next = Some(first);
            // Group commit: take whatever is already waiting, up to the batch limits.
            loop {
                match next.take() {
                    Some(Request::Append { events: e, reply, awaited: a }) => {
                        awaited |= a;
                        events += e.len();
                        bytes += e.iter().map(PreparedEvent::approx_len).sum::<usize>();
                        group.push((e, reply));
                    }
                    Some(Request::Publish { reply }) => {
                        self.flush(&mut group);
                        (events, bytes, awaited) = (0, 0, false);
                        let _ = self.to_syncer.send(SyncMsg::Publish { reply });
                    }
                    Some(Request::Shutdown) => {
                        self.flush(&mut group);
                        let _ = self.to_syncer.send(SyncMsg::Shutdown);
                        return;
                    }
                    None => {}
                }
                if events >= self.options.batch_events_max || bytes >= self.options.batch_bytes_max
                {
                    break;
                }
                let waited = group_started.elapsed();
                let wait = if awaited || group.is_empty() { batch_wait } else { submit_wait };
                let received = if waited < wait {
                    requests.recv_timeout(wait - waited).map_err(|_| ())
                } else {
                    requests.try_recv().map_err(|_| ())
                };
                match received {
                    Ok(r) => {
                        // Keep a request that would overflow the block for the next group.
                        if let Request::Append { events: e, .. } = &r
                            && (events + e.len() > self.options.batch_events_max
                                || bytes + e.iter().map(PreparedEvent::approx_len).sum::<usize>()
                                    > self.options.batch_bytes_max)
                        {
                            self.flush(&mut group);
                            (events, bytes, awaited) = (0, 0, false);
                        }
                        next = Some(r);
                    }
                    Err(_) => break,
                }
            }
            self.flush(&mut group);
        }
        let _ = self.to_syncer.send(SyncMsg::Shutdown);
    }

    fn flush(&mut self, group: &mut Vec<(Vec<PreparedEvent>, Reply)>) {
        if group.is_empty() {
            return;
        }
        let group = std::mem::take(group);
        if let Err(e) = self.shared.check() {
            for (_, reply) in group {
                reply(Err(StoreError::Poisoned(e.to_string())));
            }
            return;
        }
        match self.seal_group(group) {
            Ok(msg) => {
                let _ = self.to_syncer.send(msg);
            }
            Err((why, replies)) => {
                self.shared.poison(why.clone());
                for reply in replies {
                    reply(Err(StoreError::Poisoned(why.clone())));
                }
            }
        }
    }

    /// Assigns seqs, builds and writes one block. On failure, returns why and who to tell.
    fn seal_group(
        &mut self,
        group: Vec<(Vec<PreparedEvent>, Reply)>,
    ) -> Result<SyncMsg, (String, Vec<Reply>)> {
        let now = (self.options.clock)();
        let recorded_at = now.max(self.last_recorded_at);
        if let Err(e) = self.roll_if_needed(recorded_at) {
            return Err((
                format!("cannot start a new segment: {e}"),
                group.into_iter().map(|g| g.1).collect(),
            ));
        }
        let first_seq = self.next_seq;
        let mut seq = first_seq;
        let mut block_first = first_seq;
        let mut blocks = Vec::new();
        let mut entries = Vec::new();
        let mut replies = Vec::with_capacity(group.len());
        self.plain.clear();
        let mut ids = [0u8; 10];
        let active = self.active.as_ref().expect("a segment is active after rolling");
        let block_target = if active.keys.dictionary.is_some() {
            self.options.dictionary_block_plain_bytes_target
        } else {
            self.options.block_plain_bytes_target
        };
        // Compresses and seals the records of seqs `first..end` (in `plain`) as one block.
        let mut seal = |plain: &mut Vec<u8>,
                        compressor: &mut zstd::bulk::Compressor<'static>,
                        first: u64,
                        end: u64| {
            blocks.extend(segment::encode_block(
                &active.keys,
                active.key_version,
                first,
                (end - first) as u32,
                plain,
                compressor,
            ));
            plain.clear();
        };
        for (events, reply) in group {
            let mut receipts = Vec::with_capacity(events.len());
            for ev in events {
                let client_id = ev.client_id();
                if let Some(key) = ev.idempotency_key()
                    && let Some((orig_seq, orig_leaf)) = self.dedup.map.get(&key).copied()
                {
                    receipts.push(Receipt {
                        seq: orig_seq,
                        id: client_id.unwrap_or_default(),
                        leaf_hash: orig_leaf,
                        recorded_at_ms: 0,
                        duplicate: true,
                    });
                    continue;
                }
                let id = match client_id {
                    Some(id) => id,
                    None => {
                        self.id_randomness.fill(&mut ids);
                        uuid::Builder::from_unix_timestamp_millis(recorded_at as u64, &ids)
                            .into_uuid()
                            .to_string()
                    }
                };
                self.stored.clear();
                ev.write_stored(seq, recorded_at, &id, &mut self.stored);
                let salt = active.keys.salts.salt(seq);
                let entry = LeafEntry {
                    recorded_at_ms: recorded_at as u64,
                    commitment: leaf::commitment(&salt, &self.stored),
                }
                .encode();
                let leaf_hash = merkle::leaf_hash(&entry);
                let record_start = self.plain.len();
                segment::push_record(
                    &mut self.plain,
                    recorded_at as u64,
                    ev.idempotency_key().is_some(),
                    &self.stored,
                );
                self.samples.offer(&self.plain[record_start..]);
                if let Some(key) = ev.idempotency_key() {
                    self.dedup.insert(key, seq, leaf_hash);
                }
                entries.push(entry);
                receipts.push(Receipt {
                    seq,
                    id,
                    leaf_hash,
                    recorded_at_ms: recorded_at as u64,
                    duplicate: false,
                });
                seq += 1;
                // A block ends once it is big enough (even within one append call: reading
                // one event back decrypts and decompresses its whole block), and at the
                // group's end. The group is written and synced as a whole either way.
                if self.plain.len() >= block_target {
                    seal(&mut self.plain, &mut self.compressor, block_first, seq);
                    block_first = seq;
                }
            }
            replies.push((reply, receipts));
        }
        if seq > block_first {
            seal(&mut self.plain, &mut self.compressor, block_first, seq);
        }
        let path = if seq > first_seq {
            let block = blocks;
            if let Err(e) = self.io.append(&active.path, &block) {
                return Err((
                    format!("write to {} failed: {e}", active.path),
                    replies.into_iter().map(|r| r.0).collect(),
                ));
            }
            let len = block.len() as u64;
            let path = active.path.clone();
            let active = self.active.as_mut().unwrap();
            active.len += len;
            let half_full = active.len >= self.options.segment_bytes_max / 2;
            let first_dictionary = active.keys.dictionary.is_none()
                && self.samples.bytes() >= dictionary::SAMPLE_BYTES_FIRST_TRAINING;
            if half_full || first_dictionary {
                self.start_training();
            }
            self.next_seq = seq;
            self.last_recorded_at = recorded_at;
            Some(path)
        } else {
            None
        };
        Ok(SyncMsg::Batch { path, entries, end_seq: seq, replies })
    }

    fn roll_if_needed(&mut self, now: UnixMillis) -> std::io::Result<()> {
        // A segment without a dictionary rolls as soon as one is trained.
        self.collect_training();
        let dictionary_ready = self.trained.is_some()
            && self.active.as_ref().is_some_and(|a| a.keys.dictionary.is_none());
        if let Some(a) = &self.active
            && a.len < self.options.segment_bytes_max
            && a.day == day_of(now)
            && !dictionary_ready
        {
            return Ok(());
        }
        // An empty active segment (only a header) is reused rather than rolled.
        if let Some(a) = &self.active
            && a.first_seq == self.next_seq
        {
            return Ok(());
        }
        let dictionary = self.next_dictionary();
        let (version, master) = self.keys.master.current();
        let (_, keys, opening) =
            SegmentHeader::create(version, master, self.next_seq, now, dictionary);
        let compressor = compressor_for(Some(&keys))?;
        // Written whole under a temporary name and renamed: a segment file, once it exists,
        // has its whole opening (a torn dictionary would hide where the blocks begin).
        let path = segment_path(self.next_seq);
        let tmp = format!("{path}.tmp");
        self.io.write_file(&tmp, &opening)?;
        self.io.sync_file(&tmp)?;
        self.io.rename(&tmp, &path)?;
        self.io.sync_dir(SEGMENTS_DIR)?;
        self.compressor = compressor;
        self.samples = Samples::default();
        self.training_failed = false;
        self.active = Some(ActiveSegment {
            first_seq: self.next_seq,
            path,
            day: day_of(now),
            len: opening.len() as u64,
            key_version: version,
            keys,
        });
        Ok(())
    }

    /// Trains the next segment's dictionary on this one's samples, in the background, unless
    /// a training is under way or done.
    fn start_training(&mut self) {
        if self.training.is_some()
            || self.trained.is_some()
            || self.training_failed
            || self.samples.len() < dictionary::SAMPLES_MIN
        {
            return;
        }
        let samples = std::mem::take(&mut self.samples);
        self.training = std::thread::Builder::new()
            .name("auditrail-dictionary".into())
            .spawn(move || samples.train())
            .ok();
    }

    /// The dictionary for a segment about to start: a newly trained one if it is ready, else
    /// the active segment's (a training still running is used at the next roll). A segment
    /// that rolled before it was half full starts a training now.
    fn next_dictionary(&mut self) -> Option<Arc<Dictionary>> {
        self.start_training();
        self.collect_training();
        self.trained.take().or_else(|| self.active.as_ref().and_then(|a| a.keys.dictionary.clone()))
    }

    /// Takes the result of a finished training.
    fn collect_training(&mut self) {
        if !self.training.as_ref().is_some_and(|t| t.is_finished()) {
            return;
        }
        match self.training.take().and_then(|t| t.join().ok().flatten()) {
            Some(raw) => self.trained = Some(Dictionary::new(raw)),
            None => self.training_failed = true,
        }
    }
}

/// A compressor for a segment's blocks: with its dictionary, if `keys` has one.
fn compressor_for(keys: Option<&SegmentKeys>) -> std::io::Result<zstd::bulk::Compressor<'static>> {
    match keys.and_then(|k| k.dictionary.as_ref()) {
        Some(d) => zstd::bulk::Compressor::with_dictionary(segment::ZSTD_LEVEL, d.raw()),
        None => zstd::bulk::Compressor::new(segment::ZSTD_LEVEL),
    }
}

struct Syncer {
    io: Arc<dyn Io>,
    keys: Keys,
    options: Options,
    shared: Arc<Shared>,
    tree: TreeWriter,
    published: u64,
    last_publish: Instant,
    /// Partial tiles written for the current checkpoint; replaced by the next one.
    partials: Vec<TileId>,
}

impl Syncer {
    fn run(mut self, batches: Receiver<SyncMsg>) {
        let interval = Duration::from_millis(self.options.publish_interval_ms);
        loop {
            let wait = interval.saturating_sub(self.last_publish.elapsed());
            let first = match batches.recv_timeout(wait.max(Duration::from_millis(1))) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut msgs: Vec<SyncMsg> = first.into_iter().collect();
            while let Ok(m) = batches.try_recv() {
                msgs.push(m);
            }
            let mut publish_replies = Vec::new();
            let mut shutdown = false;
            let mut batch_msgs = Vec::new();
            for m in msgs {
                match m {
                    SyncMsg::Batch { .. } => batch_msgs.push(m),
                    SyncMsg::Publish { reply } => publish_replies.push(reply),
                    SyncMsg::Shutdown => shutdown = true,
                }
            }
            self.commit(batch_msgs);
            let due = self.last_publish.elapsed() >= interval;
            if (due || !publish_replies.is_empty() || shutdown)
                && self.shared.check().is_ok()
                && let Err(e) = self.publish()
            {
                self.shared.poison(format!("publishing a checkpoint failed: {e}"));
            }
            let result = self.shared.check().map(|_| Stages {
                sequenced: self.shared.sequenced.load(Ordering::SeqCst),
                integrated: self.shared.integrated.load(Ordering::SeqCst),
                published: self.shared.published.load(Ordering::SeqCst),
            });
            for r in publish_replies {
                let _ = r.send(
                    result.as_ref().map(|s| *s).map_err(|e| StoreError::Poisoned(e.to_string())),
                );
            }
            if shutdown {
                return;
            }
        }
    }

    /// One fsync per segment touched covers every batch received: then acknowledge and
    /// integrate. A failed fsync poisons the store; the batches are not acknowledged.
    fn commit(&mut self, batches: Vec<SyncMsg>) {
        if batches.is_empty() {
            return;
        }
        let mut paths: Vec<&str> = Vec::new();
        for b in &batches {
            if let SyncMsg::Batch { path: Some(p), .. } = b
                && paths.last() != Some(&p.as_str())
            {
                paths.push(p);
            }
        }
        let mut failure = self.shared.check().err().map(|e| e.to_string());
        if failure.is_none() {
            for p in &paths {
                if let Err(e) = self.io.sync_file(p) {
                    let why = format!("fsync of {p} failed: {e}");
                    self.shared.poison(why.clone());
                    failure = Some(why);
                    break;
                }
            }
        }
        for b in batches {
            let SyncMsg::Batch { entries, end_seq, replies, .. } = b else { continue };
            if let Some(why) = &failure {
                for (reply, _) in replies {
                    reply(Err(StoreError::Poisoned(why.clone())));
                }
                continue;
            }
            let sequenced = self.shared.sequenced.load(Ordering::SeqCst);
            assert!(end_seq >= sequenced, "sequenced never goes backwards");
            assert_eq!(end_seq - sequenced, entries.len() as u64, "seqs are contiguous");
            self.shared.sequenced.store(end_seq, Ordering::SeqCst);
            for (reply, receipts) in replies {
                reply(Ok(receipts));
            }
            for e in &entries {
                if let Err(err) = self.tree.append(self.io.as_ref(), e) {
                    self.shared.poison(format!("writing tiles failed: {err}"));
                    return;
                }
            }
            assert!(
                self.tree.size() <= self.shared.sequenced.load(Ordering::SeqCst),
                "integrated ≤ sequenced"
            );
            self.shared.integrated.store(self.tree.size(), Ordering::SeqCst);
        }
    }

    fn publish(&mut self) -> Result<(), StoreError> {
        self.last_publish = Instant::now();
        let size = self.tree.size();
        assert!(size >= self.published, "the tree never shrinks");
        if size == self.published && self.io.len(CHECKPOINT_PATH)?.is_some() {
            self.remove_stale_partials(Vec::new());
            return Ok(());
        }
        let partials = self.tree.write_partials(self.io.as_ref())?;
        // One syncfs makes every tile and bundle written since the last checkpoint durable
        // before a checkpoint names them.
        self.io.sync_all()?;
        let cp = Checkpoint {
            origin: self.keys.signer.name().to_string(),
            size,
            root: self.tree.root(),
            extensions: vec![],
        };
        let signed = self.keys.signer.sign(&cp.to_text());
        write_checkpoint(self.io.as_ref(), &signed)?;
        self.published = size;
        // Proofs are answered for this size as soon as the checkpoint file names it.
        assert!(size <= self.shared.sequenced.load(Ordering::SeqCst), "published ≤ sequenced");
        self.shared.published.store(size, Ordering::SeqCst);
        self.remove_stale_partials(partials);
        Ok(())
    }
}

impl Syncer {
    /// Deletes partial tiles that the published checkpoint does not need (tlog-tiles allows it
    /// once the full tile or a wider partial exists). Only called once the checkpoint that
    /// supersedes them is durable. Failures only leave a stray file behind.
    fn remove_stale_partials(&mut self, written: Vec<TileId>) {
        let wanted: Vec<TileId> = auditrail_core::tile::tiles_for_size(self.published)
            .into_iter()
            .filter(|t| !t.is_full())
            .collect();
        let mut keep = Vec::new();
        for t in std::mem::take(&mut self.partials).into_iter().chain(written) {
            if wanted.contains(&t) {
                if !keep.contains(&t) {
                    keep.push(t);
                }
            } else {
                let _ = self.io.remove(&crate::tree::tile_path(&t));
            }
        }
        self.partials = keep;
    }
}

/// Appends a signed checkpoint to the history, then atomically replaces `log/checkpoint`.
fn write_checkpoint(io: &dyn Io, signed: &str) -> Result<(), StoreError> {
    io.append(HISTORY_PATH, &history::frame(signed.as_bytes()))?;
    io.sync_file(HISTORY_PATH)?;
    replace_checkpoint_file(io, signed)
}

/// Atomically and durably makes `log/checkpoint` hold `signed`.
fn replace_checkpoint_file(io: &dyn Io, signed: &str) -> Result<(), StoreError> {
    let tmp = "log/checkpoint.tmp";
    io.write_file(tmp, signed.as_bytes())?;
    io.sync_file(tmp)?;
    io.rename(tmp, CHECKPOINT_PATH)?;
    io.sync_dir(LOG_DIR)?;
    Ok(())
}

/// The checkpoint history: every checkpoint the log has signed, framed as
/// `u32 length ‖ note ‖ u32 CRC-32C(note) ‖ u32 length` so the newest is read from the end.
pub mod history {
    pub const FRAME_OVERHEAD: usize = 12;

    pub fn frame(note: &[u8]) -> Vec<u8> {
        let len = (note.len() as u32).to_be_bytes();
        let mut out = Vec::with_capacity(note.len() + FRAME_OVERHEAD);
        out.extend_from_slice(&len);
        out.extend_from_slice(note);
        out.extend_from_slice(&crc32c::crc32c(note).to_be_bytes());
        out.extend_from_slice(&len);
        out
    }

    /// Parses every whole record; returns them with the byte offset where parsing stopped
    /// (the end of the last whole record).
    pub fn parse(bytes: &[u8]) -> (Vec<(usize, &[u8])>, usize) {
        let mut out = Vec::new();
        let mut off = 0;
        while off + FRAME_OVERHEAD <= bytes.len() {
            let len = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
            let end = off + 4 + len + 8;
            if len > auditrail_core::note::NOTE_BYTES_MAX || end > bytes.len() {
                break;
            }
            let note = &bytes[off + 4..off + 4 + len];
            let crc = &bytes[off + 4 + len..off + 8 + len];
            let trailer = &bytes[off + 8 + len..end];
            if crc32c::crc32c(note).to_be_bytes() != crc || trailer != &bytes[off..off + 4] {
                break;
            }
            out.push((off, note));
            off = end;
        }
        (out, off)
    }
}

struct Recovered {
    next_seq: u64,
    last_recorded_at: UnixMillis,
    active: Option<ActiveSegment>,
    dedup: Dedup,
    tree: TreeWriter,
    published: u64,
    report: RecoveryReport,
}

/// The latest checkpoint we signed, from `log/checkpoint` or the history, whichever is newer.
fn latest_checkpoint(
    io: &dyn Io,
    keys: &Keys,
    repair: bool,
) -> Result<Option<(Checkpoint, String)>, StoreError> {
    let verifier = keys.signer.verifier();
    let open = |bytes: &[u8], location: &str| -> Result<(Checkpoint, String), StoreError> {
        let s =
            std::str::from_utf8(bytes).map_err(|_| StoreError::corrupted(location, "not UTF-8"))?;
        let text = note::open(s, std::slice::from_ref(&verifier))
            .map_err(|e| StoreError::corrupted(location, e))?;
        let cp = Checkpoint::parse(text).map_err(|e| StoreError::corrupted(location, e))?;
        if cp.origin != keys.signer.name() {
            return Err(StoreError::corrupted(
                location,
                "checkpoint origin differs from the log's key name",
            ));
        }
        Ok((cp, s.to_string()))
    };
    let mut best: Option<(Checkpoint, String)> = None;
    match io.read(CHECKPOINT_PATH) {
        Ok(b) => best = Some(open(&b, CHECKPOINT_PATH)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    match io.read(HISTORY_PATH) {
        Ok(b) => {
            let (records, end) = history::parse(&b);
            if end < b.len() && repair {
                // A torn append of the newest record: it was never used, so it can go.
                io.truncate(HISTORY_PATH, end as u64)?;
            }
            if let Some((off, note)) = records.last() {
                let c = open(note, &format!("{HISTORY_PATH} offset {off}"))?;
                if best.as_ref().is_none_or(|b| c.0.size > b.0.size) {
                    best = Some(c);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    Ok(best)
}

fn recover(io: &dyn Io, keys: &Keys, options: &Options) -> Result<Recovered, StoreError> {
    let mut report = RecoveryReport::default();
    let checkpoint = latest_checkpoint(io, keys, true)?;
    // A crash between the history append and the rename leaves `log/checkpoint` behind the
    // history; bring it up to date now, as nothing may be published to wait for.
    if let Some((_, signed)) = &checkpoint {
        match io.read(CHECKPOINT_PATH) {
            Ok(current) if current == signed.as_bytes() => {}
            Ok(_) => replace_checkpoint_file(io, signed)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                replace_checkpoint_file(io, signed)?
            }
            Err(e) => return Err(e.into()),
        }
    }
    let published = checkpoint.as_ref().map_or(0, |c| c.0.size);

    // 1. Segments. A roll that crashed before its rename leaves a temporary file: never part
    // of the log.
    for name in io.list(SEGMENTS_DIR)? {
        if name.ends_with(".seg.tmp") {
            io.remove(&format!("{SEGMENTS_DIR}/{name}"))?;
        }
    }
    // Sealed ones are trusted to their successor's first seq (the audit checks
    // their insides); the last one is walked block by block to find the durable end.
    let mut segments = list_segments(io)?;
    let mut next_seq = 0u64;
    let mut last_recorded_at: UnixMillis = 0;
    let mut active = None;
    while let Some(&last) = segments.last() {
        let path = segment_path(last);
        let len = io.len(&path)?.unwrap_or(0);
        let header_ok = io
            .read_at(&path, 0, segment::SEGMENT_HEADER_BYTES)
            .ok()
            .and_then(|b| SegmentHeader::decode(&b).ok())
            .is_some();
        if !header_ok && len <= segment::SEGMENT_HEADER_BYTES as u64 && last >= published {
            // A roll that crashed before its header was durable: nothing was ever written to it.
            io.remove(&path)?;
            io.sync_dir(SEGMENTS_DIR)?;
            report.removed_empty_segment = true;
            segments.pop();
            continue;
        }
        break;
    }
    if let Some(&last) = segments.last() {
        let seg = load_segment(io, &keys.master, last)?;
        let (blocks, end) = seg.blocks();
        let mut valid_len = seg.blocks_start;
        let mut end_seq = last;
        let mut broken = match end {
            reader::BlocksEnd::Clean => None,
            reader::BlocksEnd::Broken { offset, detail } => Some((offset, detail)),
        };
        for b in &blocks {
            // Bodies past the checkpoint are checked now: they are about to be re-integrated.
            if b.header.end_seq() > published
                && let Err(e) = segment::decode_block_body(&b.header, b.body, &seg.keys)
            {
                broken = Some((b.offset, e.to_string()));
                break;
            }
            valid_len = b.offset + b.header.total_len() as usize;
            end_seq = b.header.end_seq();
        }
        if let Some((offset, detail)) = broken {
            let location = format!("{} offset {offset}", seg.path);
            if seg.valid_block_after(offset, end_seq) {
                return Err(StoreError::corrupted(
                    location,
                    format!("{detail}, and valid blocks follow it"),
                ));
            }
            if end_seq < published {
                return Err(StoreError::corrupted(
                    location,
                    format!(
                        "{detail}; the segment ends at seq {end_seq} but checkpoint {published} covers more"
                    ),
                ));
            }
            // A torn tail: written but never acknowledged, since acknowledging follows fsync.
            report.truncated_bytes = (seg.bytes.len() - valid_len) as u64;
            io.truncate(&seg.path, valid_len as u64)?;
        }
        next_seq = end_seq;
        let header = seg.header.clone();
        active = Some(ActiveSegment {
            first_seq: last,
            path: seg.path.clone(),
            day: day_of(header.created_ms),
            len: valid_len as u64,
            key_version: header.key_version,
            keys: seg.keys.clone(),
        });
    }
    if next_seq < published {
        return Err(StoreError::corrupted(
            SEGMENTS_DIR,
            format!(
                "the segments hold {next_seq} events but the published checkpoint covers {published}"
            ),
        ));
    }

    // 2. The tree's right edge at the checkpoint, checked against the signed root.
    let mut tree = if published == 0 {
        TreeWriter::empty()
    } else {
        TreeWriter::restore(io, published).map_err(|e| StoreError::corrupted(LOG_DIR, e))?
    };
    if let Some((cp, _)) = &checkpoint
        && tree.root() != cp.root
    {
        return Err(StoreError::corrupted(
            LOG_DIR,
            format!(
                "tiles do not match the signed checkpoint at size {}; run `auditrail verify`",
                cp.size
            ),
        ));
    }

    // 3. Re-integrate leaves past the checkpoint and rebuild the idempotency window, both from
    // the records themselves.
    let mut dedup = Dedup::new(options.idempotency_window_events);
    // At least the last record is read, for the newest `recorded_at` (which never decreases).
    let window_from =
        next_seq.saturating_sub(options.idempotency_window_events.max(1)).min(published);
    let mut reintegrated = 0;
    reader::for_each_record(io, &keys.master, window_from, next_seq, |seq, r, seg_keys| {
        let salt = seg_keys.salts.salt(seq);
        let entry = LeafEntry {
            recorded_at_ms: r.recorded_at_ms,
            commitment: leaf::commitment(&salt, &r.canonical),
        }
        .encode();
        let leaf_hash = merkle::leaf_hash(&entry);
        last_recorded_at = last_recorded_at.max(r.recorded_at_ms as i64);
        if seq >= published {
            assert_eq!(seq, tree.size(), "re-integration is contiguous");
            tree.append(io, &entry)?;
            reintegrated += 1;
        }
        if r.client_id && seq + options.idempotency_window_events >= next_seq {
            let v: serde_json::Value = serde_json::from_slice(&r.canonical)
                .map_err(|e| StoreError::corrupted(format!("seq {seq}"), e))?;
            let id = v.get("id").and_then(|i| i.as_str()).unwrap_or_default();
            let system = v
                .get("source")
                .and_then(|s| s.get("system"))
                .and_then(|s| s.as_str())
                .unwrap_or("");
            dedup.insert(auditrail_core::event::idempotency_key(system, id), seq, leaf_hash);
        }
        Ok(())
    })?;
    report.reintegrated = reintegrated;
    assert_eq!(tree.size(), next_seq, "every sequenced event is integrated after recovery");
    Ok(Recovered { next_seq, last_recorded_at, active, dedup, tree, published, report })
}

/// The signed checkpoint of tree size `size` from the history, or the newest one.
pub fn find_checkpoint(io: &dyn Io, keys: &Keys, size: Option<u64>) -> Result<String, StoreError> {
    let Some(size) = size else {
        return latest_checkpoint(io, keys, false)?.map(|c| c.1).ok_or_else(|| {
            StoreError::InvalidInput("no checkpoint has been published yet".into())
        });
    };
    let bytes = io.read(HISTORY_PATH)?;
    let (records, _) = history::parse(&bytes);
    let verifier = keys.signer.verifier();
    for (_, n) in records.iter().rev() {
        let Ok(s) = std::str::from_utf8(n) else { continue };
        if let Ok(text) = note::open(s, std::slice::from_ref(&verifier))
            && Checkpoint::parse(text).is_ok_and(|c| c.size == size)
        {
            return Ok(s.to_string());
        }
    }
    Err(StoreError::InvalidInput(format!("no checkpoint of tree size {size} in the history")))
}
