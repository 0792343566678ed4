//! The index against a real store in a temporary directory, checked against a naive scan of
//! the same events.

use auditrail_core::event::ClientEvent;
use auditrail_core::time::{format_millis, parse_rfc3339};
use auditrail_index::doc::{Field, term};
use auditrail_index::{Follower, GroupBy, Index, IndexOptions, Query};
use auditrail_store::sim::Rng;
use auditrail_store::{Options, Store};
use serde_json::{Value, json};

const T0: i64 = 1_790_000_000_000;
const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

fn event(rng: &mut Rng, i: u64) -> Value {
    // Mostly increasing occurred_at with some skew, as real clocks give.
    let t = T0 + i as i64 * 60_000 - rng.below(600_000) as i64;
    let category = ["phi_access", "authentication", "export"][rng.below(3) as usize];
    let action =
        ["patient.read", "patient.update", "login.failure", "data.export"][rng.below(4) as usize];
    json!({
        "id": format!("ev-{i}"),
        "occurred_at": format_millis(t),
        "category": category,
        "action": action,
        "outcome": if rng.below(10) == 0 { "failure" } else { "success" },
        "actor": {"user_id": format!("u{}", rng.below(20)), "ip": format!("10.0.0.{}", rng.below(5))},
        "source": {"system": "ehr"},
        "patient": {"id": format!("MRN{}", rng.below(50))},
    })
}

struct Fixture {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    events: Vec<Value>,
}

fn fixture(n: u64) -> Fixture {
    let mut rng = Rng::new(42);
    fixture_of((0..n).map(|i| event(&mut rng, i)).collect())
}

fn fixture_of(events: Vec<Value>) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    auditrail_store::init(&dir, "test.example/log").unwrap();
    let store = Store::open(&dir, Options::default()).unwrap();
    for chunk in events.chunks(97) {
        let prepared = chunk
            .iter()
            .map(|v| ClientEvent::validate(v.clone()).unwrap().prepare().unwrap())
            .collect();
        store.append(prepared).unwrap();
    }
    store.close().unwrap();
    Fixture { _tmp: tmp, dir, events }
}

fn occurred(v: &Value) -> i64 {
    parse_rfc3339(v["occurred_at"].as_str().unwrap()).unwrap()
}

fn open(f: &Fixture, rows_max: usize) -> (Store, Index) {
    let store = Store::open(&f.dir, Options::default()).unwrap();
    let index = Index::open(
        &f.dir,
        store.master_keys(),
        IndexOptions { memtable_rows_max: rows_max },
        None,
    )
    .unwrap();
    (store, index)
}

fn reopen(f: &Fixture, store: &Store) -> Index {
    Index::open(&f.dir, store.master_keys(), IndexOptions { memtable_rows_max: 700 }, None).unwrap()
}

