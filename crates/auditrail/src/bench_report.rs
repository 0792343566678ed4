//! `auditrail bench report`: the patient access report on a large log, against its baseline in
//! the same session. It starts `auditrail serve` as a child process, bulk-loads `--events`
//! generated events (the `bench http` workload) among which one patient, found in no other
//! event, has exactly `--patient-events` spread evenly over the log with a known mix of
//! purposes of use, then times, in alternating order over `--rounds` server restarts:
//!
//! - the report: `GET /api/v1/reports/patient-access?patient=…` read to its last byte;
//! - the baseline: the same events through the search a client would page through,
//!   `GET /api/v1/events?patient=…&order=asc&limit=1000` with `next_cursor` until the end.
//!
//! Each is timed cold (first after a restart: the server's block cache is empty; the OS page
//! cache is not cleared) and warm (right after the other one read the same blocks). Every run
//! is checked: the report's seqs equal the search's, and on a fresh load its disclosure count
//! equals the generator's. The last line printed is one JSON object.

use crate::bench_http::{Conn, Percentiles, ServerProcess, round3, wait_indexed};
use crate::generator::{Generator, YEAR_MS, now_millis};
use anyhow::{Context as _, Result, bail, ensure};
use auditrail_store::sim::Rng;
use hyper::body::Bytes;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The benchmark's patient: an id no generated event has.
const PATIENT: &str = "MRN-REPORT-BENCH";
/// The organisations the patient's events name, in turn.
const ORGANIZATIONS: [&str; 3] = ["St. Mary", "North Clinic", "Lab Partners"];
/// Target: the patient access report of a patient with 10,000 events in a log of 10 million
/// completes in under a second.
const TARGET: Duration = Duration::from_secs(1);

#[derive(clap::Args)]
pub struct ReportArgs {
    /// Events in the log.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events of the report's patient among them.
    #[arg(long, default_value_t = 10_000)]
    patient_events: u64,
    /// Server restarts; each times the report and the baseline cold and warm.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// NDJSON lines per bulk request.
    #[arg(long, default_value_t = 10_000)]
    bulk_lines: usize,
    #[command(flatten)]
    data: crate::bench_http::BenchDir,
}

/// The patient's `k`-th event's purpose of use and action: 94% treatment, payment or
/// operations, 6% in the accounting of disclosures (research, public health, patient request,
/// a disclosure without a purpose).
fn patient_purpose(k: u64) -> (Option<&'static str>, &'static str, bool) {
    match k % 100 {
        0..=79 => (Some("TREAT"), "patient.read", false),
        80..=87 => (Some("HPAYMT"), "patient.read", false),
        88..=93 => (Some("HOPERAT"), "patient.read", false),
        94..=96 => (Some("HRESCH"), "patient.read", true),
        97 => (Some("PUBHLTH"), "patient.read", true),
        98 => (None, "patient.disclose", true),
        _ => (Some("PATRQT"), "patient.disclose", true),
    }
}

