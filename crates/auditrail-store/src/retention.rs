//! Retention: whole sealed segments past their retention are purged by deleting their files,
//! which destroys the wrapped secret in each header and so crypto-erases their events and
//! salts. The tree (tiles, leaf entries) and the checkpoints stay: every proof still verifies,
//! and the audit checks purged ranges against the leaf entries alone.
//!
//! Two small files under `retention/` carry the state, each replaced atomically:
//! - `retention/purged`: one JSON object a line per purged segment ([`PurgedSegment`]). It is
//!   made durable *before* the segment file is deleted, so a crash in between leaves a record
//!   whose file still exists, and opening the store finishes the deletion.
//! - `retention/holds.json`: the legal holds ([`Hold`]) that stop purging what they cover,
//!   sealed under the master key ([`crate::keys::HOLDS`]).
//!
//! A segment is purged only when every event in it is past its project's retention and no
//! hold covers it. Holds are matched against a per-segment summary (projects, patient ids,
//! time bounds), so a hold combining criteria may keep a segment whose events satisfy each
//! criterion separately: it errs on the side of keeping.

use crate::error::StoreError;
use crate::io::Io;
use crate::keys::MasterKeys;
use crate::reader::{self, SEGMENTS_DIR, list_segments};
use crate::tree::DiskTiles;
use auditrail_core::leaf::LeafEntry;
use auditrail_core::tile::{self, TILE_WIDTH};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

pub const RETENTION_DIR: &str = "retention";
pub const PURGED_PATH: &str = "retention/purged";
pub const HOLDS_PATH: &str = "retention/holds.json";

pub const DAY_MS: i64 = 86_400_000;
/// HIPAA keeps documentation six years (45 CFR 164.316(b)(2)); shorter needs `force`.
pub const RETENTION_DAYS_MIN: u32 = 2192;
/// Seven years, the default.
pub const RETENTION_DAYS_DEFAULT: u32 = 2557;

/// One purged segment, as recorded in `retention/purged`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgedSegment {
    pub first_seq: u64,
    pub end_seq: u64,
    /// `recorded_at` of its first and last events, Unix milliseconds.
    pub oldest_recorded_ms: i64,
    pub newest_recorded_ms: i64,
    pub purged_at_ms: i64,
}

/// The purged segments, sorted by seq; answers "was this seq purged?".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Purged(Vec<PurgedSegment>);

impl Purged {
    pub fn load(io: &dyn Io) -> Result<Purged, StoreError> {
        let bytes = match io.read(PURGED_PATH) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Purged::default()),
            Err(e) => return Err(e.into()),
        };
        let mut all = Vec::new();
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let p: PurgedSegment = serde_json::from_slice(line)
                .map_err(|e| StoreError::corrupted(format!("{PURGED_PATH} line {}", n + 1), e))?;
            if p.first_seq >= p.end_seq {
                return Err(StoreError::corrupted(
                    format!("{PURGED_PATH} line {}", n + 1),
                    "empty seq range",
                ));
            }
            all.push(p);
        }
        all.sort_by_key(|p| p.first_seq);
        if all.windows(2).any(|w| w[0].end_seq > w[1].first_seq) {
            return Err(StoreError::corrupted(PURGED_PATH, "overlapping seq ranges"));
        }
        Ok(Purged(all))
    }

    /// The purged segment holding `seq`, if any.
    pub fn find(&self, seq: u64) -> Option<&PurgedSegment> {
        let i = self.0.partition_point(|p| p.end_seq <= seq);
        self.0.get(i).filter(|p| p.first_seq <= seq)
    }

    pub fn segments(&self) -> &[PurgedSegment] {
        &self.0
    }

    /// `[first, end)` of every purged segment, in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.0.iter().map(|p| (p.first_seq, p.end_seq)).collect()
    }

    pub fn events(&self) -> u64 {
        self.0.iter().map(|p| p.end_seq - p.first_seq).sum()
    }

    fn with(&self, p: PurgedSegment) -> Purged {
        let mut all = self.0.clone();
        all.push(p);
        all.sort_by_key(|p| p.first_seq);
        Purged(all)
    }

    fn write(&self, io: &dyn Io) -> Result<(), StoreError> {
        let mut text = Vec::new();
        for p in &self.0 {
            serde_json::to_writer(&mut text, p).map_err(|e| StoreError::Io(e.into()))?;
            text.push(b'\n');
        }
        replace_file(io, PURGED_PATH, &text)
    }
}

