//! `auditrail bench lookup`: the server's work in a patient lookup, in this process, without
//! HTTP, over a data directory `bench http --keep` left behind (the server must be stopped).
//!
//! The same lookups as `bench http` (the same patients, drawn with the workload's skew: "this
//! patient's events in the last year, newest first, first page of 50"), timed in two parts:
//! the index search, and reading the page's events back from the log (locating, decrypting and
//! decompressing their blocks). With `--cold` the block cache holds nothing, so every lookup
//! decodes every block of its page: the slowest lookups' cost, without the noise of a loopback
//! round trip and two schedulers, to measure changes to the read path by.

use crate::bench_http::{Percentiles, round3};
use crate::generator::{Generator, YEAR_MS, now_millis};
use anyhow::{Context as _, Result, ensure};
use auditrail_index::Query;
use auditrail_index::doc::{CLIENT_STREAM, Field, term};
use auditrail_server::BlockCache;
use auditrail_store::{Options, Store};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct LookupArgs {
    /// A data directory with events in it (`bench http --keep --dir D`), not in use.
    #[arg(long)]
    dir: PathBuf,
    /// Lookups to time (after a warm-up of a tenth as many).
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    /// Keep no decoded block between lookups: every page decodes all of its blocks.
    #[arg(long)]
    cold: bool,
    /// Bytes of decoded blocks to keep (the server's `block_cache_bytes_max` default).
    #[arg(long, default_value_t = 256 << 20)]
    cache_bytes: usize,
}

pub fn run(args: LookupArgs) -> Result<()> {
    ensure!(args.dir.join("segments").is_dir(), "{} holds no log", args.dir.display());
    let store = Store::open(&args.dir, Options::default())
        .with_context(|| format!("cannot open {}", args.dir.display()))?;
    let index = auditrail_server::open_index(&args.dir, store.master_keys(), 1 << 18)?;
    // Events after the last index file (a server keeps them in memory only) are indexed here,
    // as the server's follower would on start.
    auditrail_index::Follower::new(&index, &store).catch_up(&index, &store)?;
    let cache = BlockCache::new(store.block_reader(), args.cache_bytes);
    let from = now_millis() - YEAR_MS;
    // The same patient draw as `bench http`'s lookups.
    let mut patients = Generator::new(7, 1, 1, 0);
    let warm_up = (args.lookups / 10).max(1);
    let (mut in_index, mut in_log, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut found = 0usize;
    let mut body = Vec::with_capacity(64 << 10);
    for i in 0..warm_up + args.lookups {
        if args.cold {
            cache.clear();
        }
        // What `query::search_query` builds for `?patient=P&from=F&limit=50`.
        let query = Query {
            all_of: vec![
                vec![index.patients().term(&patients.patient_id())],
                vec![term(Field::Stream, CLIENT_STREAM)],
            ],
            occurred: (from, i64::MAX),
            limit: 50,
            newest_first: true,
            ..Query::default()
        };
        let started = Instant::now();
        let hits = index.search(&query);
        let searched = started.elapsed();
        body.clear();
        let stored = cache.read_stored(&index, &hits.seqs).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for stored in stored.iter() {
            body.extend_from_slice(stored);
            body.push(b',');
        }
        let took = started.elapsed();
        if i >= warm_up {
            in_index.push(searched);
            in_log.push(took - searched);
            total.push(took);
            found += hits.seqs.len();
        }
    }
    store.close()?;
    ensure!(
        found > 0,
        "no lookup found an event: is {} a `bench http` directory?",
        args.dir.display()
    );
    let (in_index, in_log, total) =
        (Percentiles::of(in_index), Percentiles::of(in_log), Percentiles::of(total));
    let line = |name: &str, p: &Percentiles| {
        println!(
            "{name:<10} {:>8.3} ms p50, {:.3} ms p90, {:.3} ms p99, {:.3} ms mean",
            p.ms(0.5),
            p.ms(0.9),
            p.ms(0.99),
            p.mean_ms()
        );
    };
    println!(
        "== patient lookups in process ({} lookups, {:.1} events per page, block cache {}) ==",
        args.lookups,
        found as f64 / args.lookups.max(1) as f64,
        if args.cold {
            "emptied before each".to_string()
        } else {
            format!("{} MiB", args.cache_bytes >> 20)
        }
    );
    line("index", &in_index);
    line("log", &in_log);
    line("total", &total);
    let report = json!({
        "lookups": args.lookups, "cold": args.cold,
        "index_p50_ms": round3(in_index.ms(0.5)), "index_p99_ms": round3(in_index.ms(0.99)),
        "log_p50_ms": round3(in_log.ms(0.5)), "log_p99_ms": round3(in_log.ms(0.99)),
        "log_mean_ms": round3(in_log.mean_ms()),
        "total_p50_ms": round3(total.ms(0.5)), "total_p99_ms": round3(total.ms(0.99)),
    });
    println!("{report}");
    Ok(())
}