pub fn run(args: ReportArgs) -> Result<()> {
    ensure!(
        args.patient_events >= 1 && args.patient_events <= args.events,
        "--patient-events must be 1 to --events"
    );
    let dir = args.data.prepare("report")?;
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut server = ServerProcess::spawn(&dir)?;
    let mut expected_disclosures = None;
    if !args.data.reuse {
        let started = Instant::now();
        expected_disclosures = Some(runtime.block_on(load(&args, &server.addr))?);
        println!(
            "loaded {} events ({} of the patient) in {:.1}s",
            args.events,
            args.patient_events,
            started.elapsed().as_secs_f64()
        );
    }
    let events = runtime.block_on(wait_indexed(&server.addr))?;

    let mut runs: Vec<Run> = Vec::new();
    for round in 0..args.rounds {
        if round > 0 || !args.data.reuse {
            // A restart empties the server's block cache: the first read of a round is cold.
            server.stop()?;
            server = ServerProcess::spawn(&dir)?;
            runtime.block_on(wait_indexed(&server.addr))?;
        }
        let order = if round % 2 == 0 {
            [Kind::Search, Kind::Report]
        } else {
            [Kind::Report, Kind::Search]
        };
        for (i, kind) in order.into_iter().enumerate() {
            let run = runtime.block_on(measure(&server.addr, kind, i == 0))?;
            runs.push(run);
        }
        // And the other order, cold again.
        server.stop()?;
        server = ServerProcess::spawn(&dir)?;
        runtime.block_on(wait_indexed(&server.addr))?;
        for (i, kind) in order.into_iter().rev().enumerate() {
            let run = runtime.block_on(measure(&server.addr, kind, i == 0))?;
            runs.push(run);
        }
    }
    let peak_rss_mib = server.rss_kib("VmHWM") as f64 / 1024.0;
    let stopped = server.stop();

    // Every run saw the same events.
    let reference = &runs[0].seqs;
    ensure!(
        reference.len() as u64 == args.patient_events || args.data.reuse,
        "the patient has {} events, expected {}",
        reference.len(),
        args.patient_events
    );
    for r in &runs {
        ensure!(&r.seqs == reference, "a {:?} run saw other events than the first run", r.kind);
    }
    let disclosures: Vec<u64> = runs.iter().filter_map(|r| r.disclosures).collect();
    if let Some(want) = expected_disclosures {
        ensure!(
            disclosures.iter().all(|&d| d == want),
            "the report marked {disclosures:?} disclosures, the generator made {want}"
        );
    }

    let pick = |kind: Kind, cold: bool| -> Vec<Duration> {
        runs.iter().filter(|r| r.kind == kind && r.cold == cold).map(|r| r.took).collect()
    };
    let median = |v: Vec<Duration>| Percentiles::of(v).ms(0.5);
    let (report_cold, search_cold) =
        (median(pick(Kind::Report, true)), median(pick(Kind::Search, true)));
    let (report_warm, search_warm) =
        (median(pick(Kind::Report, false)), median(pick(Kind::Search, false)));
    let max_report =
        runs.iter().filter(|r| r.kind == Kind::Report).map(|r| r.took).max().unwrap_or_default();
    println!(
        "\n== patient access report: {} events of one patient in a log of {events} ==",
        reference.len()
    );
    println!("{:<34}{:>12}{:>12}", "median of runs (ms)", "cold", "warm");
    println!("{:<34}{report_cold:>12.1}{report_warm:>12.1}", "report (JSON, to the last byte)");
    println!("{:<34}{search_cold:>12.1}{search_warm:>12.1}", "baseline: search, pages of 1,000");
    println!(
        "{:<34}{:>11.2}x{:>11.2}x",
        "report / baseline",
        report_cold / search_cold,
        report_warm / search_warm
    );
    println!(
        "slowest report run {:.1} ms over {} runs; target < {} ms: {}",
        max_report.as_secs_f64() * 1e3,
        pick(Kind::Report, true).len() + pick(Kind::Report, false).len(),
        TARGET.as_millis(),
        if max_report < TARGET { "met" } else { "NOT met" }
    );
    println!(
        "disclosures marked {} (expected {}); server peak RSS {peak_rss_mib:.0} MiB",
        disclosures.first().copied().unwrap_or(0),
        expected_disclosures.map_or("unknown with --reuse".to_string(), |d| d.to_string())
    );
    args.data.finish(&dir);
    println!(
        "{}",
        json!({
            "events": events, "patient_events": reference.len(),
            "report_cold_ms": round3(report_cold), "report_warm_ms": round3(report_warm),
            "search_cold_ms": round3(search_cold), "search_warm_ms": round3(search_warm),
            "report_max_ms": round3(max_report.as_secs_f64() * 1e3),
            "ratio_cold": round3(report_cold / search_cold), "ratio_warm": round3(report_warm / search_warm),
            "server_peak_rss_mib": round3(peak_rss_mib),
        })
    );
    stopped
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Report,
    Search,
}

struct Run {
    kind: Kind,
    cold: bool,
    took: Duration,
    seqs: Vec<u64>,
    disclosures: Option<u64>,
}

