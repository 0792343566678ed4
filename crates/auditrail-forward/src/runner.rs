//! The loop every forwarder runs: read a batch of durable events after the cursor, deliver it
//! (retrying what the destination could not take, with backoff), then advance the cursor.

use crate::backoff::Backoff;
use crate::config::ForwardConfig;
use crate::cursor::Cursor;
use crate::elasticsearch::Elasticsearch;
use crate::status::{
    ForwarderStatus, ForwardingStatus, Progress, STATE_OK, STATE_STOPPED, prometheus,
};
use crate::syslog::Syslog;
use crate::{FailedEvent, ForwardError, LogEvent};
use auditrail_store::Store;
use auditrail_store::retention::Purged;
use auditrail_store::tail::LogTail;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a destination did with the events it was given.
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    /// Refused for good: skipped and reported.
    pub failed: Vec<FailedEvent>,
    /// Positions (in the slice given) to send again after a backoff (429, 5xx).
    pub retry: Vec<usize>,
    /// Why some must be retried.
    pub error: Option<String>,
}

pub(crate) enum Destination {
    Elasticsearch(Box<Elasticsearch>),
    Syslog(Box<Syslog>),
}

impl Destination {
    async fn send(&mut self, events: &[&LogEvent]) -> Result<Delivery, ForwardError> {
        match self {
            Destination::Elasticsearch(d) => d.send(events).await,
            Destination::Syslog(d) => d.send(events).await,
        }
    }
}

/// The running forwarders of one server.
pub struct Forwarding {
    progress: Vec<Arc<Progress>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding").field("forwarders", &self.progress.len()).finish()
    }
}

struct Settings {
    batch_events_max: usize,
    poll_interval: Duration,
    backoff: Backoff,
}

impl Forwarding {
    /// No forwarders (forwarding off).
    pub fn disabled() -> Forwarding {
        Forwarding {
            progress: Vec::new(),
            tasks: Mutex::new(Vec::new()),
            stop: watch::channel(false).0,
        }
    }

    /// Starts the configured forwarders on `runtime`, each from its cursor under `data`.
    /// Configuration errors (unreadable CA files, say) are returned here; a destination that
    /// is down is not an error: the forwarder retries until it answers.
    pub fn start(
        config: &ForwardConfig,
        data: &Path,
        store: Arc<Store>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Forwarding, ForwardError> {
        config.check()?;
        let (stop, _) = watch::channel(false);
        let mut forwarding =
            Forwarding { progress: Vec::new(), tasks: Mutex::new(Vec::new()), stop };
        let mut planned = Vec::new();
        let es = &config.elasticsearch;
        if !es.url.is_empty() {
            let d = Elasticsearch::new(es)?;
            let settings = Settings {
                batch_events_max: es.batch_events_max,
                poll_interval: Duration::from_millis(es.poll_interval_ms),
                backoff: Backoff::new(es.backoff_initial_ms, es.backoff_max_ms),
            };
            planned.push((
                "elasticsearch",
                es.url.clone(),
                Destination::Elasticsearch(Box::new(d)),
                settings,
            ));
        }
        let sl = &config.syslog;
        if !sl.address.is_empty() {
            let d = Syslog::new(sl)?;
            let settings = Settings {
                batch_events_max: sl.batch_events_max,
                poll_interval: Duration::from_millis(sl.poll_interval_ms),
                backoff: Backoff::new(sl.backoff_initial_ms, sl.backoff_max_ms),
            };
            planned.push((
                "syslog",
                sl.address.clone(),
                Destination::Syslog(Box::new(d)),
                settings,
            ));
        }
        for (name, destination, d, settings) in planned {
            let mut cursor = Cursor::open(data, name)?;
            let log_end = store.stages().sequenced;
            if cursor.next_seq() > log_end {
                // The log was restored from an older backup: what it has now past its end
                // will be new events, so forwarding resumes from its end.
                eprintln!(
                    "auditrail: forward {name}: cursor {} is past the log's end {log_end}; resuming from {log_end}",
                    cursor.next_seq()
                );
                cursor.store(log_end)?;
            }
            let progress = Arc::new(Progress::new(name, destination, cursor.next_seq()));
            progress.log_end.store(log_end, Ordering::Relaxed);
            let task = runtime.spawn(run(
                d,
                store.clone(),
                cursor,
                progress.clone(),
                forwarding.stop.subscribe(),
                settings,
            ));
            forwarding.progress.push(progress);
            forwarding.tasks.lock().unwrap_or_else(|e| e.into_inner()).push(task);
        }
        Ok(forwarding)
    }

    pub fn status(&self) -> ForwardingStatus {
        ForwardingStatus { forwarders: self.statuses() }
    }

    fn statuses(&self) -> Vec<ForwarderStatus> {
        self.progress.iter().map(|p| p.status()).collect()
    }

    /// Appends the Prometheus series of every forwarder to `out`.
    pub fn prometheus(&self, out: &mut String) {
        prometheus(&self.statuses(), out);
    }

    /// Stops every forwarder (an undelivered batch is sent again after the next start) and
    /// waits for them, at most `wait` in all, so they drop their handles on the store.
    pub async fn stop(&self, wait: Duration) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = tokio::time::Instant::now() + wait;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                let _ = task.await;
            }
        }
    }
}

