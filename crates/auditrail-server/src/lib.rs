//! auditrail's HTTP service. [`app`] builds the router over an [`AppState`] (tests drive it
//! directly); [`run`] opens the data directory, starts the index follower and serves until a
//! shutdown signal, then flushes the index and publishes a final checkpoint.
//!
//! Async stays at this edge: the store and the index are synchronous and are called from
//! blocking tasks.

pub mod alerts;
pub mod auth;
pub mod backup;
pub mod config;
pub mod error;
pub mod evidence;
pub mod export;
pub mod export_format;
pub mod fhir_api;
pub mod ingest;
pub mod integrity;
pub mod logapi;
pub mod openapi;
pub mod query;
pub mod reports;
pub mod retention;
pub mod security;
pub mod tls;

use auditrail_index::{Follower, Index, IndexOptions};
use auditrail_store::Store;
use auditrail_store::tail::{BlockEvents, BlockLocation, BlockReader};
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{MethodRouter, any, get, post};
pub use config::Config;
pub use error::ApiError;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
pub use tls::{ClientCert, Peer, peer};

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Metrics {
    pub events_ingested: AtomicU64,
    pub events_duplicate: AtomicU64,
    pub requests_rejected: AtomicU64,
    pub requests_overloaded: AtomicU64,
    pub searches: AtomicU64,
}

/// Cold blocks below which [`BlockCache::warm`] decodes them on the caller's thread alone.
const WARM_IN_PARALLEL_MIN: usize = 8;

/// Cold blocks beyond which a read that must not wait (an async thread's) is left to a thread
/// that may: decoding a block takes about 5 µs, so this bounds such a read to a few tenths of
/// a millisecond.
const IN_MEMORY_COLD_BLOCKS_MAX: usize = 64;

/// Decoded log blocks, so a page of results from the same few blocks decrypts each once.
pub struct BlockCache {
    cached: Arc<CachedBlocks>,
    /// A thread that helps [`BlockCache::warm`]: it lives as long as the cache, because
    /// starting one per page, and waiting for the scheduler to run it, made the slowest
    /// lookups slower.
    helper: Mutex<mpsc::Sender<Arc<WarmJob>>>,
}

struct CachedBlocks {
    reader: BlockReader,
    inner: Mutex<CacheInner>,
    bytes_max: usize,
}

/// Cold blocks to decode, taken one at a time by the caller of `warm` and the helper alike.
struct WarmJob {
    blocks: Vec<BlockLocation>,
    next: AtomicUsize,
    /// Set at the first block found not in memory (the page cache), when the blocks not
    /// taken yet are prefetched: from then on, reads wait for the disk. So a page whose
    /// blocks were evicted waits for the disk about once, not once per block.
    prefetched: AtomicBool,
}

impl WarmJob {
    fn new(blocks: Vec<BlockLocation>) -> WarmJob {
        WarmJob { blocks, next: AtomicUsize::new(0), prefetched: AtomicBool::new(false) }
    }

    /// Decodes blocks until none is left to take. With `Disk::Wait`, a block not in memory is
    /// read from the disk; with `Disk::DoNotWait`, the first such block stops this thread's
    /// part and the answer is `false` (another thread may still read it).
    fn run(&self, cached: &CachedBlocks, disk: Disk) -> bool {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(at) = self.blocks.get(i) else { return true };
            if disk == Disk::DoNotWait || !self.prefetched.load(Ordering::Relaxed) {
                match cached.get_if_resident(at) {
                    Ok(Some(_)) => continue,
                    Ok(None) => {
                        if !self.prefetched.swap(true, Ordering::Relaxed) {
                            cached.reader.prefetch(&self.blocks[i..]);
                        }
                        if disk == Disk::DoNotWait {
                            return false;
                        }
                    }
                    // Left to the caller's own read, which reports it.
                    Err(_) => continue,
                }
            }
            drop(cached.get(at));
        }
    }
}

/// Whether a read may wait for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disk {
    Wait,
    DoNotWait,
}

#[derive(Default)]
struct CacheInner {
    /// Keyed by (segment, offset): FxHash, since every page of hits looks up ~50 keys here
    /// under one mutex and SipHash's resistance to chosen keys buys nothing for them.
    map: rustc_hash::FxHashMap<(u64, u64), Arc<BlockEvents>>,
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

impl BlockCache {
    pub fn new(reader: BlockReader, bytes_max: usize) -> BlockCache {
        let cached =
            Arc::new(CachedBlocks { reader, inner: Mutex::new(CacheInner::default()), bytes_max });
        let (helper, jobs) = mpsc::channel::<Arc<WarmJob>>();
        let helped = cached.clone();
        // Ends when the cache (the sender) is dropped. Without the thread, `warm` does all
        // the work itself.
        let _ = std::thread::Builder::new().name("auditrail-block-warm".into()).spawn(move || {
            while let Ok(job) = jobs.recv() {
                job.run(&helped, Disk::Wait);
            }
        });
        BlockCache { cached, helper: Mutex::new(helper) }
    }

    pub fn get(&self, at: &BlockLocation) -> Result<Arc<BlockEvents>, auditrail_store::StoreError> {
        self.cached.get(at)
    }

    /// The stored (canonical JSON) bytes of the events `seqs`, which `index` locates: each
    /// block is located once and the cold ones are decoded two at a time ([`BlockCache::warm`]).
    pub fn read_stored(&self, index: &Index, seqs: &[u64]) -> Result<StoredEvents, ApiError> {
        let read = self.read_stored_from(index, seqs, Disk::Wait)?;
        Ok(read.expect("a read that may wait always reads"))
    }