/// Writes `path` whole and durably: a temporary file, fsync, rename, fsync of the directory.
fn replace_file(io: &dyn Io, path: &str, bytes: &[u8]) -> Result<(), StoreError> {
    io.create_dir_all(RETENTION_DIR)?;
    let tmp = format!("{path}.tmp");
    io.write_file(&tmp, bytes)?;
    io.sync_file(&tmp)?;
    io.rename(&tmp, path)?;
    io.sync_dir(RETENTION_DIR)?;
    Ok(())
}

/// Deletes the files of purged segments a crash left behind (the record was durable first).
/// Returns how many it removed.
pub fn finish_interrupted(io: &dyn Io) -> Result<usize, StoreError> {
    let purged = Purged::load(io)?;
    let present: BTreeSet<u64> = list_segments(io)?.into_iter().collect();
    let mut removed = 0;
    for p in purged.segments() {
        if present.contains(&p.first_seq) {
            io.remove(&reader::segment_path(p.first_seq))?;
            removed += 1;
        }
    }
    if removed > 0 {
        io.sync_dir(SEGMENTS_DIR)?;
    }
    Ok(removed)
}

/// How long events are kept: a default and per-project overrides, in days.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionPolicy {
    pub default_days: u32,
    #[serde(default)]
    pub projects: BTreeMap<String, u32>,
}

impl Default for RetentionPolicy {
    fn default() -> RetentionPolicy {
        RetentionPolicy { default_days: RETENTION_DAYS_DEFAULT, projects: BTreeMap::new() }
    }
}

impl RetentionPolicy {
    /// Refuses a retention under six years unless `force`.
    pub fn check(&self, force: bool) -> Result<(), String> {
        if force {
            return Ok(());
        }
        let short = std::iter::once(("the default".to_string(), self.default_days))
            .chain(self.projects.iter().map(|(p, d)| (format!("project {p:?}"), *d)))
            .find(|(_, d)| *d < RETENTION_DAYS_MIN);
        match short {
            Some((what, days)) => Err(format!(
                "retention of {days} days for {what} is under six years ({RETENTION_DAYS_MIN} days), \
                 the HIPAA minimum for documentation; set retention_force = true to allow it"
            )),
            None => Ok(()),
        }
    }

    pub fn days_for(&self, project: Option<&str>) -> u32 {
        project.and_then(|p| self.projects.get(p)).copied().unwrap_or(self.default_days)
    }

    fn shortest_days(&self) -> u32 {
        self.projects.values().copied().chain([self.default_days]).min().unwrap_or(0)
    }
}

/// A legal hold: while it exists, no segment holding an event it covers is purged. Every
/// criterion given must match (a hold with none is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub id: String,
    pub reason: String,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// The [`PatientTokens`] token of a patient id (`patient.id` of the events, whatever its
    /// system): the holds file names no patient in the clear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient_token: Option<String>,
    /// Events that occurred or were recorded in `[from_ms, to_ms)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_ms: Option<i64>,
}

impl Hold {
    pub fn check(&self) -> Result<(), String> {
        if self.reason.trim().is_empty() {
            return Err("a hold needs a reason".into());
        }
        if self.project.is_none()
            && self.patient_token.is_none()
            && self.from_ms.is_none()
            && self.to_ms.is_none()
        {
            return Err("a hold needs at least one of project, patient, from, to".into());
        }
        if let (Some(f), Some(t)) = (self.from_ms, self.to_ms)
            && f >= t
        {
            return Err("from must be before to".into());
        }
        Ok(())
    }

