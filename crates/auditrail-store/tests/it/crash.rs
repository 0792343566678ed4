//! Model-based crash test over the simulated disk: run a random workload, crash at the k-th
//! sync for every k, cut the power (torn, unsynced writes), reopen, and check that every
//! acknowledged event is there, unchanged, and that the full audit passes.

use crate::event;
use auditrail_store::audit::audit;
use auditrail_store::keys::Keys;
use auditrail_store::sim::{Rng, SimDisk};
use auditrail_store::{Options, Receipt, Store};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

fn options() -> Options {
    // A clock that moves an hour per batch, so segments also roll at day boundaries.
    let now = Arc::new(AtomicI64::new(1_795_342_500_000));
    Options {
        publish_interval_ms: 0,
        segment_bytes_max: 2048,
        clock: Arc::new(move || now.fetch_add(3_600_000, Ordering::SeqCst)),
        ..Options::default()
    }
}

/// Runs the workload until it finishes or the disk crashes; returns the acknowledged events.
fn workload(disk: &SimDisk, seed: u64) -> BTreeMap<u64, Receipt> {
    let mut rng = Rng::new(seed);
    let mut acked = BTreeMap::new();
    let Ok(store) = Store::open_with(Arc::new(disk.clone()), options()) else { return acked };
    for b in 0..12u64 {
        let n = 1 + rng.below(20);
        let batch = (0..n)
            .map(|i| {
                let k = b * 100 + i;
                // Some client ids, some of them repeated.
                let id = (rng.below(3) == 0).then(|| format!("client-{}", rng.below(15)));
                event(k, id.as_deref())
            })
            .collect();
        match store.append(batch) {
            Ok(receipts) => {
                for r in receipts {
                    acked.entry(r.seq).or_insert(r);
                }
            }
            Err(_) => break,
        }
    }
    drop(store);
    acked
}

fn check_recovered(disk: SimDisk, acked: &BTreeMap<u64, Receipt>, context: &str) {
    let store = Store::open_with(Arc::new(disk.clone()), options())
        .unwrap_or_else(|e| panic!("{context}: reopening failed: {e}"));
    let stages = store.stages();
    let last_acked = acked.keys().next_back().map_or(0, |s| s + 1);
    assert!(
        stages.sequenced >= last_acked,
        "{context}: {stages:?} lost acknowledged events up to {last_acked}"
    );
    let stored = store.read_events(0, stages.sequenced).unwrap();
    for (seq, receipt) in acked {
        let (s, bytes) = &stored[*seq as usize];
        assert_eq!(s, seq);
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(v["id"].as_str(), Some(receipt.id.as_str()), "{context}: seq {seq}");
    }
    // Recovery alone leaves a log that audits clean: a reopen and close with no new events.
    store.close().unwrap();
    let keys = Keys::load(&disk).unwrap();
    let report = audit(&disk, &keys, &mut |_| {}).unwrap();
    assert!(report.ok(), "{context}: audit after recovery found {:?}", report.problems);
    assert_eq!(report.events, stages.sequenced, "{context}");
    // The recovered store accepts more, and the whole log still audits clean.
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    store
        .append(vec![event(424_242, None)])
        .unwrap_or_else(|e| panic!("{context}: append after recovery: {e}"));
    store.close().unwrap();
    let report = audit(&disk, &keys, &mut |_| {}).unwrap();
    assert!(report.ok(), "{context}: audit found {:?}", report.problems);
    assert_eq!(report.events, stages.sequenced + 1, "{context}");
}

#[test]
fn every_acknowledged_event_survives_a_crash_at_every_sync_point() {
    for seed in 0..4u64 {
        // A clean run counts the sync points.
        let reference = SimDisk::new();
        Keys::install(&reference, "crash.test/log").unwrap();
        let start = reference.syncs();
        workload(&reference, seed);
        let syncs = reference.syncs() - start;
        assert!(syncs > 20, "the workload syncs often enough to be interesting");
        for k in 1..=syncs + 2 {
            let disk = SimDisk::new();
            Keys::install(&disk, "crash.test/log").unwrap();
            disk.crash_at_sync(k);
            let acked = workload(&disk, seed);
            for cut in 0..3 {
                let mut rng = Rng::new(seed * 1_000_003 + k * 7 + cut);
                let context = format!("seed {seed}, crash at sync {k}, power-cut image {cut}");
                check_recovered(disk.after_power_cut(&mut rng), &acked, &context);
            }
        }
    }
}

#[test]
fn recovery_after_a_crash_is_itself_crash_safe() {
    // Crash during the first run, then again during recovery's own writes.
    let disk = SimDisk::new();
    Keys::install(&disk, "crash.test/log").unwrap();
    disk.crash_at_sync(25);
    let acked = workload(&disk, 99);
    let mut rng = Rng::new(5);
    let image = disk.after_power_cut(&mut rng);
    for k in 1..6 {
        let second = image.after_power_cut(&mut Rng::new(k));
        second.crash_at_sync(k);
        let _ = Store::open_with(Arc::new(second.clone()), options()).map(|s| s.publish());
        check_recovered(
            second.after_power_cut(&mut Rng::new(k + 100)),
            &acked,
            &format!("second crash at {k}"),
        );
    }
}