    /// [`BlockCache::read_stored`] without waiting for the disk: `None` when a block is
    /// neither cached nor in the page cache, or more than [`IN_MEMORY_COLD_BLOCKS_MAX`] need
    /// decoding. An async handler answers from memory on its own thread and hands only the
    /// other pages to a blocking one.
    pub fn read_stored_in_memory(
        &self,
        index: &Index,
        seqs: &[u64],
    ) -> Result<Option<StoredEvents>, ApiError> {
        self.read_stored_from(index, seqs, Disk::DoNotWait)
    }

    fn read_stored_from(
        &self,
        index: &Index,
        seqs: &[u64],
        disk: Disk,
    ) -> Result<Option<StoredEvents>, ApiError> {
        let locations = index.blocks_for(seqs);
        if !self.warm(locations.iter().flatten().copied(), disk) {
            return Ok(None);
        }
        let mut blocks = Vec::with_capacity(seqs.len());
        for (&seq, at) in seqs.iter().zip(locations) {
            let at = at.ok_or_else(|| {
                ApiError::internal(format!("seq {seq} has no block in the index"))
            })?;
            let block = match disk {
                Disk::Wait => self.get(&at)?,
                Disk::DoNotWait => match self.cached.get_if_resident(&at)? {
                    Some(block) => block,
                    None => return Ok(None),
                },
            };
            if block.get(seq).is_none() {
                return Err(ApiError::internal(format!("block at {at:?} lacks seq {seq}")));
            }
            blocks.push((seq, block));
        }
        Ok(Some(StoredEvents { blocks }))
    }

    /// Decodes the blocks not cached yet among `blocks` on two threads, so a page of results
    /// spread over the log is decrypted and decompressed in about half the time. A few cold
    /// blocks are decoded by the caller alone (handing them over costs more than they do),
    /// in the same way: without waiting for the disk until the first one not in memory,
    /// which prefetches the rest ([`WarmJob`]). A single cold block is left to the caller's
    /// own read. Never waits for the helper: a block it is still decoding when the caller is
    /// done is decoded again by the caller's own read, which also reports any error.
    /// `false` when `disk` is `DoNotWait` and the caller met a block not in memory.
    fn warm(&self, blocks: impl IntoIterator<Item = BlockLocation>, disk: Disk) -> bool {
        let mut cold: Vec<BlockLocation> = Vec::new();
        {
            let inner = self.cached.inner.lock().unwrap_or_else(|e| e.into_inner());
            for at in blocks {
                let key = (at.segment, at.offset);
                if !inner.map.contains_key(&key)
                    && !cold.iter().any(|c| (c.segment, c.offset) == key)
                {
                    cold.push(at);
                }
            }
        }
        if disk == Disk::DoNotWait && cold.len() > IN_MEMORY_COLD_BLOCKS_MAX {
            return false;
        }
        if cold.len() < 2 {
            return true;
        }
        if cold.len() < WARM_IN_PARALLEL_MIN {
            return WarmJob::new(cold).run(&self.cached, disk);
        }
        let job = Arc::new(WarmJob::new(cold));
        let _ = self.helper.lock().unwrap_or_else(|e| e.into_inner()).send(job.clone());
        job.run(&self.cached, disk)
    }

    /// The commitment salt of event `seq`, stored in the block at `at`.
    pub fn salt(
        &self,
        at: &BlockLocation,
        seq: u64,
    ) -> Result<auditrail_core::leaf::Salt, auditrail_store::StoreError> {
        self.cached.reader.salt(at, seq)
    }

    /// Drops every decoded block (the segments' keys stay): for benchmarks of cold reads.
    pub fn clear(&self) {
        let mut inner = self.cached.inner.lock().unwrap_or_else(|e| e.into_inner());
        *inner = CacheInner::default();
    }

    /// Drops everything cached of a segment retention purged: its blocks and its key.
    pub fn forget_segment(&self, segment: u64) {
        let mut inner = self.cached.inner.lock().unwrap_or_else(|e| e.into_inner());
        let CacheInner { map, order, bytes } = &mut *inner;
        order.retain(|key| {
            if key.0 != segment {
                return true;
            }
            if let Some(b) = map.remove(key) {
                *bytes -= b.bytes();
            }
            false
        });
        self.cached.reader.forget(segment);
    }
}

impl CachedBlocks {
    fn get(&self, at: &BlockLocation) -> Result<Arc<BlockEvents>, auditrail_store::StoreError> {
        let key = (at.segment, at.offset);
        if let Some(b) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.get(&key) {
            return Ok(b.clone());
        }
        Ok(self.keep(key, Arc::new(self.reader.read(at)?)))
    }

    /// The block at `at`, cached, decoding it if its bytes are in memory; `None` when
    /// reading them would wait for the disk.
    fn get_if_resident(
        &self,
        at: &BlockLocation,
    ) -> Result<Option<Arc<BlockEvents>>, auditrail_store::StoreError> {
        let key = (at.segment, at.offset);
        if let Some(b) = self.inner.lock().unwrap_or_else(|e| e.into_inner()).map.get(&key) {
            return Ok(Some(b.clone()));
        }
        let Some(block) = self.reader.read_if_resident(at)? else { return Ok(None) };
        Ok(Some(self.keep(key, Arc::new(block))))
    }

