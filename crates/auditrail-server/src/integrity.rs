//! Verifying the live log: full audits (everything `auditrail verify` checks) and increments
//! (the events published since the last verified prefix, against the newest signed checkpoint,
//! with a consistency proof). Both run on the server's schedule
//! (`integrity_incremental_interval_ms`, `integrity_full_interval_ms`) or when someone asks
//! (`POST /api/v1/security/audit-log/integrity`).
//!
//! A verification runs on a thread of its own with only the log's files and keys
//! ([`auditrail_store::verify::Auditor`]), so a long audit never holds up a shutdown. Its result
//! goes back to the `integrity` thread, which records it in the log (`integrity.verify.full` or
//! `integrity.verify.incremental`, outcome `failure` when anything was wrong: the built-in
//! alert rule `integrity-check-failed` raises a critical alert on it) and only then shows it as
//! finished. The verified prefix (its compact range) is kept in `integrity/state.json`: tree
//! hashes, public and not secret. Altering it can only make the next increment fail.

use crate::auth::Principal;
use crate::error::ApiError;
use crate::openapi::ErrorBody;
use crate::{AppState, SharedState, blocking};
use auditrail_core::merkle::{CompactRange, Hash};
use auditrail_core::time::format_millis;
use auditrail_store::audit::Problem;
use auditrail_store::verify::Auditor;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

/// Where the verified prefix and the last results are kept, under the data directory.
const STATE_PATH: &str = "integrity/state.json";
/// Verifications kept in memory for `GET .../jobs/{id}`, newest last.
const JOBS_KEPT: usize = 20;
/// Problems a result lists (all are counted).
const PROBLEMS_LISTED: usize = 100;
/// Who scheduled verifications are recorded as.
const SYSTEM_ACTOR: &str = "system:integrity";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every event, block, leaf, tile and checkpoint.
    Full,
    /// The events published since the last verified prefix.
    Incremental,
}

impl Mode {
    fn action(self) -> &'static str {
        match self {
            Mode::Full => "integrity.verify.full",
            Mode::Incremental => "integrity.verify.incremental",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Running,
    /// Nothing wrong.
    Passed,
    /// The log has problems: see `problems`.
    Failed,
    /// The verification could not run to the end (`error` says why).
    Error,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProblemFound {
    /// A file and byte offset, a seq, or a tile path.
    pub location: String,
    pub detail: String,
}

/// One verification, running or finished.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verification {
    pub id: String,
    pub mode: Mode,
    pub status: Outcome,
    /// `system:integrity` for scheduled runs, else the user or API key that asked.
    pub requested_by: String,
    pub started_at: String,
    pub finished_at: Option<String>,
    pub duration_ms: Option<u64>,
    /// Where an increment started: the size of the prefix verified before (0 for a full run).
    pub from_size: u64,
    /// The size of the signed checkpoint verified against.
    pub tree_size: u64,
    /// Events checked so far (the progress of a running verification).
    pub events_checked: u64,
    pub problem_count: u64,
    /// The first problems found (at most 100).
    pub problems: Vec<ProblemFound>,
    pub error: Option<String>,
    /// The seq of the `integrity.verify.*` event that records it, once recorded.
    pub recorded_seq: Option<u64>,
}

/// What survives a restart.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// The compact range of the verified prefix: its size and one hex hash per set bit.
    verified_size: u64,
    verified_peaks: Vec<String>,
    last_full: Option<Verification>,
    last_incremental: Option<Verification>,
}

impl Saved {
    fn verified(&self) -> CompactRange {
        let peaks: Option<Vec<Hash>> = self
            .verified_peaks
            .iter()
            .map(|h| auditrail_core::hex::decode(h).and_then(|b| <Hash>::try_from(b).ok()))
            .collect();
        match peaks {
            Some(p) if p.len() == self.verified_size.count_ones() as usize => {
                CompactRange::from_peaks(self.verified_size, p)
            }
            // A damaged prefix starts over from the first event: slower, never wrong.
            _ => CompactRange::new(),
        }
    }

    fn set_verified(&mut self, range: &CompactRange) {
        self.verified_size = range.size();
        self.verified_peaks =
            range.peaks().iter().map(|h| auditrail_core::hex::encode(h)).collect();
    }
}

struct Inner {
    saved: Saved,
    /// Recent verifications, newest last; at most one running.
    jobs: VecDeque<Verification>,
}

/// A finished verification on its way to the `integrity` thread.
struct Finished {
    id: String,
    actor: Value,
    outcome: Result<Done, String>,
}

