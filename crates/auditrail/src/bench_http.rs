//! `auditrail bench http`: the service end to end over loopback HTTP, as applications and
//! auditors use it. It starts `auditrail serve` as a child process on a fresh data directory and
//! runs, in order (the same order as `bench/postgres-baseline.sh`):
//!
//! 1. bulk NDJSON ingest of `--events` generated events spread over the last year, sampling the
//!    index lag (the age of the oldest durable event not yet searchable) as it goes;
//! 2. patient lookups: "this patient's events in the last year, newest first, first page of
//!    50", patients drawn with the workload's skew, one at a time;
//! 3. 30-day counts by action over everything;
//! 4. single-event `POST /api/v1/events` from `--concurrency` connections;
//! 5. bytes on disk per event (log + index, everything in the data directory) after a clean stop.
//!
//! Latencies are client-side (they include loopback and HTTP), so the server-side figure is lower.
//! The last line printed is one JSON object; with `--baseline` (the JSON line that
//! `bench/postgres-baseline.sh` prints) each figure is also given as a ratio to PostgreSQL's.

use crate::bench::{DiskUse, status_kib};
use crate::generator::{Generator, YEAR_MS, now_millis};
use anyhow::{Context as _, Result, bail, ensure};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct HttpArgs {
    /// Events to ingest in bulk (the size of the data set the queries run over).
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// NDJSON lines per bulk request.
    #[arg(long, default_value_t = 10_000)]
    bulk_lines: usize,
    /// Connections sending bulk requests at once.
    #[arg(long, default_value_t = 2)]
    bulk_connections: usize,
    /// Connections sending single events at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// How long to send single events (0 skips this phase).
    #[arg(long, default_value_t = 10)]
    single_seconds: u64,
    /// Patient lookups to time (after a warm-up of a tenth as many).
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    /// 30-day counts to time.
    #[arg(long, default_value_t = 50)]
    count_runs: usize,
    /// Write each timed lookup's client, server, index and log milliseconds to this file
    /// (tab-separated, one line per lookup), to sort the slow ones by where they spent it.
    #[arg(long)]
    lookup_log: Option<PathBuf>,
    /// A program that times `N` lookups of the baseline (PostgreSQL's) when run as `PROGRAM N`,
    /// printing each one's milliseconds on a line (`bench/postgres-baseline.sh --lookups-script`
    /// writes one). The lookups are then timed in rounds, the baseline's and ours in turn, so
    /// that both see the same minutes of this machine's host.
    #[arg(long)]
    baseline_lookups: Option<PathBuf>,
    #[command(flatten)]
    data: BenchDir,
    /// PostgreSQL's figures: the JSON line `bench/postgres-baseline.sh` printed last, or a file
    /// holding it.
    #[arg(long)]
    baseline: Option<String>,
}

/// Where a benchmark's server keeps its data, shared by `bench http` and `bench report`.
#[derive(clap::Args)]
pub struct BenchDir {
    /// The data directory (a fresh temporary one by default; cleared first: what it held is
    /// moved aside and deleted once the run is over).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the data directory afterwards (then `--reuse` it to skip the load next time).
    #[arg(long)]
    pub keep: bool,
    /// Use the events already in `--dir` instead of clearing it and loading new ones.
    #[arg(long, requires = "dir")]
    pub reuse: bool,
    /// The previous contents of `dir`, deleted by [`BenchDir::finish`].
    #[arg(skip)]
    stale: std::cell::RefCell<Option<PathBuf>>,
}

impl BenchDir {
    /// The directory to use, cleared unless reused; `name` tells temporary ones apart.
    pub fn prepare(&self, name: &str) -> Result<PathBuf> {
        let dir = self.dir.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!("auditrail-bench-{name}-{}", std::process::id()))
        });
        if !self.reuse && dir.exists() {
            // Deleted after the run, not before it: ext4 skips over recently freed inodes when
            // it allocates new ones, so a load that follows the deletion of a large data
            // directory (hundreds of thousands of tile files) spends a twentieth of the
            // machine in the kernel creating its own tile files, which no real server does.
            let mut stale = dir.clone().into_os_string();
            stale.push(format!(".stale-{}", std::process::id()));
            let stale = PathBuf::from(stale);
            std::fs::rename(&dir, &stale)
                .with_context(|| format!("cannot move {} aside", dir.display()))?;
            *self.stale.borrow_mut() = Some(stale);
        }
        Ok(dir)
    }

    /// Keeps the directory when asked to (or reused), else removes it.
    pub fn finish(&self, dir: &std::path::Path) {
        if self.keep || self.reuse {
            println!("\nkept the data in {}", dir.display());
        } else {
            std::fs::remove_dir_all(dir).ok();
        }
        if let Some(stale) = self.stale.borrow_mut().take() {
            std::fs::remove_dir_all(stale).ok();
        }
    }
}