    /// Caches a decoded block (the one cached already, if another thread was first).
    fn keep(&self, key: (u64, u64), block: Arc<BlockEvents>) -> Arc<BlockEvents> {
        let mut evicted = Vec::new();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = inner.map.get(&key) {
            // The helper and the caller of `warm` both read it: keep one, counted once.
            return b.clone();
        }
        inner.bytes += block.bytes();
        inner.map.insert(key, block.clone());
        inner.order.push_back(key);
        while inner.bytes > self.bytes_max {
            let Some(old) = inner.order.pop_front() else { break };
            if let Some(b) = inner.map.remove(&old) {
                inner.bytes -= b.bytes();
                evicted.push(b);
            }
        }
        drop(inner);
        // Freed after the lock: the other reader of the page need not wait for it.
        drop(evicted);
        block
    }
}

/// Events read back from the log by [`AppState::read_stored`], in the order asked for.
pub struct StoredEvents {
    blocks: Vec<(u64, Arc<BlockEvents>)>,
}

impl StoredEvents {
    /// The stored bytes of each event.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.blocks.iter().map(|(seq, b)| b.get(*seq).expect("checked when read"))
    }
}

pub struct AppState {
    pub config: Config,
    pub store: Arc<Store>,
    pub index: Arc<Index>,
    pub blocks: BlockCache,
    /// Bytes of request bodies being ingested: the byte budget in front of the store's queue.
    pub ingest_budget: Arc<tokio::sync::Semaphore>,
    pub metrics: Metrics,
    /// The index has caught up with the log once since start.
    pub ready: AtomicBool,
    /// The forwarders (Elasticsearch, syslog) following the log.
    pub forwarding: auditrail_forward::Forwarding,
    /// Scheduled backup's progress, when `archive_url` is set.
    pub backup: Option<Arc<backup::BackupMonitor>>,
    /// Masks secrets and identifiers in every event before it is stored (docs/privacy.md).
    pub privacy: auditrail_core::privacy::Filter,
    /// Accounts, sessions and the repository's record of its own use.
    pub auth: auth::Auth,
    /// Alert rules, alerts and their deliveries.
    pub alerts: alerts::Alerts,
    /// Verifications of the log, scheduled and on request.
    pub integrity: Arc<integrity::Integrity>,
    pub login_limiter: auth::http::RateLimiter,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The stored event `seq` as JSON, read back from the log.
    pub fn read_event(&self, seq: u64) -> Result<serde_json::Value, ApiError> {
        self.with_stored(seq, |bytes| serde_json::from_slice(bytes).map_err(ApiError::internal))
    }

    /// The stored (canonical JSON) bytes of the events `seqs`, read back from the log
    /// ([`BlockCache::read_stored`]).
    pub fn read_stored(&self, seqs: &[u64]) -> Result<StoredEvents, ApiError> {
        self.blocks.read_stored(&self.index, seqs)
    }

    /// Calls `f` with the stored (canonical JSON) bytes of event `seq`, read back from the log.
    pub fn with_stored<T>(
        &self,
        seq: u64,
        f: impl FnOnce(&[u8]) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let stored = self.read_stored(&[seq])?;
        f(stored.iter().next().expect("one event asked for, one read"))
    }
}

/// The wall clock, Unix milliseconds.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

static STARTED_MS: std::sync::OnceLock<i64> = std::sync::OnceLock::new();

/// When this process started serving (its first `start`).
pub fn started_ms() -> i64 {
    *STARTED_MS.get_or_init(now_ms)
}

/// Runs blocking work (the store, the index, the log) off the async workers.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await.map_err(ApiError::internal)?
}