#[test]
fn queries_match_a_naive_scan_across_segments_restarts_and_rebuilds() {
    let f = fixture(3000);
    let (store, index) = open(&f, 700);
    let mut follower = Follower::new(&index, &store);
    assert_eq!(follower.catch_up(&index, &store).unwrap(), 3000);
    assert_eq!(index.indexed_through(), 3000);
    assert!(index.segment_count() >= 3, "segments: {}", index.segment_count());
    assert!(index.persisted_through() < 3000, "the rest is in the memtable");

    let check = |index: &Index| {
        let user = term(Field::User, "u7");
        let lo = T0 + 500 * 60_000;
        let hi = T0 + 2500 * 60_000;
        let expected: Vec<u64> = (0..f.events.len() as u64)
            .rev()
            .filter(|&s| {
                let v = &f.events[s as usize];
                v["actor"]["user_id"] == "u7" && (lo..hi).contains(&occurred(v))
            })
            .collect();
        let q = Query {
            all_of: vec![vec![user.clone()]],
            occurred: (lo, hi),
            limit: 10_000,
            ..Query::default()
        };
        assert_eq!(index.search(&q).seqs, expected);
        assert_eq!(index.count(&q), expected.len() as u64);
        // Paging with a seq cursor gives the same sequence.
        let mut paged: Vec<u64> = Vec::new();
        let mut below = u64::MAX;
        loop {
            let hits = index.search(&Query { seqs: (0, below), limit: 7, ..q.clone() });
            paged.extend(&hits.seqs);
            if !hits.more {
                break;
            }
            below = *hits.seqs.last().unwrap();
        }
        assert_eq!(paged, expected);
        // A search stopped at its deadline (here: after its first part) and finished later
        // gives the same answer, in either order, at any page size and cursor.
        let mut unfinished = 0;
        for (limit, seqs, newest_first) in
            [(7, (0, u64::MAX), true), (10_000, (0, 2000), true), (5, (900, u64::MAX), false)]
        {
            let q = Query { seqs, limit, newest_first, ..q.clone() };
            let whole = index.search(&q);
            let stopped = index.search_until(&q, Some(std::time::Instant::now()));
            unfinished += usize::from(stopped.is_err());
            assert_eq!(stopped.unwrap_or_else(|u| u.finish(index)), whole, "{limit} {seqs:?}");
        }
        assert!(unfinished >= 2, "only {unfinished} searches were stopped");
        let unhurried = index.search_until(&q, Some(std::time::Instant::now() + HOUR));
        assert_eq!(unhurried.unwrap(), index.search(&q));

        // Patient OR patient, AND outcome.
        let patients = vec![index.patients().term("MRN3"), index.patients().term("Patient/MRN4")];
        let q = Query {
            all_of: vec![patients, vec![term(Field::Outcome, "failure")]],
            newest_first: false,
            limit: 10_000,
            ..Query::default()
        };
        let expected: Vec<u64> = (0..f.events.len() as u64)
            .filter(|&s| {
                let v = &f.events[s as usize];
                (v["patient"]["id"] == "MRN3" || v["patient"]["id"] == "MRN4")
                    && v["outcome"] == "failure"
            })
            .collect();
        assert!(!expected.is_empty());
        assert_eq!(index.search(&q).seqs, expected);

        // No terms, only time: every event in the window.
        let q = Query { occurred: (lo, hi), limit: 100_000, ..Query::default() };
        let n = f.events.iter().filter(|v| (lo..hi).contains(&occurred(v))).count();
        assert_eq!(index.search(&q).seqs.len(), n);

        // Counts by action over the window.
        let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
        for v in f.events.iter().filter(|v| (lo..hi).contains(&occurred(v))) {
            *expected.entry(v["action"].as_str().unwrap().to_string()).or_default() += 1;
        }
        let got: std::collections::BTreeMap<String, u64> =
            index.stats(GroupBy::Action, lo, hi).into_iter().collect();
        assert_eq!(got, expected);

        // Ids and blocks.
        let seqs = index.id_candidates("ev-1234");
        assert!(seqs.contains(&1234));
        let block = index.block_for(1234).unwrap();
        assert!((block.first_seq..block.end_seq()).contains(&1234));
        assert!(index.block_for(3000).is_none());
    };
    check(&index);
    index.flush(true).unwrap();
    drop(index);

    // After a restart everything comes from the files.
    let index = reopen(&f, &store);
    assert_eq!(index.indexed_through(), 3000);
    check(&index);

    // A damaged file is dropped with everything after it, and the follower re-reads them.
    let files: Vec<_> =
        std::fs::read_dir(f.dir.join("index")).unwrap().map(|e| e.unwrap().path()).collect();
    let mut sorted = files.clone();
    sorted.sort();
    let mut bytes = std::fs::read(&sorted[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&sorted[1], bytes).unwrap();
    drop(index);
    let index = reopen(&f, &store);
    assert!(index.indexed_through() < 3000 && index.indexed_through() > 0);
    Follower::new(&index, &store).catch_up(&index, &store).unwrap();
    check(&index);

    // A rebuild from scratch gives the same answers.
    index.reset().unwrap();
    assert_eq!(index.indexed_through(), 0);
    Follower::new(&index, &store).catch_up(&index, &store).unwrap();
    check(&index);
}

/// Counts over whole segments use per-chunk totals and, for chunks a window only partly covers,
/// the chunk's rows in time order. Stragglers (events stamped far later or earlier than their
/// neighbours) stretch every chunk over any window; the counts must still be exact.
#[test]
fn counts_with_stragglers_in_every_chunk_match_a_naive_scan() {
    let mut rng = Rng::new(7);
    let events: Vec<Value> = (0..20_000u64)
        .map(|i| {
            let mut v = event(&mut rng, i);
            let shifted = match i % 50 {
                0 => Some(T0 + 3_650 * 86_400_000), // a read trace of today among old imports
                25 => Some(T0 - 365 * 86_400_000),  // a sender a year late
                _ => None,
            };
            if let Some(t) = shifted {
                v["occurred_at"] = json!(format_millis(t));
            }
            v
        })
        .collect();
    let f = fixture_of(events);
    let (store, index) = open(&f, 9_000);
    Follower::new(&index, &store).catch_up(&index, &store).unwrap();
    index.flush(true).unwrap();

    let minute = 60_000;
    let windows = [
        (i64::MIN, i64::MAX),
        (T0, T0 + 20_000 * minute), // all but the stragglers
        (T0 + 1_000 * minute, T0 + 19_000 * minute), // most of each chunk
        (T0 + 4_100 * minute, T0 + 4_200 * minute), // a sliver of one chunk
        (T0 + 5_000 * minute, T0 + 3_651 * 86_400_000), // through the late ones
        (T0 - 366 * 86_400_000, T0 + 10 * minute), // the early ones and a few minutes
    ];
    for (lo, hi) in windows {
        for group in [GroupBy::Action, GroupBy::User] {
            let mut expected: std::collections::BTreeMap<String, u64> = Default::default();
            for v in f.events.iter().filter(|v| (lo..hi).contains(&occurred(v))) {
                let key = match group {
                    GroupBy::User => v["actor"]["user_id"].as_str(),
                    _ => v["action"].as_str(),
                };
                *expected.entry(key.unwrap().to_string()).or_default() += 1;
            }
            let got: std::collections::BTreeMap<String, u64> =
                index.stats(group, lo, hi).into_iter().collect();
            assert_eq!(got, expected, "window {lo}..{hi}");
        }
    }
}

#[test]
fn the_index_key_is_sealed_and_a_plaintext_one_is_migrated() {
    let f = fixture(1500);
    let (store, index) = open(&f, 700);
    Follower::new(&index, &store).catch_up(&index, &store).unwrap();
    index.flush(true).unwrap();
    let mrn3 = index.patients().term("MRN3");
    drop(index);
    let key_path = f.dir.join("keys/index.key");
    let sealed = std::fs::read(&key_path).unwrap();
    assert!(sealed.starts_with(auditrail_store::keys::SEALED_MAGIC));
    let secret = store.master_keys().open_blob("index.key", &sealed).unwrap();

    // Another master key cannot open it: a clear error naming the file, not a silent rebuild.
    let other = auditrail_store::keys::MasterKeys::parse(
        "1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let e = Index::open(&f.dir, &other, IndexOptions::default(), None).unwrap_err().to_string();
    assert!(e.contains("keys/index.key") && e.contains("master key"), "{e}");

    // A key file from before sealing: the same secret in the clear. It is sealed on open.
    std::fs::write(&key_path, &secret).unwrap();
    let index = reopen(&f, &store);
    assert!(std::fs::read(&key_path).unwrap().starts_with(auditrail_store::keys::SEALED_MAGIC));
    assert_eq!(index.patients().term("MRN3"), mrn3, "the same secret, the same tokens");
    assert_eq!(index.indexed_through(), 1500, "the files still open");
    drop(index);

    // A new secret (the key file lost) drops every file: they were sealed under the old one.
    std::fs::remove_file(&key_path).unwrap();
    let index = reopen(&f, &store);
    assert_eq!(index.indexed_through(), 0);
    assert_ne!(index.patients().term("MRN3"), mrn3);
    Follower::new(&index, &store).catch_up(&index, &store).unwrap();
    assert_eq!(index.indexed_through(), 1500);
}

/// A full memtable's file is written on a thread of its own, and the memtable stays searchable
/// meanwhile. When the file cannot be written (here the index directory is gone), the follower
/// reports it and goes on indexing; every event stays searchable, and the files are written
/// once they can be.
#[test]
fn a_memtable_whose_file_cannot_be_written_stays_searchable_and_is_written_later() {
    let f = fixture(1500);
    let (store, index) = open(&f, 400);
    let dir = f.dir.join("index");
    let away = f.dir.join("index-away");
    std::fs::rename(&dir, &away).unwrap();
    let mut follower = Follower::new(&index, &store);
    let mut errors = 0;
    for _ in 0..1000 {
        match follower.step(&index, &store, 2) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 0, "writing into a missing directory fails");
    assert_eq!(index.indexed_through(), 1500);
    assert_eq!(index.persisted_through(), 0);
    let all = Query { newest_first: false, limit: 10_000, ..Query::default() };
    let every: Vec<u64> = (0..1500).collect();
    assert_eq!(index.search(&all).seqs, every);
    let u3 = Query { all_of: vec![vec![term(Field::User, "u3")]], ..all.clone() };
    let expected: Vec<u64> = every
        .iter()
        .copied()
        .filter(|&s| f.events[s as usize]["actor"]["user_id"] == "u3")
        .collect();
    assert_eq!(index.search(&u3).seqs, expected);
    // The full memtable waiting for its file still locates its events' blocks.
    for seq in [0, 399, 400, 1499] {
        let block = index.block_for(seq).expect("a block");
        assert!((block.first_seq..block.end_seq()).contains(&seq));
    }

    std::fs::rename(&away, &dir).unwrap();
    index.flush(true).unwrap();
    assert_eq!(index.persisted_through(), 1500);
    drop(index);
    let index = reopen(&f, &store);
    assert_eq!(index.indexed_through(), 1500);
    assert_eq!(index.search(&all).seqs, every);
    assert_eq!(index.search(&u3).seqs, expected);
}