pub fn run(args: HttpArgs) -> Result<()> {
    let dir = args.data.prepare("http")?;
    let baseline = args.baseline.as_deref().map(read_baseline).transpose()?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut server = ServerProcess::spawn(&dir)?;
    let addr = server.addr.clone();
    // The lookups and counts are timed one at a time on one connection: a runtime on one
    // thread drives them, so the client's own hand-offs between threads add nothing to them.
    let sequential = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = workload(&args, &addr, &server, &runtime, &sequential);
    let stopped = server.stop();
    let mut report = result?;
    stopped?;

    let disk = DiskUse::measure(&dir)?;
    let events = report["events_total"].as_u64().unwrap_or(0).max(1);
    report["bytes_per_event"] = json!(round1(disk.all() as f64 / events as f64));
    println!("\n== on disk after a clean stop ==");
    println!(
        "bytes/event         {:>12.1}  (log segments {:.1}, tiles+bundles+checkpoints {:.1}, index {:.1}, other {:.1}; {} events)",
        disk.all() as f64 / events as f64,
        disk.segments as f64 / events as f64,
        (disk.tiles + disk.checkpoints) as f64 / events as f64,
        disk.index as f64 / events as f64,
        disk.other as f64 / events as f64,
        events
    );
    println!(
        "server peak RSS     {:>12.0} MiB",
        report["server_peak_rss_mib"].as_f64().unwrap_or(0.0)
    );
    if let Some(pg) = &baseline {
        print_ratios(&report, pg);
    }
    args.data.finish(&dir);
    println!("{report}");
    Ok(())
}

fn workload(
    args: &HttpArgs,
    addr: &str,
    server: &ServerProcess,
    runtime: &tokio::runtime::Runtime,
    sequential: &tokio::runtime::Runtime,
) -> Result<Value> {
    let mut report = json!({"system": "auditrail", "events": args.events});
    let end_ms = now_millis();
    if !args.data.reuse {
        runtime.block_on(bulk_phase(args, addr, end_ms, &mut report))?;
    }
    let through = runtime.block_on(wait_indexed(addr))?;
    report["events"] = json!(through);

    sequential.block_on(async {
        lookup_phase(args, addr, &mut report).await?;
        count_phase(args, addr, &mut report).await
    })?;
    runtime.block_on(single_phase(args, addr, &mut report))?;
    report["events_total"] = json!(runtime.block_on(wait_indexed(addr))?);
    report["server_peak_rss_mib"] = json!(round1(server.rss_kib("VmHWM") as f64 / 1024.0));
    Ok(report)
}

