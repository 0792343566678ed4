//! Scheduled backup to object storage (`archive_url`, `archive_interval_ms`), its state for
//! `GET /api/v1/security/status` and `/metrics`.
//!
//! Each run is [`auditrail_archive::backup_once`]: it reads the data directory like
//! `auditrail backup` does (no lock, cut to one checkpoint) and uploads only what the archive
//! lacks. A failed run (object store down, throttled) is retried with doubling delays up to
//! the interval; the next success picks up everything published meanwhile, so nothing is lost.

use auditrail_archive::{BackupReport, Destination};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// The first retry after a failure; doubles per failure up to the interval.
const RETRY_FIRST_MS: u64 = 500;

/// The archiver's progress, shared with the HTTP handlers.
#[derive(Debug)]
pub struct BackupMonitor {
    pub url: String,
    pub interval_ms: u64,
    state: Mutex<Progress>,
}

#[derive(Debug, Default, Clone)]
struct Progress {
    last_manifest: Option<String>,
    last_success_ms: Option<i64>,
    archived_tree_size: u64,
    last_error: Option<String>,
    consecutive_failures: u64,
}

/// The `backup` section of the security status: scheduled backup to object storage
/// (`archive_url`).
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackupStatus {
    /// Whether `archive_url` is set; when false the other fields are null or zero.
    pub enabled: bool,
    /// The archive URL (credentials are never part of it).
    pub url: Option<String>,
    pub interval_ms: Option<u64>,
    /// The newest manifest written or confirmed, `<tree size>-<unix ms>.json`.
    pub last_manifest: Option<String>,
    /// When the last backup run succeeded (RFC 3339).
    pub last_success_at: Option<String>,
    /// Tree size covered by the newest manifest.
    pub archived_tree_size: u64,
    /// Tree size of the newest checkpoint of the log.
    pub published_tree_size: u64,
    /// `published_tree_size - archived_tree_size`.
    pub lag_events: u64,
    /// Seconds since the last successful run while events wait (0 when up to date): an upper
    /// bound of the age of the oldest event not yet archived.
    pub lag_seconds: u64,
    /// The last run's error, cleared by a success.
    pub last_error: Option<String>,
    pub consecutive_failures: u64,
}

impl BackupMonitor {
    pub fn new(url: &str, interval_ms: u64) -> BackupMonitor {
        BackupMonitor { url: url.to_string(), interval_ms, state: Mutex::new(Progress::default()) }
    }

    fn progress(&self) -> Progress {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn record(&self, result: &Result<BackupReport, auditrail_archive::ArchiveError>) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(r) => {
                p.last_manifest = Some(r.manifest.clone());
                p.last_success_ms = Some(crate::now_ms());
                p.archived_tree_size = r.tree_size;
                p.last_error = None;
                p.consecutive_failures = 0;
            }
            Err(e) => {
                p.last_error = Some(e.to_string());
                p.consecutive_failures += 1;
            }
        }
    }

    /// The status against the log's published size. The lag in seconds is an upper bound:
    /// the time since the last successful run, while events wait to be archived.
    pub fn status(&self, published: u64) -> BackupStatus {
        let p = self.progress();
        let lag_events = published.saturating_sub(p.archived_tree_size);
        let lag_seconds = match (lag_events, p.last_success_ms) {
            (0, _) => 0,
            (_, Some(t)) => (crate::now_ms().saturating_sub(t) / 1000) as u64,
            (_, None) => 0,
        };
        BackupStatus {
            enabled: true,
            url: Some(self.url.clone()),
            interval_ms: Some(self.interval_ms),
            last_manifest: p.last_manifest,
            last_success_at: p.last_success_ms.map(auditrail_core::time::format_millis),
            archived_tree_size: p.archived_tree_size,
            published_tree_size: published,
            lag_events,
            lag_seconds,
            last_error: p.last_error,
            consecutive_failures: p.consecutive_failures,
        }
    }

    pub fn last_success_ms(&self) -> Option<i64> {
        self.progress().last_success_ms
    }
}

impl BackupStatus {
    pub fn disabled(published: u64) -> BackupStatus {
        BackupStatus {
            enabled: false,
            url: None,
            interval_ms: None,
            last_manifest: None,
            last_success_at: None,
            archived_tree_size: 0,
            published_tree_size: published,
            lag_events: 0,
            lag_seconds: 0,
            last_error: None,
            consecutive_failures: 0,
        }
    }
}

/// The delay before the next run: the interval after a success, doubling retries after
/// failures.
pub fn next_delay_ms(interval_ms: u64, consecutive_failures: u64) -> u64 {
    if consecutive_failures == 0 {
        return interval_ms;
    }
    let shift = (consecutive_failures - 1).min(20) as u32;
    (RETRY_FIRST_MS << shift).min(interval_ms.max(RETRY_FIRST_MS))
}

/// Runs backups forever (the caller aborts the task at shutdown).
pub async fn run_scheduled(
    dest: Destination,
    data: PathBuf,
    monitor: std::sync::Arc<BackupMonitor>,
) {
    loop {
        let result = auditrail_archive::backup_once(&dest, &data).await;
        match &result {
            // Nothing published yet is not a failure.
            Err(auditrail_archive::ArchiveError::NotReady(_)) => {}
            Err(e) => eprintln!("auditrail: backup to {}: {e}", dest.url),
            Ok(_) => {}
        }
        if !matches!(result, Err(auditrail_archive::ArchiveError::NotReady(_))) {
            monitor.record(&result);
        }
        let failures = monitor.progress().consecutive_failures;
        tokio::time::sleep(Duration::from_millis(next_delay_ms(monitor.interval_ms, failures)))
            .await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn retries_back_off_up_to_the_interval() {
        let d: Vec<u64> = (0..6).map(|f| super::next_delay_ms(3000, f)).collect();
        assert_eq!(d, [3000, 500, 1000, 2000, 3000, 3000]);
        assert_eq!(super::next_delay_ms(100, 3), 500);
    }
}
