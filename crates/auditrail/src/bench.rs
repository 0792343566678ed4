//! `auditrail bench append`: durable appends through the real store, next to this machine's
//! raw limits for the same bytes measured in the same run.

use crate::generator::Generator;
use anyhow::{Context as _, Result};
use auditrail_core::event::ClientEvent;
use auditrail_store::audit::audit;
use auditrail_store::io::StdIo;
use auditrail_store::keys::Keys;
use auditrail_store::{Options, Store};
use clap::Subcommand;
use sha2::Digest as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Sustained durable appends, then a full audit of what was written.
    Append {
        /// Events to append.
        #[arg(long, default_value_t = 2_000_000)]
        events: usize,
        /// Threads parsing, validating and appending (as import or HTTP handlers would).
        #[arg(long, default_value_t = 4)]
        producers: usize,
        /// Events per append call.
        #[arg(long, default_value_t = 2048)]
        batch: usize,
        /// Where to put the log (a fresh temporary directory by default).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Skip the audit at the end.
        #[arg(long)]
        no_verify: bool,
        /// Keep the log afterwards (to try `verify`, `export` or recovery on a large log).
        #[arg(long)]
        keep: bool,
    },
    /// The service end to end over loopback HTTP: bulk and single-event ingest, patient lookups,
    /// 30-day counts, bytes on disk; with ratios to a PostgreSQL baseline when given one.
    Http(crate::bench_http::HttpArgs),
    /// The patient access report of one patient with many events in a large log, against
    /// paging through the same events with the search, in the same session.
    Report(crate::bench_report::ReportArgs),
    /// The server's work in a patient lookup (index search, then reading the page's events
    /// from the log), in this process without HTTP, over a data directory `http --keep` left.
    Lookup(crate::bench_lookup::LookupArgs),
    /// The CPU cost per event of each step of bulk ingest and indexing (parse, prepare,
    /// stored form, index document, memtable, freeze), one thread, no HTTP or disk.
    Stages(crate::bench_stages::StagesArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    let (events, producers, batch, dir, no_verify, keep) = match cmd {
        BenchCommand::Append { events, producers, batch, dir, no_verify, keep } => {
            (events, producers, batch, dir, no_verify, keep)
        }
        BenchCommand::Http(args) => return crate::bench_http::run(args),
        BenchCommand::Report(args) => return crate::bench_report::run(args),
        BenchCommand::Lookup(args) => return crate::bench_lookup::run(args),
        BenchCommand::Stages(args) => return crate::bench_stages::run(args),
    };
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("auditrail-bench-{}", std::process::id())),
    };
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    auditrail_store::init(&dir, "bench.auditrail.local/log")?;

    eprintln!("generating {events} events...");
    // About 10 ms apart, ending now, as an application would send them.
    let now_ms = crate::generator::now_millis();
    let mut generator = Generator::new(42, events as u64, events as i64 * 10, now_ms);
    let lines: Vec<String> = (0..events).map(|_| generator.next_line()).collect();
    let input_bytes: usize = lines.iter().map(|l| l.len()).sum();
    println!(
        "workload: {events} events, {:.0} bytes/event average JSON, {producers} producers x {batch} events per append",
        input_bytes as f64 / events as f64
    );

    // The store. Memory is reported as growth over the process before it opened, since the
    // generated input is held in memory too.
    let rss_before_store = rss_kib("VmRSS");
    let store = Store::open(&dir, Options::default())?;
    let syncs_before = store.io().sync_count();
    let latencies = Mutex::new(Vec::with_capacity(events / batch + 1));
    let rss_samples = Mutex::new(Vec::new());
    let started = Instant::now();
    let chunks: Vec<&[String]> = lines.chunks(batch).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| -> Result<()> {
        let mut handles = Vec::new();
        for _ in 0..producers {
            handles.push(s.spawn(|| -> Result<()> {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(chunk) = chunks.get(i) else { return Ok(()) };
                    let t = Instant::now();
                    let prepared = chunk
                        .iter()
                        .map(|l| {
                            ClientEvent::from_json(l.as_bytes()).and_then(ClientEvent::prepare)
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    store.append(prepared)?;
                    latencies.lock().unwrap().push(t.elapsed());
                    if i.is_multiple_of((chunks.len() / 4).max(1)) {
                        rss_samples.lock().unwrap().push((i * batch, rss_kib("VmRSS")));
                    }
                }
            }));
        }
        for h in handles {
            h.join().expect("producer thread panicked")?;
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();
    let syncs = store.io().sync_count() - syncs_before;
    let stages = store.close()?;
    assert_eq!(stages.sequenced as usize, events);

    let mut lat = latencies.into_inner().unwrap();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let secs = elapsed.as_secs_f64();
    let rate = events as f64 / secs;
    let disk = DiskUse::measure(&dir)?;
    println!("\n== store: durable appends ==");
    println!("events/s            {rate:>12.0}");
    println!("input MB/s          {:>12.1}", input_bytes as f64 / secs / 1e6);
    println!(
        "fsyncs/s            {:>12.0}  ({:.0} events per fsync)",
        syncs as f64 / secs,
        events as f64 / syncs.max(1) as f64
    );
    println!("ack latency p50     {:>12.2} ms  (one append call of {batch})", ms(pct(0.50)));
    println!("ack latency p99     {:>12.2} ms", ms(pct(0.99)));
    println!(
        "bytes on disk/event {:>12.1}  (allocated {:.1}; segments {:.1}, tiles+bundles {:.1}, checkpoints {:.1})",
        disk.total() as f64 / events as f64,
        disk.allocated as f64 / events as f64,
        disk.segments as f64 / events as f64,
        disk.tiles as f64 / events as f64,
        disk.checkpoints as f64 / events as f64
    );
    let samples = rss_samples.into_inner().unwrap();
    println!(
        "store memory        {} (RSS growth since the store opened; the generated input is excluded)",
        samples
            .iter()
            .map(|(n, kib)| format!(
                "{:.0} MiB @{n}",
                kib.saturating_sub(rss_before_store) as f64 / 1024.0
            ))
            .collect::<Vec<_>>()
            .join(", "),
    );

    // Raw limits, same session: the same bytes written with the same number of fdatasyncs, and
    // SHA-256 over the same JSON.
    let raw = raw_write_fdatasync(&dir, disk.segments, syncs.max(1))?;
    let sha = sha256_rate(&lines);
    println!("\n== this machine, same bytes, same session ==");
    println!(
        "write+fdatasync     {:>12.1} MB/s: the same {} MB in the same {} fdatasyncs take {:.3}s, {:.1}% of the store's {:.3}s",
        disk.segments as f64 / raw / 1e6,
        disk.segments / 1_000_000,
        syncs,
        raw,
        100.0 * raw / secs,
        secs
    );
    println!(
        "SHA-256             {:>12.0} events/s ({:.2} GB/s) -> store appends at {:.2}x the speed of hashing the input once",
        events as f64 / sha,
        input_bytes as f64 / sha / 1e9,
        sha / secs
    );

    if !no_verify {
        let keys = Keys::load(&StdIo::new(&dir)).map_err(anyhow::Error::msg)?;
        let t = Instant::now();
        let report = audit(&StdIo::new(&dir), &keys, &mut |_| {})?;
        let vsecs = t.elapsed().as_secs_f64();
        anyhow::ensure!(report.ok(), "audit failed: {:?}", report.problems);
        println!("\n== verify (full audit) ==");
        println!(
            "events/s            {:>12.0}  ({} events, {} checkpoints, {:.2}s) -> {:.2}x SHA-256 of the input",
            report.events as f64 / vsecs,
            report.events,
            report.checkpoints,
            vsecs,
            sha / vsecs
        );
    }
    if keep {
        println!("\nkept the log in {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn rss_kib(field: &str) -> u64 {
    status_kib("self", field)
}

/// A `/proc/<pid>/status` memory field (`VmRSS`, `VmHWM`) in KiB; 0 if unreadable.
pub fn status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Bytes of a data directory's files, by part.
#[derive(Default)]
pub struct DiskUse {
    pub segments: u64,
    pub tiles: u64,
    pub checkpoints: u64,
    pub index: u64,
    /// Everything else (keys, history bookkeeping).
    pub other: u64,
    /// Blocks allocated to the log's files (segments, tiles, checkpoints).
    pub allocated: u64,
}

impl DiskUse {
    /// The log's bytes.
    pub fn total(&self) -> u64 {
        self.segments + self.tiles + self.checkpoints
    }

    /// Every byte in the directory: the log, the index and the rest.
    pub fn all(&self) -> u64 {
        self.total() + self.index + self.other
    }

    pub fn measure(dir: &Path) -> Result<DiskUse> {
        use std::os::unix::fs::MetadataExt as _;
        let mut d = DiskUse::default();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(p) = stack.pop() {
            for e in std::fs::read_dir(&p)? {
                let e = e?;
                let m = e.metadata()?;
                if m.is_dir() {
                    stack.push(e.path());
                    continue;
                }
                let rel = e.path().strip_prefix(dir)?.to_string_lossy().into_owned();
                let part = if rel.starts_with("segments/") {
                    &mut d.segments
                } else if rel.starts_with("log/tile") {
                    &mut d.tiles
                } else if rel.starts_with("log/checkpoint") || rel.starts_with("checkpoints/") {
                    &mut d.checkpoints
                } else if rel.starts_with("index/") {
                    d.index += m.len();
                    continue;
                } else {
                    d.other += m.len();
                    continue;
                };
                *part += m.len();
                d.allocated += m.blocks() * 512;
            }
        }
        Ok(d)
    }
}

/// Seconds to write `bytes` in `syncs` equal appends, each followed by fdatasync.
fn raw_write_fdatasync(dir: &Path, bytes: u64, syncs: u64) -> Result<f64> {
    let path = dir.join("raw-baseline");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0x5au8; (bytes / syncs).max(1) as usize];
    let t = Instant::now();
    for _ in 0..syncs {
        f.write_all(&chunk)?;
        f.sync_data()?;
    }
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&path)?;
    Ok(secs)
}

/// Seconds to SHA-256 every line once.
fn sha256_rate(lines: &[String]) -> f64 {
    let t = Instant::now();
    let mut acc = 0u8;
    for l in lines {
        acc ^= sha2::Sha256::digest(l.as_bytes())[0];
    }
    std::hint::black_box(acc);
    t.elapsed().as_secs_f64()
}