async fn bulk_phase(args: &HttpArgs, addr: &str, end_ms: i64, report: &mut Value) -> Result<()> {
    eprintln!("generating {} events over the last year...", args.events);
    let mut generator = Generator::new(42, args.events, YEAR_MS, end_ms);
    let mut bodies = Vec::new();
    let mut input_bytes = 0usize;
    let mut left = args.events;
    while left > 0 {
        let n = left.min(args.bulk_lines as u64);
        let mut body = String::with_capacity(n as usize * 450);
        for _ in 0..n {
            body.push_str(&generator.next_line());
            body.push('\n');
        }
        input_bytes += body.len();
        bodies.push(Bytes::from(body));
        left -= n;
    }
    println!(
        "workload: {} events, {:.0} bytes/event as JSON, {} lines per bulk request, {} connections",
        args.events,
        input_bytes as f64 / args.events.max(1) as f64,
        args.bulk_lines,
        args.bulk_connections
    );

    let host = HostCpu::now();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn(sample_lag(addr.to_string(), done.clone()));
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..args.bulk_connections {
        let (bodies, next) = (bodies.clone(), next.clone());
        let mut conn = Conn::open(addr).await?;
        senders.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Some(body) = bodies.get(next.fetch_add(1, Ordering::Relaxed)) {
                let t = Instant::now();
                let (status, answer) = conn
                    .request("POST", "/api/v1/events/bulk", "application/x-ndjson", body.clone())
                    .await?;
                latencies.push(t.elapsed());
                ensure!(
                    status == 200 && answer.starts_with(b"{\"errors\":false"),
                    "bulk request answered {status}: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(300)])
                );
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for s in senders {
        latencies.extend(s.await??);
    }
    let acked = started.elapsed();
    let through = wait_indexed(addr).await?;
    let caught_up = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let max_lag = sampler.await??;
    ensure!(through >= args.events, "only {through} of {} events are searchable", args.events);

    let rate = args.events as f64 / acked.as_secs_f64();
    let lat = Percentiles::of(latencies);
    println!("\n== bulk NDJSON ingest (POST /api/v1/events/bulk) ==");
    println!(
        "events/s            {rate:>12.0}  ({} events acknowledged in {:.2}s)",
        args.events,
        acked.as_secs_f64()
    );
    println!(
        "request latency     {:>12.1} ms p50, {:.1} ms p99 ({} lines each)",
        lat.ms(0.5),
        lat.ms(0.99),
        args.bulk_lines
    );
    println!(
        "index lag           {:>12.3} s at most while ingesting; all searchable {:.3}s after the last acknowledgement",
        max_lag.as_secs_f64(),
        (caught_up - acked).as_secs_f64()
    );
    report["bulk_events_per_s"] = json!(rate.round());
    report["bulk_index_lag_max_s"] = json!(round3(max_lag.as_secs_f64()));
    report["bulk_index_catch_up_s"] = json!(round3((caught_up - acked).as_secs_f64()));
    host.since().print();
    Ok(())
}

/// Polls `/metrics` every 50 ms while the bulk load runs and returns the largest index lag seen,
/// as time: how long ago the log first held more events than the index has now.
async fn sample_lag(addr: String, done: Arc<AtomicBool>) -> Result<Duration> {
    let mut conn = Conn::open(&addr).await?;
    let started = Instant::now();
    let mut history: Vec<(Duration, u64)> = Vec::new(); // (when, events durable then)
    let mut max_lag = Duration::ZERO;
    while !done.load(Ordering::Relaxed) {
        let m = conn.metrics().await?;
        let now = started.elapsed();
        history.push((now, m.sequenced));
        // The oldest sample at which the log already held an event the index still lacks.
        let first_ahead = history.partition_point(|&(_, durable)| durable <= m.indexed);
        if let Some(&(since, _)) = history.get(first_ahead) {
            max_lag = max_lag.max(now - since);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(max_lag)
}

/// What a lookup's client needs of a page: its events counted, each one checked to be JSON
/// but not built into a `Value` (which took a quarter of this machine's two cores, all of
/// it competing with the server being measured).
#[derive(serde::Deserialize)]
struct SearchPage {
    events: Vec<serde::de::IgnoredAny>,
}

/// Rounds of lookups when they alternate with the baseline's (`--baseline-lookups`).
const INTERLEAVED_ROUNDS: usize = 10;
const ROUND_PAUSE: Duration = Duration::from_millis(200);

async fn lookup_phase(args: &HttpArgs, addr: &str, report: &mut Value) -> Result<()> {
    let mut conn = Conn::open(addr).await?;
    // Only its patient draw is used (a separate seed from the loaded events').
    let mut patients = Generator::new(7, 1, 1, 0);
    let mut lookup_log = String::new();
    // Alone, as PostgreSQL's own lookup phase is timed: the like-for-like pair with that one.
    let warm_up = (args.lookups / 10).max(1);
    let alone = time_lookups(&mut conn, &mut patients, warm_up, args, None).await?;
    println!("\n== patient lookup (a patient's last year, newest first, first 50) ==");
    alone.print(args.lookups, report, "lookup");
    lookup_log.push_str(&alone.log_lines("alone"));
    // Then again in rounds in turn with PostgreSQL's, which then sees the same minutes of
    // this machine's host: the like-for-like pair of the two in the same run.
    if let Some(program) = &args.baseline_lookups {
        let in_turn = time_lookups(&mut conn, &mut patients, 0, args, Some(program)).await?;
        println!(
            "\n== patient lookup, {INTERLEAVED_ROUNDS} rounds in turn with PostgreSQL's (the same lookups) =="
        );
        in_turn.print(args.lookups, report, "lookup_in_turn");
        lookup_log.push_str(&in_turn.log_lines("in_turn"));
        let pg = Percentiles::of(in_turn.baseline);
        println!(
            "  PostgreSQL        {:>12.3} ms p50, {:.3} ms p99, {:.3} ms p99.9  ({} lookups in the same {INTERLEAVED_ROUNDS} rounds)",
            pg.ms(0.5),
            pg.ms(0.99),
            pg.ms(0.999),
            pg.0.len(),
        );
        report["baseline_interleaved_lookup_p50_ms"] = json!(round3(pg.ms(0.5)));
        report["baseline_interleaved_lookup_p99_ms"] = json!(round3(pg.ms(0.99)));
        report["baseline_interleaved_lookup_p999_ms"] = json!(round3(pg.ms(0.999)));
    }
    if let Some(path) = &args.lookup_log {
        let header = "client_ms\tserver_ms\tindex_ms\tlog_ms\tevents\tpass\n";
        std::fs::write(path, header.to_string() + &lookup_log)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One pass of timed lookups: ours, each split into the server's parts, and, with a baseline
/// program, as many of the baseline's in [`INTERLEAVED_ROUNDS`] rounds in turn with ours.
struct LookupPass {
    client: Vec<Duration>,
    server: Vec<Duration>,
    /// The server's time in the index and reading events from the log (`None`: not reported).
    parts: Vec<(Option<Duration>, Option<Duration>)>,
    events_found: Vec<usize>,
    baseline: Vec<Duration>,
    host: HostShare,
}

async fn time_lookups(
    conn: &mut Conn,
    patients: &mut Generator,
    warm_up: usize,
    args: &HttpArgs,
    baseline: Option<&Path>,
) -> Result<LookupPass> {
    let from = auditrail_core::time::format_millis(now_millis() - YEAR_MS);
    let mut pass = LookupPass {
        client: Vec::with_capacity(args.lookups),
        server: Vec::with_capacity(args.lookups),
        parts: Vec::with_capacity(args.lookups),
        events_found: Vec::with_capacity(args.lookups),
        baseline: Vec::new(),
        host: HostShare::default(),
    };
    let rounds = if baseline.is_some() { INTERLEAVED_ROUNDS } else { 1 };
    let (mut round, mut round_end) = (0, warm_up);
    let host = HostCpu::now();
    for i in 0..warm_up + args.lookups {
        while i == round_end && round < rounds {
            round += 1;
            round_end = warm_up + round * args.lookups / rounds;
            if let Some(program) = baseline
                && round_end > i
            {
                // Each side starts its round once the other's work has settled (our server
                // seals and indexes the traces of its reads just after them).
                tokio::time::sleep(ROUND_PAUSE).await;
                pass.baseline.extend(baseline_lookups(program, round_end - i)?);
                tokio::time::sleep(ROUND_PAUSE).await;
                // The baseline's round starts with one untimed lookup (it prepares its
                // statement); so does ours, after the same pause.
                lookup(conn, patients, &from).await?;
            }
        }
        let t = Instant::now();
        let body = lookup(conn, patients, &from).await?;
        let took = t.elapsed();
        if i >= warm_up {
            pass.client.push(took);
            pass.server.push(conn.server_time.context("no Server-Timing total")?);
            let part = |wanted: &str| {
                conn.server_timing.iter().find(|(name, _)| name == wanted).map(|(_, d)| *d)
            };
            pass.parts.push((part("index"), part("log")));
            pass.events_found.push(serde_json::from_slice::<SearchPage>(&body)?.events.len());
        }
    }
    pass.host = host.since();
    Ok(pass)
}

/// One patient's lookup: the page's body.
async fn lookup(conn: &mut Conn, patients: &mut Generator, from: &str) -> Result<Bytes> {
    let path = format!("/api/v1/events?patient={}&from={from}&limit=50", patients.patient_id());
    let (status, body) = conn.request("GET", &path, "", Bytes::new()).await?;
    ensure!(status == 200, "lookup answered {status}: {}", String::from_utf8_lossy(&body));
    Ok(body)
}

impl LookupPass {
    /// Prints the pass and records its figures under `{key}_p50_ms` and the like.
    fn print(&self, lookups: usize, report: &mut Value, key: &str) {
        let lat = Percentiles::of(self.client.clone());
        let server = Percentiles::of(self.server.clone());
        let found: usize = self.events_found.iter().sum();
        println!(
            "latency             {:>12.3} ms p50, {:.3} ms p99, {:.3} ms p99.9  ({lookups} lookups, {:.1} events per page on average)",
            lat.ms(0.5),
            lat.ms(0.99),
            lat.ms(0.999),
            found as f64 / lookups.max(1) as f64
        );
        println!(
            "  server-side       {:>12.3} ms p50, {:.3} ms p99, {:.3} ms p99.9  (Server-Timing total)",
            server.ms(0.5),
            server.ms(0.99),
            server.ms(0.999),
        );
        let in_index = Percentiles::of(self.parts.iter().filter_map(|p| p.0).collect());
        let in_log = Percentiles::of(self.parts.iter().filter_map(|p| p.1).collect());
        println!(
            "    of which index  {:>12.3} ms p50, {:.3} ms p99; log {:.3} ms p50, {:.3} ms p99",
            in_index.ms(0.5),
            in_index.ms(0.99),
            in_log.ms(0.5),
            in_log.ms(0.99),
        );
        self.host.print();
        report[format!("{key}_p50_ms")] = json!(round3(lat.ms(0.5)));
        report[format!("{key}_p99_ms")] = json!(round3(lat.ms(0.99)));
        report[format!("{key}_p999_ms")] = json!(round3(lat.ms(0.999)));
        report[format!("{key}_server_p50_ms")] = json!(round3(server.ms(0.5)));
        report[format!("{key}_server_p99_ms")] = json!(round3(server.ms(0.99)));
        report[format!("{key}_host_steal_pct")] = json!(round1(self.host.steal_pct));
    }

    /// One tab-separated line per timed lookup, to sort the slow ones by where they spent it.
    fn log_lines(&self, pass: &str) -> String {
        let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
        let mut lines = String::new();
        for (i, &client) in self.client.iter().enumerate() {
            lines.push_str(&format!(
                "{:.3}\t{:.3}\t{:.3}\t{:.3}\t{}\t{pass}\n",
                ms(Some(client)),
                ms(Some(self.server[i])),
                ms(self.parts[i].0),
                ms(self.parts[i].1),
                self.events_found[i],
            ));
        }
        lines
    }
}

async fn count_phase(args: &HttpArgs, addr: &str, report: &mut Value) -> Result<()> {
    let mut conn = Conn::open(addr).await?;
    let from = auditrail_core::time::format_millis(now_millis() - 30 * 86_400_000);
    let path = format!("/api/v1/events/stats?group_by=action&from={from}");
    let mut latencies = Vec::with_capacity(args.count_runs);
    let mut server_side = Vec::with_capacity(args.count_runs);
    let mut counted = 0;
    let host = HostCpu::now();
    for i in 0..args.count_runs + 2 {
        let t = Instant::now();
        let (status, body) = conn.request("GET", &path, "", Bytes::new()).await?;
        let took = t.elapsed();
        ensure!(status == 200, "count answered {status}: {}", String::from_utf8_lossy(&body));
        if i >= 2 {
            latencies.push(took);
            server_side.push(conn.server_time.context("no Server-Timing total")?);
        }
        counted = serde_json::from_slice::<Value>(&body)?["total"].as_u64().unwrap_or(0);
    }
    let lat = Percentiles::of(latencies);
    let server = Percentiles::of(server_side);
    println!("\n== 30-day count by action (GET /api/v1/events/stats) ==");
    println!(
        "latency             {:>12.3} ms p50, {:.3} ms p99  ({} runs, {counted} events counted)",
        lat.ms(0.5),
        lat.ms(0.99),
        args.count_runs
    );
    println!(
        "  server-side       {:>12.3} ms p50, {:.3} ms p99  (Server-Timing total)",
        server.ms(0.5),
        server.ms(0.99),
    );
    report["count30d_server_p99_ms"] = json!(round3(server.ms(0.99)));
    host.since().print();
    report["count30d_p50_ms"] = json!(round3(lat.ms(0.5)));
    report["count30d_p99_ms"] = json!(round3(lat.ms(0.99)));
    Ok(())
}

async fn single_phase(args: &HttpArgs, addr: &str, report: &mut Value) -> Result<()> {
    if args.single_seconds == 0 || args.concurrency == 0 {
        return Ok(());
    }
    let host = HostCpu::now();
    // A pool of distinct events, reused if the run outlasts it (the server assigns each a new id).
    let pool_size = 50_000 * args.single_seconds as usize;
    let mut generator = Generator::new(43, pool_size as u64, YEAR_MS, now_millis());
    let pool: Arc<Vec<Bytes>> =
        Arc::new((0..pool_size).map(|_| Bytes::from(generator.next_line())).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.single_seconds);
    let mut clients = Vec::new();
    for _ in 0..args.concurrency {
        let (pool, next) = (pool.clone(), next.clone());
        let mut conn = Conn::open(addr).await?;
        clients.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let body = pool[next.fetch_add(1, Ordering::Relaxed) % pool.len()].clone();
                let t = Instant::now();
                let (status, answer) =
                    conn.request("POST", "/api/v1/events", "application/json", body).await?;
                latencies.push(t.elapsed());
                ensure!(
                    status == 201,
                    "single event answered {status}: {}",
                    String::from_utf8_lossy(&answer)
                );
            }
            anyhow::Ok(latencies)
        }));
    }
    let started = Instant::now();
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    let sent = latencies.len();
    let lat = Percentiles::of(latencies);
    let rate = sent as f64 / secs;
    println!("\n== single events (POST /api/v1/events, {} connections) ==", args.concurrency);
    println!("events/s            {rate:>12.0}  ({sent} events in {secs:.2}s)");
    println!(
        "latency             {:>12.2} ms p50, {:.2} ms p99, {:.2} ms p99.9",
        lat.ms(0.5),
        lat.ms(0.99),
        lat.ms(0.999)
    );
    report["single_events_per_s"] = json!(rate.round());
    report["single_p50_ms"] = json!(round3(lat.ms(0.5)));
    report["single_p99_ms"] = json!(round3(lat.ms(0.99)));
    report["single_p999_ms"] = json!(round3(lat.ms(0.999)));
    host.since().print();
    Ok(())
}

/// Waits until every durable event is searchable and returns how many that is.
pub(crate) async fn wait_indexed(addr: &str) -> Result<u64> {
    let mut conn = Conn::open(addr).await?;
    for _ in 0..60_000 {
        let m = conn.metrics().await?;
        if m.indexed >= m.sequenced {
            return Ok(m.indexed);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("the index did not catch up with the log within 5 minutes")
}

/// Ratios to PostgreSQL, each oriented so that > 1 means auditrail is better.
fn print_ratios(ours: &Value, pg: &Value) {
    println!(
        "\n== auditrail vs PostgreSQL 15 (hash-chained table; {} events there) ==",
        pg["events"]
    );
    println!("{:<22}{:>14}{:>14}{:>10}", "figure", "auditrail", "postgresql", "ratio");
    let rows: [(&str, bool); 9] = [
        ("bulk_events_per_s", true),
        ("single_events_per_s", true),
        ("single_p99_ms", false),
        ("lookup_p50_ms", false),
        ("lookup_p99_ms", false),
        ("lookup_p999_ms", false),
        ("count30d_p50_ms", false),
        ("count30d_p99_ms", false),
        ("bytes_per_event", false),
    ];
    for (key, higher_is_better) in rows {
        let (Some(a), Some(b)) = (ours[key].as_f64(), pg[key].as_f64()) else { continue };
        let ratio = if higher_is_better { a / b } else { b / a };
        println!("{key:<22}{a:>14.3}{b:>14.3}{:>9.2}x", ratio);
    }
    // The same lookups timed in turn with PostgreSQL's, minutes apart from neither.
    for p in ["p50", "p99", "p999"] {
        let key = format!("baseline_interleaved_lookup_{p}_ms");
        let ours_in_turn = ours[format!("lookup_in_turn_{p}_ms")].as_f64();
        let (Some(a), Some(b)) = (ours_in_turn, ours[&key].as_f64()) else {
            continue;
        };
        println!("{:<22}{a:>14.3}{b:>14.3}{:>9.2}x", format!("lookup_{p}_ms, in turn"), b / a);
    }
    println!("(ratio > 1: auditrail is better by that factor)");
}

/// Runs `program n` (the baseline's lookups) and reads the milliseconds it prints, one a line.
fn baseline_lookups(program: &Path, n: usize) -> Result<Vec<Duration>> {
    let out = Command::new(program)
        .arg(n.to_string())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", program.display()))?;
    ensure!(out.status.success(), "{} failed: {}", program.display(), out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    let times = text
        .lines()
        .map(|l| l.trim().parse::<f64>().map(|ms| Duration::from_secs_f64(ms / 1e3)))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| {
            format!("{} printed something other than milliseconds", program.display())
        })?;
    ensure!(times.len() == n, "{} timed {} lookups, not {n}", program.display(), times.len());
    Ok(times)
}

/// The host's share of this machine during a phase: CPU time the hypervisor gave to others
/// while we wanted it (steal), and how often some task waited for a CPU (pressure). Neither
/// is ours to control, and both move every latency figure; printed so that a slow run can be
/// told from a slow program.
struct HostCpu {
    started: Instant,
    steal_ticks: u64,
    all_ticks: u64,
    pressure_us: u64,
}

#[derive(Default)]
struct HostShare {
    steal_pct: f64,
    pressure_pct: f64,
}

impl HostCpu {
    fn now() -> HostCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu  user nice system idle iowait irq softirq steal ...
        let ticks: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .filter_map(|t| t.parse().ok())
            .collect();
        let pressure = std::fs::read_to_string("/proc/pressure/cpu").unwrap_or_default();
        let pressure_us = pressure
            .lines()
            .find(|l| l.starts_with("some"))
            .and_then(|l| l.rsplit("total=").next()?.trim().parse().ok())
            .unwrap_or(0);
        HostCpu {
            started: Instant::now(),
            steal_ticks: ticks.get(7).copied().unwrap_or(0),
            all_ticks: ticks.iter().take(8).sum(),
            pressure_us,
        }
    }

    fn since(&self) -> HostShare {
        let now = HostCpu::now();
        let all = now.all_ticks.saturating_sub(self.all_ticks).max(1) as f64;
        let wall_us = self.started.elapsed().as_micros().max(1) as f64;
        HostShare {
            steal_pct: 100.0 * now.steal_ticks.saturating_sub(self.steal_ticks) as f64 / all,
            pressure_pct: 100.0 * now.pressure_us.saturating_sub(self.pressure_us) as f64 / wall_us,
        }
    }
}

impl HostShare {
    fn print(&self) {
        println!(
            "host                {:>11.1}% of CPU time stolen by the hypervisor; some task waited for a CPU {:.1}% of the time",
            self.steal_pct, self.pressure_pct
        );
    }
}

fn read_baseline(arg: &str) -> Result<Value> {
    let text = if arg.trim_start().starts_with('{') {
        arg.to_string()
    } else {
        std::fs::read_to_string(arg).with_context(|| format!("cannot read the baseline {arg}"))?
    };
    let last = text.lines().rev().find(|l| l.trim_start().starts_with('{')).unwrap_or("");
    serde_json::from_str(last)
        .context("the baseline is not the JSON line postgres-baseline.sh prints")
}

/// The API key every benchmark connection sends (provisioned before the server starts).
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// One HTTP/1.1 keep-alive connection.
pub(crate) struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// The `total` the server reported in `Server-Timing` for the last answer.
    server_time: Option<Duration>,
    /// Every metric of that `Server-Timing` (`total`, and `index` and `log` for searches).
    server_timing: Vec<(String, Duration)>,
}

impl Conn {
    pub(crate) async fn open(addr: &str) -> Result<Conn> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn { sender, server_time: None, server_timing: Vec::new() })
    }

    pub(crate) async fn request(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<(u16, Bytes)> {
        let mut request =
            hyper::Request::builder().method(method).uri(path).header("host", "bench");
        if let Some(token) = TOKEN.get() {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if !content_type.is_empty() {
            request = request.header("content-type", content_type);
        }
        self.sender.ready().await?;
        let response = self.sender.send_request(request.body(Full::new(body))?).await?;
        let status = response.status().as_u16();
        self.server_timing = response
            .headers()
            .get_all("server-timing")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|m| {
                let (name, ms) = m.trim().split_once(";dur=")?;
                Some((name.to_string(), Duration::from_secs_f64(ms.parse::<f64>().ok()? / 1e3)))
            })
            .collect();
        self.server_time = self.server_timing.iter().find(|m| m.0 == "total").map(|m| m.1);
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }

    async fn metrics(&mut self) -> Result<Metrics> {
        let (status, body) = self.request("GET", "/metrics", "", Bytes::new()).await?;
        ensure!(status == 200, "/metrics answered {status}");
        let text = String::from_utf8_lossy(&body);
        let value = |name: &str| -> Result<u64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
                .with_context(|| format!("/metrics lacks {name}"))
        };
        Ok(Metrics {
            sequenced: value("auditrail_log_sequenced")?,
            indexed: value("auditrail_index_indexed")?,
        })
    }
}