async fn measure(addr: &str, kind: Kind, cold: bool) -> Result<Run> {
    let mut conn = Conn::open(addr).await?;
    let started = Instant::now();
    let (bodies, took) = match kind {
        Kind::Report => {
            let path = format!("/api/v1/reports/patient-access?patient={PATIENT}");
            let (status, body) = conn.request("GET", &path, "", Bytes::new()).await?;
            let took = started.elapsed();
            ensure!(
                status == 200,
                "report answered {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
            (vec![body], took)
        }
        Kind::Search => {
            let mut bodies = Vec::new();
            let mut cursor = String::new();
            loop {
                let path = format!("/api/v1/events?patient={PATIENT}&order=asc&limit=1000{cursor}");
                let (status, body) = conn.request("GET", &path, "", Bytes::new()).await?;
                ensure!(
                    status == 200,
                    "search answered {status}: {}",
                    String::from_utf8_lossy(&body)
                );
                // Only the cursor is read while timing, as a client paging through would.
                let next = find_cursor(&body);
                bodies.push(body);
                match next {
                    Some(c) => cursor = format!("&cursor={c}"),
                    None => break,
                }
            }
            (bodies, started.elapsed())
        }
    };
    // Checked after the clock stopped.
    let mut seqs = Vec::new();
    let mut disclosures = None;
    for body in &bodies {
        let v: Value = serde_json::from_slice(body)?;
        for e in v["events"].as_array().context("no events")? {
            let event = if kind == Kind::Report { &e["event"] } else { e };
            seqs.push(event["seq"].as_u64().context("an event without seq")?);
        }
        if kind == Kind::Report {
            disclosures = v["totals"]["disclosures"].as_u64();
        }
    }
    Ok(Run { kind, cold, took, seqs, disclosures })
}

/// `next_cursor` of a search page (at its end), without parsing the page.
fn find_cursor(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(&body[body.len().saturating_sub(200)..]).ok()?;
    let at = text.rfind("\"next_cursor\":\"")? + "\"next_cursor\":\"".len();
    Some(text[at..].split('"').next()?.to_string())
}

/// Bulk-loads the log over two connections, generating request bodies on a blocking thread a
/// few at a time (a 10-million-event load never sits in memory); returns how many of the
/// patient's events belong in the accounting of disclosures.
async fn load(args: &ReportArgs, addr: &str) -> Result<u64> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let (events, patient_events, lines) = (args.events, args.patient_events, args.bulk_lines);
    let generator = tokio::task::spawn_blocking(move || -> Result<u64> {
        let mut generator = Generator::new(42, events, YEAR_MS, now_millis());
        let mut rng = Rng::new(7);
        let step = events / patient_events;
        let mut next_k = 0u64;
        let mut next_at = rng.below(step);
        let mut disclosures = 0;
        let mut body = String::with_capacity(lines * 480);
        for i in 0..events {
            let line = generator.next_line();
            if i == next_at && next_k < patient_events {
                let mut e: Value = serde_json::from_str(&line)?;
                let (purpose, action, disclosure) = patient_purpose(next_k);
                e["category"] = "phi_access".into();
                e["action"] = action.into();
                e["outcome"] = "success".into();
                e["patient"] = json!({"id": PATIENT, "system": "urn:oid:2.16.840.1.113883.3.0"});
                let organization = ORGANIZATIONS[(next_k % 3) as usize];
                e["context"] = json!({ "organization": organization });
                match purpose {
                    Some(p) => e["purpose_of_use"] = p.into(),
                    None => {
                        e.as_object_mut().expect("an object").remove("purpose_of_use");
                    }
                }
                disclosures += u64::from(disclosure);
                body.push_str(&e.to_string());
                next_k += 1;
                next_at = next_k * step + rng.below(step);
            } else {
                body.push_str(&line);
            }
            body.push('\n');
            if (i + 1) % lines as u64 == 0 || i + 1 == events {
                let full = std::mem::replace(&mut body, String::with_capacity(lines * 480));
                if tx.blocking_send(Bytes::from(full)).is_err() {
                    bail!("the loader stopped");
                }
            }
        }
        ensure!(next_k == patient_events, "placed {next_k} of the patient's events");
        Ok(disclosures)
    });
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut senders = Vec::new();
    for _ in 0..2 {
        let rx = rx.clone();
        let mut conn = Conn::open(addr).await?;
        senders.push(tokio::spawn(async move {
            loop {
                let Some(body) = rx.lock().await.recv().await else { return anyhow::Ok(()) };
                let (status, answer) = conn
                    .request("POST", "/api/v1/events/bulk", "application/x-ndjson", body)
                    .await?;
                ensure!(
                    status == 200 && answer.starts_with(b"{\"errors\":false"),
                    "bulk request answered {status}: {}",
                    String::from_utf8_lossy(&answer[..answer.len().min(300)])
                );
            }
        }));
    }
    for s in senders {
        s.await??;
    }
    generator.await?
}