/// Every route [`app`] serves, as one table: the OpenAPI tests check `docs/openapi.json`
/// against exactly these paths and the methods each one answers, so a route cannot be added
/// without documenting it.
pub(crate) fn routes() -> Vec<(&'static str, MethodRouter<SharedState>)> {
    vec![
        ("/healthz", get(healthz)),
        ("/readyz", get(readyz)),
        ("/metrics", get(metrics)),
        ("/api/v1/openapi.json", get(openapi::serve)),
        ("/api/v1/events", post(ingest::post_events).get(query::search)),
        ("/api/v1/events/bulk", post(ingest::post_bulk)),
        ("/api/v1/events/stats", get(query::stats)),
        ("/api/v1/events/export", get(export::export).post(export::export_to_storage)),
        ("/api/v1/events/evidence", get(evidence::evidence)),
        ("/api/v1/events/{id}", get(query::get_event)),
        ("/api/v1/reports/patient-access", get(reports::patient_access)),
        ("/api/v1/reports/user-activity", get(reports::user_activity)),
        ("/api/v1/reports/failed-access", get(reports::failed_access)),
        ("/api/v1/reports/security-changes", get(reports::security_changes)),
        ("/api/v1/reports/alerts", get(reports::alerts)),
        ("/api/v1/log/proof/inclusion", get(logapi::inclusion)),
        ("/api/v1/log/proof/consistency", get(logapi::consistency)),
        ("/api/v1/security/status", get(security::status)),
        ("/api/v1/security/audit-log/integrity", get(integrity::get_state).post(integrity::start)),
        ("/api/v1/security/audit-log/integrity/jobs/{id}", get(integrity::get_job)),
        ("/api/v1/security/alerts", get(alerts::http::list)),
        ("/api/v1/security/alerts/{id}", get(alerts::http::get_one)),
        ("/api/v1/security/alerts/{id}/acknowledge", post(alerts::http::acknowledge)),
        ("/api/v1/security/alerts/{id}/resolve", post(alerts::http::resolve)),
        ("/api/v1/security/alert-rules", get(alerts::http::list_rules)),
        (
            "/api/v1/security/alert-rules/{name}",
            axum::routing::put(alerts::http::put_rule).delete(alerts::http::delete_rule),
        ),
        ("/fhir", post(fhir_api::bundle)),
        ("/fhir/metadata", get(fhir_api::metadata)),
        (
            "/fhir/AuditEvent",
            post(fhir_api::create)
                .get(fhir_api::search)
                .put(fhir_api::not_allowed)
                .patch(fhir_api::not_allowed)
                .delete(fhir_api::not_allowed),
        ),
        (
            "/fhir/AuditEvent/{id}",
            get(fhir_api::read)
                .post(fhir_api::not_allowed)
                .put(fhir_api::not_allowed)
                .patch(fhir_api::not_allowed)
                .delete(fhir_api::not_allowed),
        ),
        ("/fhir/{*rest}", any(fhir_api::unknown_type)),
        ("/api/v1/retention", get(retention::get_state)),
        ("/api/v1/retention/purge", post(retention::post_purge)),
        ("/api/v1/retention/holds", post(retention::create_hold)),
        ("/api/v1/retention/holds/{id}", axum::routing::delete(retention::release_hold)),
        ("/api/v1/auth/login", post(auth::http::login)),
        ("/api/v1/auth/refresh", post(auth::http::refresh)),
        ("/api/v1/auth/logout", post(auth::http::logout)),
        ("/api/v1/auth/me", get(auth::http::me)),
        ("/api/v1/auth/password", post(auth::http::change_password)),
        ("/api/v1/auth/mfa/totp", post(auth::http::totp_begin).delete(auth::http::totp_remove)),
        ("/api/v1/auth/mfa/totp/confirm", post(auth::http::totp_confirm)),
        ("/api/v1/auth/break-glass", post(auth::http::break_glass)),
        ("/api/v1/users", get(auth::http::list_users).post(auth::http::create_user)),
        ("/api/v1/users/{id}", get(auth::http::get_user).patch(auth::http::update_user)),
        ("/api/v1/users/{id}/password-reset", post(auth::http::reset_password)),
        ("/api/v1/users/{id}/mfa-reset", post(auth::http::reset_mfa)),
        ("/api/v1/users/{id}/unlock", post(auth::http::unlock)),
        ("/api/v1/sessions", get(auth::http::list_sessions)),
        ("/api/v1/sessions/{id}", axum::routing::delete(auth::http::revoke_session)),
        ("/api/v1/roles", get(auth::http::list_roles)),
        (
            "/api/v1/roles/{name}",
            axum::routing::put(auth::http::put_role).delete(auth::http::delete_role),
        ),
        ("/api/v1/api-keys", get(auth::http::list_keys).post(auth::http::create_key)),
        ("/api/v1/api-keys/{id}", axum::routing::delete(auth::http::revoke_key)),
        ("/api/v1/projects", get(auth::http::list_projects).post(auth::http::create_project)),
        (
            "/api/v1/settings/governance",
            get(auth::http::get_governance).put(auth::http::put_governance),
        ),
        ("/log/checkpoint", get(logapi::checkpoint)),
        ("/log/tile/{*path}", get(logapi::tile)),
    ]
}

pub fn app(state: SharedState) -> Router {
    let tls = state.config.tls_enabled();
    routes()
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| router.route(path, methods))
        // Every matched route passes the access rules; unmatched paths fall through to 404.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::http::authorize))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::map_response(
            move |res| async move { tls::security_headers(res, tls) },
        ))
        .layer(axum::middleware::from_fn(time_requests))
        .with_state(state)
}