struct Metrics {
    sequenced: u64,
    indexed: u64,
}

/// `auditrail serve` as a child process, so its memory and CPU are its own.
pub(crate) struct ServerProcess {
    child: Child,
    pub(crate) addr: String,
}

impl ServerProcess {
    pub(crate) fn spawn(dir: &Path) -> Result<ServerProcess> {
        if !dir.join("keys").exists() {
            auditrail_store::init(dir, "bench.auditrail.local/log")?;
        }
        let scopes = [
            "events:write",
            "events:read",
            "events:patient_identifiers",
            "security:read",
            "reports:run",
        ]
        .map(String::from);
        let token = crate::create_api_key(
            dir,
            auditrail_store::Options::default(),
            "bench",
            &scopes,
            Vec::new(),
            Vec::new(),
        )?;
        let _ = TOKEN.set(token);
        let log_path = dir.with_extension("server.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let mut child = Command::new(std::env::current_exe()?);
        // Scheduled verifications would land in whichever phase runs five minutes in, and make
        // the phases' figures depend on timing; the caller's environment may turn them on.
        for (name, off) in [
            ("AUDITRAIL_INTEGRITY_INCREMENTAL_INTERVAL_MS", "0"),
            ("AUDITRAIL_INTEGRITY_FULL_INTERVAL_MS", "0"),
        ] {
            if std::env::var_os(name).is_none() {
                child.env(name, off);
            }
        }
        let mut child = child
            .arg("serve")
            .arg("--data")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("cannot start auditrail serve")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let Some(addr) = line.trim().strip_prefix("listening on http://") else {
            let _ = child.kill();
            bail!("the server did not start; see {}", log_path.display());
        };
        eprintln!("server: pid {} on {addr}, log in {}", child.id(), log_path.display());
        Ok(ServerProcess { addr: addr.to_string(), child })
    }

    pub(crate) fn rss_kib(&self, field: &str) -> u64 {
        status_kib(&self.child.id().to_string(), field)
    }

    /// SIGTERM, then wait for the clean stop (index flushed, final checkpoint published).
    pub(crate) fn stop(&mut self) -> Result<()> {
        terminate(self.child.id());
        for _ in 0..1200 {
            if let Some(status) = self.child.try_wait()? {
                ensure!(status.success(), "the server stopped with {status}");
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.child.kill()?;
        bail!("the server did not stop within a minute of SIGTERM")
    }
}

#[allow(unsafe_code)]
fn terminate(pid: u32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGTERM);
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub(crate) struct Percentiles(Vec<Duration>);

impl Percentiles {
    pub(crate) fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort_unstable();
        Percentiles(samples)
    }

    /// Nearest-rank percentile `p` (0..1) in milliseconds.
    pub(crate) fn ms(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * self.0.len() as f64).ceil() as usize).clamp(1, self.0.len());
        self.0[rank - 1].as_secs_f64() * 1e3
    }

    pub(crate) fn mean_ms(&self) -> f64 {
        self.0.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / self.0.len().max(1) as f64
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub(crate) fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