    /// Whether this hold may cover an event of the segment summarised by `s`.
    fn covers(&self, s: &SegmentSummary) -> bool {
        let project_ok =
            self.project.as_ref().is_none_or(|p| s.projects.contains_key(&Some(p.clone())));
        let patient_ok = self.patient_token.as_ref().is_none_or(|p| s.patients.contains(p));
        let (lo, hi) = (self.from_ms.unwrap_or(i64::MIN), self.to_ms.unwrap_or(i64::MAX));
        let overlaps = |(a, b): (i64, i64)| a < hi && b >= lo;
        let time_ok = (self.from_ms.is_none() && self.to_ms.is_none())
            || overlaps(s.recorded)
            || s.occurred.is_some_and(overlaps);
        project_ok && patient_ok && time_ok
    }
}

/// Reads the legal holds. The file is sealed under the master key (purpose
/// [`crate::keys::HOLDS`]); one written before holds were sealed is plain JSON and still read.
pub fn load_holds(io: &dyn Io, master: &MasterKeys) -> Result<Vec<Hold>, StoreError> {
    let bytes = match io.read(HOLDS_PATH) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let (json, _) = master
        .open_blob_or_legacy(crate::keys::HOLDS.purpose, &bytes)
        .map_err(StoreError::Unavailable)?;
    serde_json::from_slice(&json).map_err(|e| StoreError::corrupted(HOLDS_PATH, e))
}

/// Replaces the legal holds, sealed under the newest master key.
pub fn save_holds(io: &dyn Io, master: &MasterKeys, holds: &[Hold]) -> Result<(), StoreError> {
    let json = serde_json::to_vec_pretty(holds).map_err(|e| StoreError::Io(e.into()))?;
    replace_file(io, HOLDS_PATH, &master.seal_blob(crate::keys::HOLDS.purpose, &json))
}

/// Seals a holds file written in the clear by an older version (they name patients, if only
/// as tokens, and give reasons in free text). Returns whether it did.
pub fn seal_legacy_holds(io: &dyn Io, master: &MasterKeys) -> Result<bool, StoreError> {
    match io.read(HOLDS_PATH) {
        Ok(b) if !b.starts_with(crate::keys::SEALED_MAGIC) => {
            let holds = load_holds(io, master)?;
            save_holds(io, master, &holds)?;
            Ok(true)
        }
        Ok(_) => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Keyed tokens of patient ids, so that legal holds by patient name no patient in the clear.
/// The key is derived from the log's signing key, which never rotates.
#[derive(Clone)]
pub struct PatientTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for PatientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientTokens(..)")
    }
}

impl PatientTokens {
    pub fn new(keys: &crate::keys::Keys) -> PatientTokens {
        let secret = keys.signer.to_private_key_string();
        let mut key = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, secret.as_bytes())
            .expand(b"auditrail/retention/patient-token/v1", &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        PatientTokens { key }
    }