/// Adds `Server-Timing: total;dur=<ms>`: from the request reaching the router (before access
/// control) to the response head, so a client can tell the server's time from the network's.
async fn time_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let mut response = next.run(request).await;
    let total = format!("total;dur={:.3}", started.elapsed().as_secs_f64() * 1e3);
    if let Ok(value) = header::HeaderValue::from_str(&total) {
        response.headers_mut().append(query::SERVER_TIMING, value);
    }
    response
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; see /api/v1/openapi.json")
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    summary = "Liveness",
    description = "Answers while the process serves HTTP; says nothing about the log or the index.",
    responses((status = 200, description = "The process is alive: `ok` and a newline.", body = String, content_type = "text/plain"))
)]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    summary = "Readiness",
    description = "Ready once the search index has caught up with the log since start.",
    responses(
        (status = 200, description = "Ready: `ready` and a newline.", body = String, content_type = "text/plain"),
        (status = 503, description = "The index is still catching up: `catching up` and a newline.", body = String, content_type = "text/plain"),
    )
)]
async fn readyz(State(s): State<SharedState>) -> axum::response::Response {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, [(header::RETRY_AFTER, "1")], "catching up\n")
            .into_response()
    }
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus metrics",
    description = "The log's stages, the index's progress and request counters in the Prometheus text format (docs/operations.md lists them).",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4.", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(s): State<SharedState>) -> impl IntoResponse {
    let m = &s.metrics;
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let purged = s.store.purged();
    // Read before the stages: once it is zero, they count every trace submitted before.
    let submitted_pending = s.store.submitted_pending();
    let stages = s.store.stages();
    let series: [(&str, &str, &str, u64); 14] = [
        (
            "auditrail_log_submitted_pending",
            "gauge",
            "Read traces queued for the log and not yet durable.",
            submitted_pending,
        ),
        ("auditrail_log_sequenced", "gauge", "Events durable in the log.", stages.sequenced),
        ("auditrail_log_integrated", "gauge", "Events in the Merkle tree.", stages.integrated),
        (
            "auditrail_log_published",
            "gauge",
            "Tree size of the newest checkpoint.",
            stages.published,
        ),
        ("auditrail_index_indexed", "gauge", "Events searchable.", s.index.indexed_through()),
        (
            "auditrail_index_persisted",
            "gauge",
            "Events in index files.",
            s.index.persisted_through(),
        ),
        (
            "auditrail_index_lag_events",
            "gauge",
            "Durable events not yet searchable.",
            stages.sequenced.saturating_sub(s.index.indexed_through()),
        ),
        (
            "auditrail_events_ingested_total",
            "counter",
            "Events appended.",
            load(&m.events_ingested),
        ),
        (
            "auditrail_events_duplicate_total",
            "counter",
            "Events that repeated a known id.",
            load(&m.events_duplicate),
        ),
        (
            "auditrail_requests_rejected_total",
            "counter",
            "Ingest requests answered 4xx.",
            load(&m.requests_rejected),
        ),
        (
            "auditrail_requests_overloaded_total",
            "counter",
            "Requests answered 503 for load.",
            load(&m.requests_overloaded),
        ),
        ("auditrail_searches_total", "counter", "Searches served.", load(&m.searches)),
        (
            "auditrail_retention_purged_events",
            "gauge",
            "Events retention has purged.",
            purged.events(),
        ),
        (
            "auditrail_retention_purged_segments",
            "gauge",
            "Log segments retention has purged.",
            purged.segments().len() as u64,
        ),
    ];
    let backup = backup_status(&s);
    let backup_series: [(&str, &str, &str, u64); 6] = [
        (
            "auditrail_backup_enabled",
            "gauge",
            "1 when scheduled backup is configured.",
            u64::from(backup.enabled),
        ),
        (
            "auditrail_backup_archived_tree_size",
            "gauge",
            "Tree size of the newest backup manifest.",
            backup.archived_tree_size,
        ),
        (
            "auditrail_backup_lag_events",
            "gauge",
            "Published events not yet in a backup.",
            backup.lag_events,
        ),
        (
            "auditrail_backup_lag_seconds",
            "gauge",
            "Seconds since the last successful backup while events wait (0 when up to date).",
            backup.lag_seconds,
        ),
        (
            "auditrail_backup_last_success_timestamp_seconds",
            "gauge",
            "Unix time of the last successful backup (0: none yet).",
            s.backup.as_ref().and_then(|b| b.last_success_ms()).map_or(0, |ms| (ms / 1000) as u64),
        ),
        (
            "auditrail_backup_consecutive_failures",
            "gauge",
            "Backup runs failed since the last success.",
            backup.consecutive_failures,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in series.into_iter().chain(backup_series) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
    }
    s.forwarding.prometheus(&mut out);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

pub(crate) fn backup_status(s: &AppState) -> backup::BackupStatus {
    let published = s.store.stages().published;
    match &s.backup {
        Some(monitor) => monitor.status(published),
        None => backup::BackupStatus::disabled(published),
    }
}

/// Opens the index with the FHIR search terms wired in (the server and `reindex` must agree).
/// `master` opens the index's sealed secret (the store's master keys).
pub fn open_index(
    data: &std::path::Path,
    master: &auditrail_store::keys::MasterKeys,
    memtable_rows_max: usize,
) -> Result<Index, auditrail_index::IndexError> {
    Index::open(
        data,
        master,
        IndexOptions { memtable_rows_max },
        Some(auditrail_index::doc::fhir_terms),
    )
}

/// A running service's background parts, stopped by [`Service::shutdown`].
pub struct Service {
    pub state: SharedState,
    stop: Arc<AtomicBool>,
    follower: std::thread::JoinHandle<()>,
    retention: std::thread::JoinHandle<()>,
    integrity: std::thread::JoinHandle<()>,
    alerts: Option<std::thread::JoinHandle<()>>,
    /// Stops webhook delivery.
    deliveries: tokio::sync::watch::Sender<bool>,
    runtime: tokio::runtime::Handle,
}

/// Opens (or initialises) the data directory and starts the index follower.
pub fn start(config: Config) -> Result<Service, String> {
    started_ms();
    let data = config.data.clone();
    let master_keys = config.master_key_source()?;
    if !data.join("keys").exists() {
        let (_, how) = auditrail_store::init_with(&data, &config.origin, &master_keys)
            .map_err(|e| format!("cannot initialise {}: {e}", data.display()))?;
        let keys = match how {
            auditrail_store::keys::MasterInit::Created => "a new master key in",
            auditrail_store::keys::MasterInit::Existing => "the master keys from",
        };
        eprintln!(
            "auditrail: initialised {} (origin {}) with {keys} {}",
            data.display(),
            config.origin,
            master_keys.describe()
        );
    }
    config.check()?;
    let privacy =
        auditrail_core::privacy::Filter::new(&config.privacy).map_err(|e| e.to_string())?;
    let options = auditrail_store::Options {
        publish_interval_ms: config.publish_interval_ms,
        segment_bytes_max: config.segment_bytes_max,
        master_keys,
        ..auditrail_store::Options::default()
    };
    let store = Arc::new(
        Store::open(&data, options).map_err(|e| format!("cannot open {}: {e}", data.display()))?,
    );
    let index = Arc::new(
        open_index(&data, store.master_keys(), config.index_memtable_rows_max)
            .map_err(|e| format!("cannot open the index: {e}"))?,
    );
    if index.indexed_through() > store.stages().sequenced {
        // The log is older than the index (restored from a backup): rebuild.
        eprintln!("auditrail: the index is ahead of the log; rebuilding it");
        index.reset().map_err(|e| format!("cannot reset the index: {e}"))?;
    }
    index.set_purged(store.purged().ranges());
    // The forwarders run on the caller's runtime: `start` is called from a blocking task of it.
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "the service must be started from within a tokio runtime".to_string())?;
    let forwarding =
        auditrail_forward::Forwarding::start(&config.forward, &data, store.clone(), &runtime)
            .map_err(|e| format!("cannot start forwarding: {e}"))?;
    let backup = (!config.archive_url.is_empty()).then(|| {
        Arc::new(backup::BackupMonitor::new(&config.archive_url, config.archive_interval_ms))
    });
    let (auth, bootstrap) = auth::Auth::open(
        &data,
        store.clone(),
        config.auth_settings(),
        Arc::new(auth::SystemClock),
    )?;
    if let Some(path) = bootstrap {
        // The password itself never goes to a log: only where to find it.
        eprintln!(
            "auditrail: created the first administrator, user 'admin'; its one-time password is in {} \
             (readable only by this user). Log in with POST /api/v1/auth/login, then change the \
             password and enrol TOTP (README).",
            path.display()
        );
    }
    let alerts = alerts::Alerts::open(
        &data,
        store.master_keys().clone(),
        config.alerts.clone(),
        store.stages().sequenced,
    )?;
    let integrity = Arc::new(integrity::Integrity::open(&data)?);
    let state = Arc::new(AppState {
        alerts,
        integrity,
        privacy,
        auth,
        login_limiter: auth::http::RateLimiter::default(),
        forwarding,
        blocks: BlockCache::new(store.block_reader(), config.block_cache_bytes_max),
        ingest_budget: Arc::new(tokio::sync::Semaphore::new(config.ingest_bytes_in_flight_max)),
        config,
        store,
        index,
        metrics: Metrics::default(),
        ready: AtomicBool::new(false),
        backup,
    });
    let stop = Arc::new(AtomicBool::new(false));
    // The alert engine takes the events the index follower decoded (when it keeps up).
    let (to_alerts, decoded) = match state.config.alerts.enabled {
        true => {
            let (tx, rx) = std::sync::mpsc::sync_channel(alerts::DECODED_IN_FLIGHT);
            (Some(tx), Some(rx))
        }
        false => (None, None),
    };
    let follower = {
        let state = state.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("index-follower".into())
            .spawn(move || follow(&state, &stop, to_alerts))
            .map_err(|e| e.to_string())?
    };
    let retention = {
        let state = state.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("retention".into())
            .spawn(move || retention::scheduled(&state, &stop))
            .map_err(|e| e.to_string())?
    };
    let integrity = {
        let state = state.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("integrity".into())
            .spawn(move || integrity::scheduled(&state, &stop))
            .map_err(|e| e.to_string())?
    };
    let alerts = match decoded {
        Some(decoded) => {
            let state = state.clone();
            let stop = stop.clone();
            Some(
                std::thread::Builder::new()
                    .name("alerts".into())
                    .spawn(move || alerts::follow(&state, &stop, decoded))
                    .map_err(|e| e.to_string())?,
            )
        }
        None => None,
    };
    let (deliveries, stop_deliveries) = tokio::sync::watch::channel(false);
    runtime.spawn(alerts::webhook::deliver(state.clone(), stop_deliveries));
    Ok(Service { state, stop, follower, retention, integrity, alerts, deliveries, runtime })
}