/// Waits `d`, or less if the forwarder is told to stop; true when it must stop.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// The durable log read forward from the cursor, a batch at a time.
struct Reader {
    tail: LogTail,
    pending: VecDeque<LogEvent>,
}

impl Reader {
    /// Up to `max` events after the last batch, never past `durable_end`.
    fn batch(
        &mut self,
        durable_end: u64,
        max: usize,
        purged: &Purged,
    ) -> Result<Vec<LogEvent>, ForwardError> {
        while self.pending.len() < max {
            // Retention erased these events before they could be sent (a destination down
            // for longer than the retention): nothing is left to send.
            if self.tail.skip_purged(purged).is_some() {
                continue;
            }
            let pending = &mut self.pending;
            let n = self.tail.read(durable_end, 1, |_, seq, record| {
                pending.push_back(LogEvent {
                    seq,
                    recorded_at_ms: record.recorded_at_ms,
                    canonical: record.canonical.to_vec(),
                });
                Ok(())
            })?;
            if n == 0 {
                break;
            }
        }
        let take = self.pending.len().min(max);
        Ok(self.pending.drain(..take).collect())
    }
}

async fn run(
    mut destination: Destination,
    store: Arc<Store>,
    mut cursor: Cursor,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
    mut settings: Settings,
) {
    let reader = Arc::new(Mutex::new(Reader {
        tail: store.tail(cursor.next_seq()),
        pending: VecDeque::new(),
    }));
    'batches: loop {
        if *stop.borrow() {
            break;
        }
        let log_end = store.stages().sequenced;
        progress.log_end.store(log_end, Ordering::Relaxed);
        let (r, max, s) = (reader.clone(), settings.batch_events_max, store.clone());
        let batch = tokio::task::spawn_blocking(move || {
            r.lock().unwrap_or_else(|e| e.into_inner()).batch(log_end, max, &s.purged())
        })
        .await
        .map_err(|e| ForwardError::Unavailable(format!("the log reader failed: {e}")))
        .and_then(|r| r);
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                progress.retrying(&e.to_string());
                if pause(&mut stop, settings.backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        };
        let Some(last) = batch.last() else {
            progress.oldest_pending_ms.store(0, Ordering::Relaxed);
            if pause(&mut stop, settings.poll_interval).await {
                break;
            }
            continue;
        };
        let end = last.seq + 1;
        assert_eq!(batch[0].seq, cursor.next_seq(), "batches follow the cursor contiguously");
        assert_eq!(end - batch[0].seq, batch.len() as u64, "seqs in a batch are contiguous");
        progress.oldest_pending_ms.store(batch[0].recorded_at_ms, Ordering::Relaxed);

        let mut todo: Vec<&LogEvent> = batch.iter().collect();
        let mut failed = 0u64;
        loop {
            // The log keeps growing during an outage: keep the lag true.
            progress.log_end.store(store.stages().sequenced, Ordering::Relaxed);
            // A send under way is finished even when told to stop, so a clean shutdown
            // records what the destination took and sends nothing twice; `stop` aborts a
            // send that outlasts its deadline (that batch goes again after the next start).
            let result = destination.send(&todo).await;
            let delivery = match result {
                Ok(d) => d,
                Err(e) => Delivery {
                    retry: (0..todo.len()).collect(),
                    error: Some(e.to_string()),
                    failed: Vec::new(),
                },
            };
            progress.refused(&delivery.failed);
            failed += delivery.failed.len() as u64;
            if delivery.retry.is_empty() {
                settings.backoff.reset();
                break;
            }
            let error = delivery.error.unwrap_or_else(|| "some events must be retried".into());
            progress.retrying(&format!(
                "{} of {} events not delivered: {error}",
                delivery.retry.len(),
                todo.len()
            ));
            todo = delivery.retry.iter().map(|&i| todo[i]).collect();
            if pause(&mut stop, settings.backoff.next_delay()).await {
                break 'batches;
            }
        }
        // Everything before `end` is delivered or refused for good: the cursor moves on.
        loop {
            let mut c = cursor;
            let stored = tokio::task::spawn_blocking(move || {
                let r = c.store(end);
                (c, r)
            })
            .await;
            match stored {
                Ok((c, Ok(()))) => {
                    cursor = c;
                    break;
                }
                Ok((c, Err(e))) => {
                    cursor = c;
                    progress.retrying(&e.to_string());
                    if pause(&mut stop, settings.backoff.next_delay()).await {
                        break 'batches;
                    }
                }
                Err(e) => {
                    // The blocking task panicked: the cursor is lost with it, so stop; the
                    // next start resends from the cursor on disk.
                    progress.retrying(&format!("writing the cursor failed: {e}"));
                    break 'batches;
                }
            }
        }
        progress.sent.fetch_add(batch.len() as u64 - failed, Ordering::Relaxed);
        progress.next_seq.store(end, Ordering::Relaxed);
        progress.state.store(STATE_OK, Ordering::Relaxed);
    }
    progress.state.store(STATE_STOPPED, Ordering::Relaxed);
}