    /// HMAC-SHA256 of the id, first 16 bytes, hex.
    pub fn token(&self, patient_id: &str) -> String {
        use hmac::Mac;
        let mut mac = <hmac::Hmac<sha2::Sha256> as hmac::KeyInit>::new_from_slice(&self.key)
            .expect("HMAC takes any key length");
        mac.update(patient_id.as_bytes());
        mac.finalize().into_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// What retention needs to know of one sealed segment. Segments never change once sealed, so
/// a summary can be kept for the life of the process.
#[derive(Debug, Clone)]
pub struct SegmentSummary {
    pub first_seq: u64,
    pub end_seq: u64,
    /// `recorded_at` of the first and last events.
    pub recorded: (i64, i64),
    /// Oldest and newest `occurred_at`, when events carry one.
    pub occurred: Option<(i64, i64)>,
    /// The newest `recorded_at` per project (`None`: events without a project).
    pub projects: BTreeMap<Option<String>, i64>,
    /// Tokens of the events' patient ids, only those in the `wanted` set it was summarised
    /// for (the patients legal holds name).
    pub patients: BTreeSet<String>,
}

impl SegmentSummary {
    /// When every event of the segment is past its project's retention.
    pub fn expires_ms(&self, policy: &RetentionPolicy) -> i64 {
        self.projects
            .iter()
            .map(|(p, newest)| {
                newest.saturating_add(i64::from(policy.days_for(p.as_deref())) * DAY_MS)
            })
            .max()
            .unwrap_or(i64::MIN)
    }
}

/// Reads a sealed segment's events and summarises them for retention.
pub fn summarise(
    io: &dyn Io,
    master: &MasterKeys,
    tokens: &PatientTokens,
    wanted_patients: &BTreeSet<String>,
    first_seq: u64,
    end_seq: u64,
) -> Result<SegmentSummary, StoreError> {
    let mut s = SegmentSummary {
        first_seq,
        end_seq,
        recorded: (i64::MAX, i64::MIN),
        occurred: None,
        projects: BTreeMap::new(),
        patients: BTreeSet::new(),
    };
    reader::for_each_record(io, master, first_seq, end_seq, |seq, r, _| {
        #[derive(Deserialize)]
        struct Fields {
            project: Option<String>,
            occurred_at: Option<String>,
            patient: Option<Patient>,
        }
        #[derive(Deserialize)]
        struct Patient {
            id: String,
        }
        let f: Fields = serde_json::from_slice(&r.canonical)
            .map_err(|e| StoreError::corrupted(format!("seq {seq}"), e))?;
        let recorded = r.recorded_at_ms as i64;
        s.recorded = (s.recorded.0.min(recorded), s.recorded.1.max(recorded));
        if let Some(t) = f.occurred_at.as_deref().and_then(auditrail_core::time::parse_rfc3339) {
            s.occurred = Some(s.occurred.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        }
        let newest = s.projects.entry(f.project).or_insert(recorded);
        *newest = (*newest).max(recorded);
        if let Some(p) = f.patient.filter(|_| !wanted_patients.is_empty()) {
            let token = tokens.token(&p.id);
            if wanted_patients.contains(&token) {
                s.patients.insert(token);
            }
        }
        Ok(())
    })?;
    if s.projects.is_empty() {
        return Err(StoreError::corrupted(
            reader::segment_path(first_seq),
            "a sealed segment without events",
        ));
    }
    Ok(s)
}

/// The decision about one sealed segment.
#[derive(Debug, Clone, Serialize)]
pub struct SegmentDecision {
    pub first_seq: u64,
    pub end_seq: u64,
    pub oldest_recorded_ms: i64,
    pub newest_recorded_ms: i64,
    /// When every event in it is past retention.
    pub expires_ms: i64,
    /// Ids of the holds that keep it.
    pub held_by: Vec<String>,
    pub purge: bool,
}

/// Decides, for each summarised segment, whether it may be purged at `now_ms`.
pub fn decide(
    summaries: &[SegmentSummary],
    policy: &RetentionPolicy,
    holds: &[Hold],
    now_ms: i64,
) -> Vec<SegmentDecision> {
    summaries
        .iter()
        .map(|s| {
            let expires_ms = s.expires_ms(policy);
            let held_by: Vec<String> =
                holds.iter().filter(|h| h.covers(s)).map(|h| h.id.clone()).collect();
            SegmentDecision {
                first_seq: s.first_seq,
                end_seq: s.end_seq,
                oldest_recorded_ms: s.recorded.0,
                newest_recorded_ms: s.recorded.1,
                expires_ms,
                purge: expires_ms <= now_ms && held_by.is_empty(),
                held_by,
            }
        })
        .collect()
}

/// `recorded_at` of leaf `seq`, from the entry bundles of a tree of `published` leaves.
pub fn leaf_entry(io: &dyn Io, seq: u64, published: u64) -> Result<LeafEntry, StoreError> {
    let index = seq / TILE_WIDTH;
    let width = if (index + 1) * TILE_WIDTH <= published {
        TILE_WIDTH as u32
    } else {
        (published % TILE_WIDTH) as u32
    };
    let location = || format!("leaf {seq} of the tree of size {published}");
    if seq >= published || width == 0 {
        return Err(StoreError::InvalidInput(format!("{} is not published", location())));
    }
    let bundle = DiskTiles { io }.bundle(index, width)?;
    let entries = tile::decode_bundle(&bundle)
        .ok_or_else(|| StoreError::corrupted(location(), "malformed entry bundle"))?;
    let entry = entries
        .get((seq % TILE_WIDTH) as usize)
        .ok_or_else(|| StoreError::corrupted(location(), "the entry bundle is short"))?;
    LeafEntry::decode(entry)
        .ok_or_else(|| StoreError::corrupted(location(), "malformed leaf entry"))
}

/// Candidate segments for purging: the sealed ones (every segment but the newest, which is
/// being written), with their seq ranges, whose newest event (per the leaf entries) is older
/// than the shortest retention. Oldest first; stops at the first one too young, since
/// `recorded_at` never decreases.
pub fn sealed_candidates(
    io: &dyn Io,
    purged: &Purged,
    policy: &RetentionPolicy,
    published: u64,
    now_ms: i64,
) -> Result<Vec<(u64, u64)>, StoreError> {
    // A segment ends where the next one begins, whether that one is on disk or purged.
    let mut firsts: Vec<(u64, bool)> = list_segments(io)?.into_iter().map(|f| (f, true)).collect();
    firsts.extend(purged.segments().iter().map(|p| (p.first_seq, false)));
    firsts.sort_unstable();
    let horizon = now_ms.saturating_sub(i64::from(policy.shortest_days()) * DAY_MS);
    let mut out = Vec::new();
    for pair in firsts.windows(2) {
        let ((first, on_disk), (end, _)) = (pair[0], pair[1]);
        if !on_disk || purged.find(first).is_some() {
            continue;
        }
        // Only fully published segments: their leaf entries are signed.
        if end > published || first >= end {
            break;
        }
        let newest = leaf_entry(io, end - 1, published)?.recorded_at_ms as i64;
        if newest > horizon {
            break;
        }
        out.push((first, end));
    }
    Ok(out)
}

/// Canonical JSON of a purge event starts so: RFC 8785 sorts keys, and `action` sorts first.
pub const PURGE_EVENT_PREFIX: &[u8] = b"{\"action\":\"retention.purge\"";

/// Context keys of a purge event that carry the purged runs, `first..end` comma separated.
const RUNS_KEY: &str = "purged_runs";
/// Characters of runs per context value (values hold at most 1,024).
const RUNS_VALUE_CHARS: usize = 1000;

/// Merges seq ranges into maximal contiguous runs.
pub fn runs(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// The events that record a purge, appended (durably) before anything is deleted. Each names
/// up to 64 of the segments going now; the last also lists every purged run so far, including
/// these, so the newest purge event in the log vouches for the whole of `retention/purged`
/// (older purge events may themselves be purged one day). The audit checks that.
pub fn purge_events(
    actor: &str,
    going: &[PurgedSegment],
    all_runs: &[(u64, u64)],
) -> Result<Vec<auditrail_core::event::PreparedEvent>, StoreError> {
    let fmt = auditrail_core::time::format_millis;
    let mut run_values: Vec<String> = vec![String::new()];
    for (a, b) in all_runs {
        let item = format!("{a}..{b}");
        let last = run_values.last_mut().expect("never empty");
        if !last.is_empty() && last.len() + 1 + item.len() > RUNS_VALUE_CHARS {
            run_values.push(item);
        } else {
            if !last.is_empty() {
                last.push(',');
            }
            last.push_str(&item);
        }
    }
    if run_values.len() > 31 {
        return Err(StoreError::InvalidInput(format!(
            "{} purged runs do not fit one purge event; release or consolidate legal holds",
            all_runs.len()
        )));
    }
    let chunks: Vec<&[PurgedSegment]> = going.chunks(64).collect();
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let events: u64 = chunk.iter().map(|p| p.end_seq - p.first_seq).sum();
        let mut context = serde_json::Map::new();
        context.insert("events".into(), events.to_string().into());
        if i + 1 == chunks.len() {
            for (k, v) in run_values.iter().enumerate() {
                context.insert(format!("{RUNS_KEY}_{k}"), v.clone().into());
            }
        }
        let event = serde_json::json!({
            "action": "retention.purge",
            "outcome": "success",
            "actor": {"user_id": actor},
            "outcome_desc": format!(
                "purged {} segment(s) holding {events} event(s) past retention (crypto-erasure)",
                chunk.len()
            ),
            "entities": chunk.iter().map(|p| serde_json::json!({
                "type": "log-segment",
                "id": format!("{}..{}", p.first_seq, p.end_seq),
                "name": format!(
                    "{} events recorded {} to {}",
                    p.end_seq - p.first_seq,
                    fmt(p.oldest_recorded_ms),
                    fmt(p.newest_recorded_ms)
                ),
            })).collect::<Vec<_>>(),
            "context": context,
        });
        out.push(repository_event(event)?);
    }
    Ok(out)
}

/// The category of the events auditrail records about itself. Clients may not send it (the
/// server refuses it), which is what lets the audit trust a purge event.
pub const REPOSITORY_CATEGORY: &str = "repository";
const REPOSITORY_SOURCE: &str = "auditrail";

/// An event auditrail records about itself: `event` with the `repository` category and
/// auditrail as its source.
pub fn repository_event(
    mut event: serde_json::Value,
) -> Result<auditrail_core::event::PreparedEvent, StoreError> {
    event["category"] = REPOSITORY_CATEGORY.into();
    event["source"] = serde_json::json!({"system": REPOSITORY_SOURCE, "type": "audit-repository"});
    auditrail_core::event::ClientEvent::validate(event)
        .and_then(auditrail_core::event::ClientEvent::prepare)
        .map_err(|e| StoreError::InvalidInput(format!("a repository event is invalid: {e:?}")))
}

/// The purged runs a purge event vouches for (`None` if it lists none: not the last of its
/// purge, or not the repository's own event).
pub fn vouched_runs(canonical: &[u8]) -> Option<Vec<(u64, u64)>> {
    let v: serde_json::Value = serde_json::from_slice(canonical).ok()?;
    // Clients cannot send this category (the server refuses it), so a client's look-alike
    // event vouches for nothing.
    if v.get("category")? != REPOSITORY_CATEGORY
        || v.get("source")?.get("system")? != REPOSITORY_SOURCE
    {
        return None;
    }
    let context = v.get("context")?.as_object()?;
    let mut values: Vec<(usize, &str)> = context
        .iter()
        .filter_map(|(k, v)| {
            let n = k.strip_prefix(RUNS_KEY)?.strip_prefix('_')?.parse().ok()?;
            Some((n, v.as_str()?))
        })
        .collect();
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let mut out = Vec::new();
    for item in values.iter().flat_map(|(_, v)| v.split(',')).filter(|i| !i.is_empty()) {
        let (a, b) = item.split_once("..")?;
        out.push((a.parse().ok()?, b.parse().ok()?));
    }
    Some(out)
}

/// Records `segment` as purged, then deletes its file. The record is durable before the
/// deletion; a crash between the two is finished by [`finish_interrupted`].
pub fn purge_segment(
    io: &dyn Io,
    purged: &Purged,
    segment: PurgedSegment,
) -> Result<Purged, StoreError> {
    let path = reader::segment_path(segment.first_seq);
    let next = purged.with(segment);
    next.write(io)?;
    io.remove(&path)?;
    io.sync_dir(SEGMENTS_DIR)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(projects: &[(Option<&str>, i64)], patients: &[&str]) -> SegmentSummary {
        SegmentSummary {
            first_seq: 0,
            end_seq: 10,
            recorded: (0, projects.iter().map(|p| p.1).max().unwrap()),
            occurred: None,
            projects: projects.iter().map(|(p, t)| (p.map(str::to_string), *t)).collect(),
            patients: patients.iter().map(|p| p.to_string()).collect(),
        }
    }

    fn hold(project: Option<&str>, patient: Option<&str>, range: Option<(i64, i64)>) -> Hold {
        Hold {
            id: "h".into(),
            reason: "litigation".into(),
            created_ms: 0,
            project: project.map(str::to_string),
            patient_token: patient.map(str::to_string),
            from_ms: range.map(|r| r.0),
            to_ms: range.map(|r| r.1),
        }
    }

    #[test]
    fn the_longest_project_retention_in_a_segment_decides() {
        let mut policy = RetentionPolicy { default_days: 10, projects: BTreeMap::new() };
        policy.projects.insert("long".into(), 20);
        let s = summary(&[(None, 5 * DAY_MS), (Some("long"), 3 * DAY_MS)], &[]);
        assert_eq!(s.expires_ms(&policy), 23 * DAY_MS);
        let d = decide(std::slice::from_ref(&s), &policy, &[], 23 * DAY_MS - 1);
        assert!(!d[0].purge);
        assert!(decide(&[s], &policy, &[], 23 * DAY_MS)[0].purge);
    }

    #[test]
    fn holds_match_on_every_criterion_they_give() {
        let s = summary(&[(Some("a"), 100)], &["MRN1"]);
        assert!(hold(Some("a"), None, None).covers(&s));
        assert!(!hold(Some("b"), None, None).covers(&s));
        assert!(hold(None, Some("MRN1"), None).covers(&s));
        assert!(!hold(Some("a"), Some("MRN2"), None).covers(&s));
        assert!(hold(None, None, Some((50, 101))).covers(&s));
        assert!(hold(None, None, Some((100, 200))).covers(&s));
        assert!(!hold(None, None, Some((101, 200))).covers(&s));
        let held =
            decide(&[s], &RetentionPolicy::default(), &[hold(Some("a"), None, None)], i64::MAX);
        assert!(!held[0].purge);
        assert_eq!(held[0].held_by, ["h"]);
    }

    #[test]
    fn short_retention_needs_force() {
        let p = RetentionPolicy { default_days: 365, projects: BTreeMap::new() };
        assert!(p.check(false).unwrap_err().contains("six years"));
        assert!(p.check(true).is_ok());
        let mut p = RetentionPolicy::default();
        assert!(p.check(false).is_ok());
        p.projects.insert("x".into(), 30);
        assert!(p.check(false).unwrap_err().contains("project \"x\""));
    }

    #[test]
    fn purge_events_vouch_for_every_run_and_start_with_the_prefix() {
        let seg = |a, b| PurgedSegment {
            first_seq: a,
            end_seq: b,
            oldest_recorded_ms: 0,
            newest_recorded_ms: 1,
            purged_at_ms: 2,
        };
        assert_eq!(runs(vec![(5, 9), (0, 5), (12, 20)]), [(0, 9), (12, 20)]);
        let going: Vec<PurgedSegment> = (0..70).map(|i| seg(i * 10, i * 10 + 10)).collect();
        let all: Vec<(u64, u64)> = (0..200).map(|i| (i * 100, i * 100 + 50)).collect();
        let events = purge_events("system:retention", &going, &all).unwrap();
        assert_eq!(events.len(), 2);
        let stored = |e: &auditrail_core::event::PreparedEvent| {
            let mut out = Vec::new();
            e.write_stored(0, 0, "x", &mut out);
            out
        };
        for e in &events {
            let bytes = stored(e);
            assert!(bytes.starts_with(PURGE_EVENT_PREFIX), "{}", String::from_utf8_lossy(&bytes));
        }
        assert_eq!(vouched_runs(&stored(&events[1])).unwrap(), all);
        assert_eq!(vouched_runs(&stored(&events[0])), None);
    }

    #[test]
    fn holds_are_checked() {
        assert!(hold(None, None, None).check().is_err());
        assert!(hold(None, None, Some((5, 5))).check().is_err());
        let mut h = hold(Some("a"), None, None);
        h.reason = " ".into();
        assert!(h.check().is_err());
    }
}