/// The follower loop: index what is durable, then wait briefly for more. The index is
/// searchable within a few milliseconds of an event becoming durable.
fn follow(
    state: &AppState,
    stop: &AtomicBool,
    to_alerts: Option<std::sync::mpsc::SyncSender<alerts::Decoded>>,
) {
    let mut follower = Follower::new(&state.index, &state.store);
    // Never waits for the alert engine: a batch it has no room for is dropped, and the engine
    // reads those events from the log.
    let pass_on = |decoded| {
        if let Some(tx) = &to_alerts {
            let _ = tx.try_send(decoded);
        }
    };
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        match follower.step_and_pass_on(&state.index, &state.store, 64, pass_on) {
            Ok(0) => {
                state.ready.store(true, Ordering::SeqCst);
                if stopping {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            Ok(_) => {}
            Err(e) => {
                // The index is derived data: report and retry, never touch the log.
                eprintln!("auditrail: index follower: {e}");
                std::thread::sleep(std::time::Duration::from_secs(1));
                if stopping {
                    break;
                }
            }
        }
    }
    if let Err(e) = state.index.flush(true) {
        eprintln!("auditrail: cannot write the index on shutdown: {e}");
    }
}

impl Service {
    /// Stops the forwarders and the follower (after it has indexed everything durable), then
    /// closes the store, which publishes a final checkpoint. Call once the HTTP server has
    /// stopped, from a blocking task (it waits for the forwarders on the runtime).
    pub fn shutdown(self) -> Result<(), String> {
        // Forwarders first: they hold the store. What they had not delivered is sent again
        // from their cursors after the next start.
        self.runtime.block_on(self.state.forwarding.stop(std::time::Duration::from_secs(5)));
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.deliveries.send(true);
        let _ = self.follower.join();
        let _ = self.retention.join();
        let _ = self.integrity.join();
        if let Some(alerts) = self.alerts {
            let _ = alerts.join();
        }
        let Service { state, .. } = self;
        let state = Arc::try_unwrap(state)
            .map_err(|_| "requests still hold the state at shutdown".to_string())?;
        // Accounts hold the store for their records; the last API-key use times are saved.
        state.auth.flush();
        let AppState { store, auth, .. } = state;
        drop(auth);
        let store = Arc::try_unwrap(store)
            .map_err(|_| "the store is still shared at shutdown".to_string())?;
        store.close().map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// Serves `config` until `shutdown` resolves, then shuts down cleanly.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    config.check()?;
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host(&config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?
        .collect();
    tls::check_listen(&config, &addrs)?;
    let tls = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || tls::Tls::from_config(&config))
            .await
            .map_err(|e| e.to_string())??
    };
    let listener = tokio::net::TcpListener::bind(&addrs[..])
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    // A bad archive URL stops the start, before anything is opened.
    let destination = match config.archive_url.as_str() {
        "" => None,
        url => Some(auditrail_archive::Destination::open(url).map_err(|e| e.to_string())?),
    };
    let data = config.data.clone();
    let service =
        tokio::task::spawn_blocking(move || start(config)).await.map_err(|e| e.to_string())??;
    let archiver = match (destination, &service.state.backup) {
        (Some(dest), Some(monitor)) => {
            Some(tokio::spawn(backup::run_scheduled(dest, data, monitor.clone())))
        }
        _ => None,
    };
    // Installed before the first line is printed, so a SIGHUP from then on never kills us.
    let reloader = match &tls {
        Some(tls) => {
            let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
            Some(tokio::spawn(tls::reload_on_sighup(tls.clone(), hangup)))
        }
        None => None,
    };
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    eprintln!("auditrail: listening on {scheme}://{addr}");
    // Tests and scripts read this line to learn the port when listening on :0.
    println!("listening on {scheme}://{addr}");
    let app = app(service.state.clone()).into_make_service_with_connect_info::<Peer>();
    let served = match tls {
        Some(tls) => {
            axum::serve(tls.listener(listener), app).with_graceful_shutdown(shutdown).await
        }
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
    };
    served.map_err(|e| e.to_string())?;
    if let Some(task) = reloader {
        task.abort();
    }
    if let Some(task) = archiver {
        // Each run is idempotent and its state file is replaced atomically: stopping mid-run
        // loses nothing, the next start resumes.
        task.abort();
        let _ = task.await;
    }
    tokio::task::spawn_blocking(move || service.shutdown()).await.map_err(|e| e.to_string())??;
    eprintln!("auditrail: stopped cleanly");
    Ok(())
}

#[cfg(test)]
mod block_cache_tests {
    use super::*;
    use auditrail_core::event::ClientEvent;
    use auditrail_store::keys::Keys;
    use auditrail_store::sim::SimDisk;

    /// A store of 400 events in small blocks, those blocks, and the events' stored bytes.
    fn store_of_small_blocks(disk: &SimDisk) -> (Store, Vec<BlockLocation>, Vec<Vec<u8>>) {
        Keys::install(disk, "test.example/log").unwrap();
        let options = auditrail_store::Options {
            block_plain_bytes_target: 1024,
            publish_interval_ms: 60_000,
            ..Default::default()
        };
        let store = Store::open_with(Arc::new(disk.clone()), options).unwrap();
        let events = (0..400)
            .map(|i| {
                ClientEvent::validate(serde_json::json!({
                    "occurred_at": "2026-11-22T10:15:00Z", "category": "phi_access",
                    "action": "patient.read", "outcome": "success",
                    "actor": {"user_id": format!("u{i}")}, "source": {"system": "ehr"},
                }))
                .unwrap()
                .prepare()
                .unwrap()
            })
            .collect();
        store.append(events).unwrap();
        let mut blocks = Vec::new();
        store
            .tail(0)
            .read(400, usize::MAX, |at, _, _| {
                if blocks.last() != Some(at) {
                    blocks.push(*at);
                }
                Ok(())
            })
            .unwrap();
        assert!(blocks.len() > 2 * WARM_IN_PARALLEL_MIN, "{} blocks", blocks.len());
        let stored = store.read_events(0, 400).unwrap().into_iter().map(|(_, e)| e).collect();
        (store, blocks, stored)
    }

    /// Warming from several threads at once (the helper and callers decode the same blocks)
    /// gives every block's events, and the cache counts each cached block once, within its
    /// budget.
    #[test]
    fn warmed_blocks_read_back_and_are_counted_once() {
        let disk = SimDisk::new();
        let (store, blocks, stored) = store_of_small_blocks(&disk);

        for budget in [usize::MAX, 8 << 10] {
            let cache = BlockCache::new(store.block_reader(), budget);
            std::thread::scope(|s| {
                for _ in 0..3 {
                    s.spawn(|| cache.warm(blocks.iter().copied(), Disk::Wait));
                }
            });
            let inner = cache.cached.inner.lock().unwrap();
            let counted: usize = inner.map.values().map(|b| b.bytes()).sum();
            assert_eq!(inner.bytes, counted, "each cached block counted once");
            assert_eq!(inner.order.len(), inner.map.len());
            assert!(inner.bytes <= budget);
            drop(inner);
            for at in &blocks {
                assert_holds(&cache.get(at).unwrap(), at, &stored);
            }
            // Emptied, it holds and counts nothing, and reads decode again.
            cache.clear();
            let inner = cache.cached.inner.lock().unwrap();
            assert!(inner.map.is_empty() && inner.order.is_empty() && inner.bytes == 0);
            drop(inner);
            let at = blocks[1];
            let block = cache.get(&at).unwrap();
            assert_eq!(block.get(at.first_seq).unwrap(), stored[at.first_seq as usize].as_slice());
        }
        store.close().unwrap();
    }

    /// A page whose blocks are not in memory asks for all of them at once, at its first miss
    /// (one prefetch per block not taken yet), then reads each; blocks in memory are never
    /// prefetched.
    #[test]
    fn evicted_blocks_are_prefetched_together_and_read_back() {
        let disk = SimDisk::new();
        let (store, blocks, stored) = store_of_small_blocks(&disk);
        let segments: std::collections::BTreeSet<u64> = blocks.iter().map(|b| b.segment).collect();
        assert_eq!(segments.len(), 1, "one file, which one prefetch brings back whole");
        let cache = BlockCache::new(store.block_reader(), usize::MAX);
        disk.evict(&auditrail_store::reader::segment_path(blocks[0].segment));
        cache.warm(blocks.iter().copied(), Disk::Wait);
        // The first miss is the first block either thread takes (every block is evicted), so
        // it prefetches all the blocks, or all but the one the other thread took first. `warm`
        // never waits for its helper, which may be the thread still prefetching.
        let all = blocks.len() as u64;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while disk.prefetches() < all - 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let prefetched = disk.prefetches();
        assert!(
            prefetched >= all - 1,
            "{prefetched} prefetches for {all} blocks at the first miss"
        );
        for at in &blocks {
            assert_holds(&cache.get(at).unwrap(), at, &stored);
        }

        // In memory now: decoding them all again prefetches nothing more.
        cache.clear();
        cache.warm(blocks.iter().copied(), Disk::Wait);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(disk.prefetches(), prefetched, "blocks in memory were prefetched");
        assert!(prefetched <= all);
        store.close().unwrap();
    }

    /// A page of too few cold blocks for the helper is decoded by the caller alone, but read
    /// the same way: its first miss prefetches every one of its blocks, and blocks in memory
    /// none. A single cold block is simply read.
    #[test]
    fn a_small_page_of_evicted_blocks_is_prefetched_together_too() {
        let disk = SimDisk::new();
        let (store, blocks, stored) = store_of_small_blocks(&disk);
        let path = auditrail_store::reader::segment_path(blocks[0].segment);
        let page = &blocks[3..3 + WARM_IN_PARALLEL_MIN - 1];
        let cache = BlockCache::new(store.block_reader(), usize::MAX);

        disk.evict(&path);
        cache.warm(page.iter().copied(), Disk::Wait);
        // No helper: everything happened on this thread, before `warm` returned.
        assert_eq!(disk.prefetches(), page.len() as u64, "one prefetch per block of the page");
        for at in page {
            assert!(cache.cached.get_if_resident(at).unwrap().is_some(), "{at:?} decoded by warm");
            assert_holds(&cache.get(at).unwrap(), at, &stored);
        }

        cache.clear();
        cache.warm(page.iter().copied(), Disk::Wait);
        assert_eq!(disk.prefetches(), page.len() as u64, "blocks in memory were prefetched");

        disk.evict(&path);
        cache.warm([blocks[0]], Disk::Wait);
        assert_eq!(disk.prefetches(), page.len() as u64, "a single block was prefetched");
        store.close().unwrap();
    }

    /// An async thread's read (`Disk::DoNotWait`) stops at the first block not in memory,
    /// having asked for the page's blocks; in memory, it decodes them all (with the helper
    /// when there are enough), as a read that may wait would; and a page with more cold
    /// blocks than it may decode is left whole to a thread that may take its time.
    #[test]
    fn a_read_that_must_not_wait_stops_at_a_block_not_in_memory() {
        let disk = SimDisk::new();
        let (store, blocks, stored) = store_of_small_blocks(&disk);
        let path = auditrail_store::reader::segment_path(blocks[0].segment);
        let cache = BlockCache::new(store.block_reader(), usize::MAX);
        let alone = &blocks[3..3 + WARM_IN_PARALLEL_MIN - 1];
        let helped = &blocks[..2 * WARM_IN_PARALLEL_MIN];
        for page in [alone, helped] {
            cache.clear();
            disk.evict(&path);
            let before = disk.prefetches();
            let read = cache.warm(page.iter().copied(), Disk::DoNotWait);
            // Alone, the caller stops at its first block. With the helper (which may wait),
            // the helper may take the first block, and its prefetch brings the whole file back
            // here at once, before the caller looks: then the caller reads from memory.
            assert!(!read || page == helped, "the disk was waited for");
            if page == alone {
                let asked = disk.prefetches() - before;
                assert_eq!(asked, page.len() as u64, "one prefetch per block of the page");
            } else {
                assert!(disk.prefetches() > before, "the page's blocks were not asked for");
            }

            // Brought into memory by the prefetch: now it reads without waiting.
            cache.clear();
            assert!(cache.warm(page.iter().copied(), Disk::DoNotWait));
            for at in page {
                let block = cache.cached.get_if_resident(at).unwrap().expect("decoded by warm");
                assert_holds(&block, at, &stored);
            }
        }

        // A cache of its own: no helper still busy with the pages above.
        let cache = BlockCache::new(store.block_reader(), usize::MAX);
        assert!(blocks.len() > IN_MEMORY_COLD_BLOCKS_MAX, "{} blocks: too few", blocks.len());
        let many = &blocks[..IN_MEMORY_COLD_BLOCKS_MAX + 1];
        assert!(!cache.warm(many.iter().copied(), Disk::DoNotWait), "too many to decode here");
        assert!(cache.cached.inner.lock().unwrap().map.is_empty(), "none decoded");
        assert!(cache.warm(many[..IN_MEMORY_COLD_BLOCKS_MAX].iter().copied(), Disk::DoNotWait));
        store.close().unwrap();
    }

    /// `block` holds exactly the stored events of the block at `at`.
    fn assert_holds(block: &BlockEvents, at: &BlockLocation, stored: &[Vec<u8>]) {
        for seq in at.first_seq..at.end_seq() {
            assert_eq!(block.get(seq).unwrap(), stored[seq as usize].as_slice(), "seq {seq}");
        }
    }
}
