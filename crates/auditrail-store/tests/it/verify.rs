//! Incremental verification: each increment checks only the events published since the
//! verified prefix, agrees with the full audit, and finds tampering within its range.

use crate::event;
use auditrail_core::merkle::CompactRange;
use auditrail_store::io::Io;
use auditrail_store::keys::Keys;
use auditrail_store::reader::{list_segments, segment_path};
use auditrail_store::retention::{DAY_MS, RetentionPolicy};
use auditrail_store::sim::SimDisk;
use auditrail_store::{Options, Store};
use std::sync::Arc;

fn options() -> Options {
    Options { publish_interval_ms: 60_000, segment_bytes_max: 4096, ..Options::default() }
}

fn log_of(batches: u64) -> (SimDisk, Store) {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    append(&store, 0, batches);
    (disk, store)
}

fn append(store: &Store, from_batch: u64, batches: u64) {
    for b in from_batch..from_batch + batches {
        store.append((0..37).map(|i| event(b * 100 + i, None)).collect()).unwrap();
    }
    store.publish().unwrap();
}

#[test]
fn increments_cover_new_events_only_and_agree_with_the_full_audit() {
    let (_disk, store) = log_of(10);
    let first = store.auditor().verify_increment(&CompactRange::new()).unwrap();
    assert!(first.ok(), "{:?}", first.problems);
    assert_eq!((first.from, first.to, first.events), (0, 370, 370));
    let full = store.auditor().audit(&mut |_| {}).unwrap();
    assert!(full.ok(), "{:?}", full.problems);
    assert_eq!(full.range, first.range, "both recompute the same tree");

    append(&store, 10, 7);
    let second = store.auditor().verify_increment(&first.range).unwrap();
    assert!(second.ok(), "{:?}", second.problems);
    assert_eq!((second.from, second.to, second.events), (370, 629, 259));
    assert_eq!(second.range, store.auditor().audit(&mut |_| {}).unwrap().range);

    // Nothing new: nothing to open, still ok.
    let idle = store.auditor().verify_increment(&second.range).unwrap();
    assert!(idle.ok());
    assert_eq!((idle.from, idle.to, idle.events), (629, 629, 0));
    store.close().unwrap();
}

#[test]
fn a_changed_event_in_the_increment_is_found_and_an_older_one_is_left_to_the_full_audit() {
    let (disk, store) = log_of(10);
    let verified = store.auditor().verify_increment(&CompactRange::new()).unwrap().range;
    let old_segments = list_segments(&disk).unwrap();
    append(&store, 10, 10);
    store.close().unwrap();
    let keys = Keys::load(&disk).unwrap();
    let newest = *list_segments(&disk).unwrap().last().unwrap();
    assert!(!old_segments.contains(&newest), "the new events are in new segments");

    // A byte of a new event's block: the increment names the segment.
    let path = segment_path(newest);
    let len = disk.len(&path).unwrap().unwrap() as usize;
    disk.flip_byte(&path, len - 20);
    let report = auditrail_store::verify::verify_increment(&disk, &keys, &verified).unwrap();
    assert!(!report.ok());
    assert!(report.problems.iter().any(|p| p.location.contains(&path)), "{:?}", report.problems);
    disk.flip_byte(&path, len - 20);

    // A byte of an already verified event: outside the increment, the full audit's job.
    let old = segment_path(old_segments[0]);
    let len = disk.len(&old).unwrap().unwrap() as usize;
    disk.flip_byte(&old, len - 20);
    let report = auditrail_store::verify::verify_increment(&disk, &keys, &verified).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    let full = auditrail_store::audit::audit(&disk, &keys, &mut |_| {}).unwrap();
    assert!(full.problems.iter().any(|p| p.location.contains(&old)), "{:?}", full.problems);
}

#[test]
fn a_wrong_prefix_or_a_changed_tile_fails_the_increment() {
    let (disk, store) = log_of(3);
    let verified = store.auditor().verify_increment(&CompactRange::new()).unwrap().range;
    append(&store, 3, 3);
    store.close().unwrap();
    let keys = Keys::load(&disk).unwrap();
    let verify = |range: &CompactRange| {
        auditrail_store::verify::verify_increment(&disk, &keys, range).unwrap()
    };
    assert!(verify(&verified).ok());

    // A prefix that is not the log's (as if the verified state had been altered).
    let mut forged = CompactRange::new();
    for i in 0..verified.size() {
        forged.append([i as u8; 32]);
    }
    assert!(!verify(&forged).ok());

    // A prefix longer than the signed tree: the log would have shrunk.
    let mut longer = verified.clone();
    for _ in 0..1000 {
        longer.append([7; 32]);
    }
    let report = verify(&longer);
    assert!(
        report.problems.iter().any(|p| p.detail.contains("fewer than")),
        "{:?}",
        report.problems
    );

    // A changed leaf entry in the new range's bundle.
    let bundle = disk
        .paths()
        .into_iter()
        .find(|p| p.starts_with("log/tile/entries/000.p/"))
        .expect("a partial entry bundle");
    disk.flip_byte(&bundle, 200 * 43 + 5);
    let report = verify(&verified);
    assert!(
        report.problems.iter().any(|p| p.detail.contains("does not match")),
        "{:?}",
        report.problems
    );
}

#[test]
fn purged_events_are_checked_against_their_leaf_entries() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let clock = Arc::new(std::sync::atomic::AtomicI64::new(1_546_300_800_000));
    let c = clock.clone();
    let store = Store::open_with(
        Arc::new(disk.clone()),
        Options {
            clock: Arc::new(move || c.load(std::sync::atomic::Ordering::SeqCst)),
            ..options()
        },
    )
    .unwrap();
    append(&store, 0, 4);
    clock.fetch_add(3000 * DAY_MS, std::sync::atomic::Ordering::SeqCst);
    append(&store, 4, 1);
    let gone = store
        .purge(&RetentionPolicy::default(), clock.load(std::sync::atomic::Ordering::SeqCst), "test")
        .unwrap();
    assert!(!gone.is_empty());
    store.publish().unwrap();
    let report = store.auditor().verify_increment(&CompactRange::new()).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    assert_eq!(report.to, store.stages().published);
    store.close().unwrap();
}