struct Done {
    tree_size: u64,
    events: u64,
    problems: Vec<Problem>,
    /// The new verified prefix, when nothing was wrong.
    verified: Option<CompactRange>,
}

pub struct Integrity {
    path: std::path::PathBuf,
    inner: Mutex<Inner>,
    /// Progress of the running verification, in events.
    progress: AtomicU64,
    finished_tx: Mutex<mpsc::Sender<Finished>>,
    finished_rx: Mutex<mpsc::Receiver<Finished>>,
}

impl Integrity {
    pub fn open(data: &std::path::Path) -> Result<Integrity, String> {
        let path = data.join(STATE_PATH);
        let saved = match std::fs::read(&path) {
            // Derived state: a damaged file costs the next increment a walk from the first
            // event, never the start.
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                eprintln!(
                    "auditrail: integrity: {} is not an integrity state ({e}); the next \
                     increment verifies from the first event",
                    path.display()
                );
                Saved::default()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Saved::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let (tx, rx) = mpsc::channel();
        Ok(Integrity {
            path,
            inner: Mutex::new(Inner { saved, jobs: VecDeque::new() }),
            progress: AtomicU64::new(0),
            finished_tx: Mutex::new(tx),
            finished_rx: Mutex::new(rx),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, saved: &Saved) {
        let written = serde_json::to_vec_pretty(saved)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::auth::accounts::write_private_file(&self.path, &b));
        if let Err(e) = written {
            eprintln!("auditrail: integrity: {e}");
        }
    }

    /// A verification as it stands, with the running one's progress.
    fn with_progress(&self, mut v: Verification) -> Verification {
        if v.status == Outcome::Running {
            v.events_checked = self.progress.load(Ordering::Relaxed);
        }
        v
    }

    pub fn job(&self, id: &str) -> Option<Verification> {
        let job = self.lock().jobs.iter().find(|j| j.id == id).cloned();
        job.map(|j| self.with_progress(j))
    }

    pub fn running(&self) -> Option<Verification> {
        let job = self.lock().jobs.iter().find(|j| j.status == Outcome::Running).cloned();
        job.map(|j| self.with_progress(j))
    }

    /// The newest finished verification of either kind.
    pub fn last(&self) -> Option<Verification> {
        let inner = self.lock();
        let (f, i) = (&inner.saved.last_full, &inner.saved.last_incremental);
        match (f, i) {
            (Some(f), Some(i)) => Some(if f.finished_at >= i.finished_at { f } else { i }.clone()),
            (f, i) => f.clone().or_else(|| i.clone()),
        }
    }

    /// The `integrity` section of the security status.
    pub fn status(&self, config: &crate::Config) -> Value {
        let inner = self.lock();
        let summary = |v: &Option<Verification>| {
            v.as_ref().map(|v| {
                json!({"id": v.id, "status": v.status, "finished_at": v.finished_at,
                    "tree_size": v.tree_size, "problem_count": v.problem_count})
            })
        };
        json!({
            "verified_through": inner.saved.verified_size,
            "last_full": summary(&inner.saved.last_full),
            "last_incremental": summary(&inner.saved.last_incremental),
            "running": inner.jobs.iter().any(|j| j.status == Outcome::Running),
            "incremental_interval_ms": config.integrity_incremental_interval_ms,
            "full_interval_ms": config.integrity_full_interval_ms,
        })
    }

    /// Starts a verification on a thread of its own, unless one is running (`Err` holds its
    /// id).
    pub fn start(
        self: &Arc<Self>,
        auditor: Auditor,
        mode: Mode,
        requested_by: &str,
        actor: Value,
    ) -> Result<Verification, String> {
        // Checked and claimed under one lock: at most one job in `jobs` is running.
        let mut inner = self.lock();
        if let Some(running) = inner.jobs.iter().find(|j| j.status == Outcome::Running) {
            return Err(running.id.clone());
        }
        self.progress.store(0, Ordering::Relaxed);
        let now = crate::now_ms();
        let verified = inner.saved.verified();
        let job = Verification {
            id: uuid::Uuid::now_v7().to_string(),
            mode,
            status: Outcome::Running,
            requested_by: requested_by.to_string(),
            started_at: format_millis(now),
            finished_at: None,
            duration_ms: None,
            from_size: if mode == Mode::Full { 0 } else { verified.size() },
            tree_size: 0,
            events_checked: 0,
            problem_count: 0,
            problems: Vec::new(),
            error: None,
            recorded_seq: None,
        };
        inner.jobs.push_back(job.clone());
        while inner.jobs.len() > JOBS_KEPT {
            inner.jobs.pop_front();
        }
        drop(inner);
        let this = self.clone();
        let id = job.id.clone();
        let tx = self.finished_tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let spawned =
            std::thread::Builder::new().name("integrity-verify".into()).spawn(move || {
                let outcome = match mode {
                    Mode::Full => auditor
                        .audit(&mut |done| this.progress.store(done, Ordering::Relaxed))
                        .map(|r| Done {
                            tree_size: r.published,
                            events: r.events,
                            verified: r.ok().then_some(r.range),
                            problems: r.problems,
                        }),
                    Mode::Incremental => auditor.verify_increment(&verified).map(|r| Done {
                        tree_size: r.to,
                        events: r.events,
                        verified: r.ok().then_some(r.range),
                        problems: r.problems,
                    }),
                };
                // The receiver is gone only when the server stopped: nothing left to record.
                let _ =
                    tx.send(Finished { id, actor, outcome: outcome.map_err(|e| e.to_string()) });
            });
        if let Err(e) = spawned {
            let mut inner = self.lock();
            if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == job.id) {
                j.status = Outcome::Error;
                j.error = Some(format!("cannot start a thread: {e}"));
            }
        }
        Ok(job)
    }

    /// Records finished verifications in the log, then shows them as finished. Called by the
    /// `integrity` thread.
    fn record_finished(&self, state: &AppState) {
        let finished: Vec<Finished> =
            self.finished_rx.lock().unwrap_or_else(|e| e.into_inner()).try_iter().collect();
        for f in finished {
            let now = crate::now_ms();
            let Some(mut job) = self.lock().jobs.iter().find(|j| j.id == f.id).cloned() else {
                continue;
            };
            job.finished_at = Some(format_millis(now));
            let started = auditrail_core::time::parse_rfc3339(&job.started_at).unwrap_or(now);
            job.duration_ms = Some((now - started).max(0) as u64);
            let mut verified = None;
            match f.outcome {
                Ok(done) => {
                    job.tree_size = done.tree_size;
                    job.events_checked = done.events;
                    job.problem_count = done.problems.len() as u64;
                    job.problems = done
                        .problems
                        .into_iter()
                        .take(PROBLEMS_LISTED)
                        .map(|p| ProblemFound { location: p.location, detail: p.detail })
                        .collect();
                    job.status =
                        if job.problem_count == 0 { Outcome::Passed } else { Outcome::Failed };
                    verified = done.verified;
                }
                Err(e) => {
                    job.status = Outcome::Error;
                    job.error = Some(e);
                }
            }
            match record(state, &f.actor, &job) {
                Ok(seq) => job.recorded_seq = seq,
                Err(e) => {
                    eprintln!("auditrail: integrity: cannot record verification {}: {e}", job.id)
                }
            }
            if job.status != Outcome::Passed {
                eprintln!(
                    "auditrail: integrity: {} verification {} {}: {} problem(s){}",
                    match job.mode {
                        Mode::Full => "full",
                        Mode::Incremental => "incremental",
                    },
                    job.id,
                    if job.status == Outcome::Failed { "failed" } else { "could not finish" },
                    job.problem_count,
                    job.problems
                        .first()
                        .map(|p| format!(", first {}: {}", p.location, p.detail))
                        .unwrap_or_default()
                );
            }
            let mut inner = self.lock();
            if let Some(range) = verified {
                // A full audit may end at an older size than an increment that finished meanwhile:
                // the prefix only grows.
                if range.size() >= inner.saved.verified_size {
                    inner.saved.set_verified(&range);
                }
            }
            match job.mode {
                Mode::Full => inner.saved.last_full = Some(job.clone()),
                Mode::Incremental => inner.saved.last_incremental = Some(job.clone()),
            }
            if let Some(j) = inner.jobs.iter_mut().find(|j| j.id == job.id) {
                *j = job;
            }
            self.save(&inner.saved);
            drop(inner);
        }
    }
}

/// Appends the `integrity.verify.*` event and waits until it is durable; returns its seq.
fn record(state: &AppState, actor: &Value, job: &Verification) -> Result<Option<u64>, String> {
    let outcome = if job.status == Outcome::Passed { "success" } else { "failure" };
    let first = job.problems.first().map(|p| format!("{}: {}", p.location, p.detail));
    let event = crate::auth::repository_event(
        actor,
        job.mode.action(),
        outcome,
        json!({
            "verification_id": job.id,
            "from_size": job.from_size,
            "tree_size": job.tree_size,
            "events_checked": job.events_checked,
            "duration_ms": job.duration_ms,
            "problem_count": job.problem_count,
            "first_problem": first,
            "error": job.error,
        }),
        Vec::new(),
    );
    let prepared =
        auditrail_store::retention::repository_event(event).map_err(|e| e.to_string())?;
    let receipts = state.store.append(vec![prepared]).map_err(|e| e.to_string())?;
    Ok(receipts.first().map(|r| r.seq))
}

/// The `integrity` thread: records finished verifications and starts the scheduled ones,
/// until `stop`.
pub fn scheduled(state: &SharedState, stop: &AtomicBool) {
    let incremental_every = state.config.integrity_incremental_interval_ms;
    let full_every = state.config.integrity_full_interval_ms;
    let now = crate::now_ms();
    let mut next_incremental = (incremental_every > 0).then(|| now + incremental_every as i64);
    // The first full audit comes one incremental interval after the start when none was
    // ever run (or the last one is overdue), then every `full_every`.
    let last_full_ms = state
        .integrity
        .lock()
        .saved
        .last_full
        .as_ref()
        .and_then(|v| v.finished_at.as_deref())
        .and_then(auditrail_core::time::parse_rfc3339);
    let mut next_full = (full_every > 0).then(|| {
        let soon = now + incremental_every.clamp(1_000, 300_000) as i64;
        last_full_ms.map_or(soon, |t| (t + full_every as i64).max(soon))
    });
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        state.integrity.record_finished(state);
        let now = crate::now_ms();
        let actor = json!({"user_id": SYSTEM_ACTOR});
        if let Some(t) = next_full
            && now >= t
            && state
                .integrity
                .start(state.store.auditor(), Mode::Full, SYSTEM_ACTOR, actor.clone())
                .is_ok()
        {
            next_full = Some(now + full_every as i64);
            continue;
        }
        if let Some(t) = next_incremental
            && now >= t
        {
            let nothing_new =
                state.integrity.lock().saved.verified_size == state.store.stages().published;
            // An increment with nothing new to check is not run (and not recorded); a busy
            // verifier tries again at the next tick.
            if nothing_new
                || state
                    .integrity
                    .start(state.store.auditor(), Mode::Incremental, SYSTEM_ACTOR, actor)
                    .is_ok()
            {
                next_incremental = Some(now + incremental_every as i64);
            }
        }
    }
    state.integrity.record_finished(state);
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IntegrityState {
    /// The newest finished verification's result (`passed`, `failed` or `error`); null
    /// before the first.
    pub status: Option<Outcome>,
    /// When it finished.
    pub verified_at: Option<String>,
    /// The newest finished verification, full or incremental; null before the first.
    pub last: Option<Verification>,
    pub last_full: Option<Verification>,
    pub last_incremental: Option<Verification>,
    /// The running verification, with its progress.
    pub running: Option<Verification>,
    /// The size of the prefix of the log verified so far: increments go on from there.
    pub verified_through: u64,
    /// The log's newest signed tree size.
    pub published: u64,
    pub incremental_interval_ms: u64,
    pub full_interval_ms: u64,
}

/// `GET /api/v1/security/audit-log/integrity`
#[utoipa::path(
    get,
    path = "/api/v1/security/audit-log/integrity",
    tag = "security",
    operation_id = "integrity_get",
    summary = "The latest integrity verification",
    description = "The newest verification of the log (full or incremental), the newest of \
each kind, the one running with its progress, and how far the verified prefix reaches. The \
server verifies new events every `integrity_incremental_interval_ms` and the whole log every \
`integrity_full_interval_ms`; each result is recorded in the log as `integrity.verify.full` \
or `integrity.verify.incremental` (outcome `failure` raises the critical alert \
`integrity-check-failed`).",
    responses(
        (status = 200, description = "The verification state.", body = IntegrityState),
    )
)]
pub async fn get_state(State(state): State<SharedState>) -> Result<Response, ApiError> {
    let i = &state.integrity;
    let inner_saved = {
        let inner = i.lock();
        (
            inner.saved.last_full.clone(),
            inner.saved.last_incremental.clone(),
            inner.saved.verified_size,
        )
    };
    let last = i.last();
    let body = IntegrityState {
        status: last.as_ref().map(|l| l.status),
        verified_at: last.as_ref().and_then(|l| l.finished_at.clone()),
        last,
        last_full: inner_saved.0,
        last_incremental: inner_saved.1,
        running: i.running(),
        verified_through: inner_saved.2,
        published: state.store.stages().published,
        incremental_interval_ms: state.config.integrity_incremental_interval_ms,
        full_interval_ms: state.config.integrity_full_interval_ms,
    };
    Ok(Json(body).into_response())
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartBody {
    /// `full` (the default) or `incremental`.
    pub mode: Option<Mode>,
}

/// The mode asked for in the body or as `?mode=`; a full verification when neither says.
fn requested_mode(raw_query: Option<&str>, body: &[u8]) -> Result<Mode, ApiError> {
    let mut from_query = None;
    for (k, v) in crate::query::pairs(raw_query)? {
        match k.as_str() {
            "mode" => {
                from_query = Some(match v.as_str() {
                    "full" => Mode::Full,
                    "incremental" => Mode::Incremental,
                    _ => {
                        return Err(ApiError::bad_request(
                            "invalid_parameter",
                            "mode must be full or incremental",
                        ));
                    }
                })
            }
            _ => return Err(ApiError::unknown_parameter(&k)),
        }
    }
    let from_body = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let parsed: StartBody = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(
                "invalid_json",
                format!("expected {{\"mode\": \"full\" | \"incremental\"}}: {e}"),
            )
        })?;
        parsed.mode
    };
    match (from_body, from_query) {
        (Some(b), Some(q)) if b != q => Err(ApiError::bad_request(
            "invalid_parameter",
            "the body and ?mode= ask for different modes",
        )),
        (b, q) => Ok(b.or(q).unwrap_or(Mode::Full)),
    }
}

