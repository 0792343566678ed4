//! `auditrail bench stages`: the CPU cost per event of each step a bulk-ingested event goes
//! through, on one thread, without HTTP, disk or other threads competing: parsing and
//! preparing a line (what a bulk request does per line), writing its stored form, building its
//! index document, posting it to a memtable, and freezing the full memtable into a segment.
//!
//! On two cores, bulk ingest is bound by the sum of these (and the log's own work, which
//! `bench append` measures), so this is where a change to any of them is measured first: the
//! steps run in one process, one after another, so two binaries can be compared in one
//! session with far less noise than an end-to-end run.

use crate::generator::{Generator, YEAR_MS, now_millis};
use anyhow::{Result, ensure};
use auditrail_core::privacy::{Filter, PrivacyConfig};
use auditrail_index::PatientTokens;
use auditrail_index::doc::{self, Doc};
use auditrail_index::part::{Memtable, Part};
use auditrail_server::auth::Scope;
use auditrail_store::tail::BlockLocation;
use std::time::Instant;

#[derive(clap::Args)]
pub struct StagesArgs {
    /// Events per round (one memtable's worth by default).
    #[arg(long, default_value_t = 1 << 18)]
    events: usize,
    /// Rounds to time; each stage's best round is reported (the least disturbed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub fn run(args: StagesArgs) -> Result<()> {
    ensure!(args.events > 0 && args.rounds > 0, "--events and --rounds must be positive");
    let now = now_millis();
    let mut generator = Generator::new(1, args.events as u64, YEAR_MS, now);
    let lines: Vec<String> = (0..args.events).map(|_| generator.next_line()).collect();
    let privacy = Filter::new(&PrivacyConfig::default()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let tokens = PatientTokens::new(&[7; 32]);
    let mut best = [f64::MAX; 6];
    let names = [
        "parse a bulk line (serde_json::Value)",
        "mask, validate and canonicalise it",
        "write its stored form",
        "build its index document",
        "post the document to a memtable",
        "freeze the memtable",
    ];
    // Each round's memtable is sized like the last one, as the server's are; the first grows.
    let mut previous: Option<Memtable> = None;
    for round in 0..args.rounds {
        let base = (round * args.events) as u64;
        let t = Instant::now();
        let values: Vec<serde_json::Value> =
            lines.iter().map(|l| serde_json::from_str(l)).collect::<Result<_, _>>()?;
        let parse = t.elapsed();

        let t = Instant::now();
        let prepared = values
            .into_iter()
            .map(|v| auditrail_server::ingest::prepare(v, &Scope::Everywhere, &privacy))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("a generated event is invalid: {e:?}"))?;
        let prepare = t.elapsed();

        let t = Instant::now();
        let mut stored = Vec::with_capacity(prepared.len());
        for (seq, p) in prepared.iter().enumerate() {
            let mut out = Vec::with_capacity(p.approx_len() + 128);
            p.write_stored(seq as u64, now, "0b7f3c9e-1111-4222-8333-444455556666", &mut out);
            stored.push(out);
        }
        let write = t.elapsed();
        drop(prepared);

        let t = Instant::now();
        let docs = stored
            .iter()
            .enumerate()
            .map(|(i, s)| doc::extract(base + i as u64, s, &tokens, Some(doc::fhir_terms)))
            .collect::<Result<Vec<Doc>, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let extract = t.elapsed();

        // The blocks a 2 KiB-block segment would give: about four events each.
        let t = Instant::now();
        let mut memtable = match &previous {
            Some(p) => Memtable::after(p),
            None => Memtable::new(0),
        };
        for doc in docs {
            let seq = doc.seq;
            let block = BlockLocation {
                segment: 0,
                offset: seq / 4 * 2048,
                first_seq: seq / 4 * 4,
                count: 4,
            };
            memtable.push(doc, &block);
        }
        let push = t.elapsed();

        let t = Instant::now();
        let segment = memtable.freeze();
        let freeze = t.elapsed();
        ensure!(segment.len() == args.events, "the segment holds every event");
        previous = Some(memtable);

        for (b, d) in best.iter_mut().zip([parse, prepare, write, extract, push, freeze]) {
            *b = b.min(d.as_secs_f64() * 1e6 / args.events as f64);
        }
    }
    println!("{} events per round, best of {} rounds, one thread:", args.events, args.rounds);
    for (name, us) in names.iter().zip(best) {
        println!("  {name:<40} {us:7.3} µs/event");
    }
    println!("  {:<40} {:7.3} µs/event", "total", best.iter().sum::<f64>());
    Ok(())
}