/// `POST /api/v1/security/audit-log/integrity`
#[utoipa::path(
    post,
    path = "/api/v1/security/audit-log/integrity",
    tag = "security",
    operation_id = "integrity_start",
    summary = "Start a verification",
    description = "Starts a `full` verification (every event, block, leaf, tile and \
checkpoint, as `auditrail verify` does) or an `incremental` one (the events published since \
the verified prefix, against the newest signed checkpoint, with a consistency proof) as a \
background job. The mode comes from the body (`{\"mode\": \"incremental\"}`) or `?mode=`; \
without either (an empty body), a full one. Answers 202 with the job and its `Location`; \
follow it with `GET /api/v1/security/audit-log/integrity/jobs/{id}`. One verification runs at \
a time: while one runs, 409 `verification_running` names it.",
    params(("mode" = Option<String>, Query, description = "`full` (the default) or `incremental`, instead of the body.")),
    request_body(content = StartBody, content_type = "application/json", description = "Optional."),
    responses(
        (status = 202, description = "Started.", body = Verification),
        (status = 400, description = "`invalid_json` (a body that is not `{\"mode\": ...}`), `invalid_parameter` (a mode that is not `full` or `incremental`, or two that differ) or `unknown_parameter`.", body = ErrorBody),
        (status = 409, description = "`verification_running`.", body = ErrorBody),
    )
)]
pub async fn start(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let mode = requested_mode(raw.as_deref(), &body)?;
    blocking(move || {
        match state.integrity.start(state.store.auditor(), mode, &principal.id, principal.actor()) {
            Ok(job) => {
                let location = format!("/api/v1/security/audit-log/integrity/jobs/{}", job.id);
                Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(job))
                    .into_response())
            }
            Err(running) => Err(ApiError::new(
                StatusCode::CONFLICT,
                "verification_running",
                format!("verification {running} is running; follow it or wait for it to finish"),
            )),
        }
    })
    .await
}

/// `GET /api/v1/security/audit-log/integrity/jobs/{id}`
#[utoipa::path(
    get,
    path = "/api/v1/security/audit-log/integrity/jobs/{id}",
    tag = "security",
    operation_id = "integrity_job",
    summary = "Follow a verification",
    description = "One of the recent verifications (the last 20 since the server started), \
running or finished: `status` is `running`, `passed`, `failed` (see `problems`) or `error`. \
A finished one has been recorded in the log (`recorded_seq`).",
    params(("id" = String, Path, description = "The verification's id.")),
    responses(
        (status = 200, description = "The verification.", body = Verification),
        (status = 404, description = "`not_found`.", body = ErrorBody),
    )
)]
pub async fn get_job(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match state.integrity.job(&id) {
        Some(job) => Ok(Json(job).into_response()),
        None => Err(ApiError::not_found(format!("no recent verification {id}"))),
    }
}
