use crate::event;
use auditrail_store::io::Io;
use auditrail_store::keys::Keys;
use auditrail_store::sim::SimDisk;
use auditrail_store::{Options, Store, StoreError};
use std::sync::Arc;

fn options() -> Options {
    Options { publish_interval_ms: 60_000, segment_bytes_max: 4096, ..Options::default() }
}

#[test]
fn append_publish_reopen_read_back() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    let mut all = Vec::new();
    for b in 0..20 {
        let receipts = store.append((0..37).map(|i| event(b * 100 + i, None)).collect()).unwrap();
        all.extend(receipts);
    }
    assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), (0..740).collect::<Vec<_>>());
    let stages = store.publish().unwrap();
    assert_eq!((stages.sequenced, stages.integrated, stages.published), (740, 740, 740));
    let events = store.read_events(5, 7).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&events[0].1).unwrap();
    assert_eq!(v["seq"], 5);
    assert_eq!(v["id"], all[5].id.as_str());
    store.close().unwrap();
    assert!(
        disk.paths().iter().filter(|p| p.starts_with("segments/")).count() > 1,
        "segments rolled by size"
    );

    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    assert_eq!(store.stages().sequenced, 740);
    let more = store.append(vec![event(9999, None)]).unwrap();
    assert_eq!(more[0].seq, 740);
    store.close().unwrap();
    assert!(disk.read("log/checkpoint").unwrap().starts_with(b"test.example/log\n741\n"));
}

#[test]
fn a_repeated_client_id_returns_the_original_receipt() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    let first =
        store.append(vec![event(1, Some("k1")), event(2, Some("k1")), event(3, None)]).unwrap();
    assert!(!first[0].duplicate && first[1].duplicate);
    assert_eq!((first[1].seq, first[1].leaf_hash), (first[0].seq, first[0].leaf_hash));
    assert_eq!(first[2].seq, 1);
    store.close().unwrap();
    // The window survives a restart.
    let store = Store::open_with(Arc::new(disk), options()).unwrap();
    let again = store.append(vec![event(4, Some("k1"))]).unwrap();
    assert_eq!(again[0], auditrail_store::Receipt { duplicate: true, ..first[0].clone() });
    assert_eq!(store.stages().sequenced, 2);
}

#[test]
fn a_failed_fsync_poisons_the_store() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    store.append(vec![event(1, None)]).unwrap();
    disk.fail_sync(1);
    let err = store.append(vec![event(2, None)]).unwrap_err();
    assert!(matches!(err, StoreError::Poisoned(_)), "{err}");
    // The disk works again, but the store must not retry a failed fsync: it stays read-only.
    let err = store.append(vec![event(3, None)]).unwrap_err();
    assert!(matches!(err, StoreError::Poisoned(_)), "{err}");
    drop(store);
    let store = Store::open_with(Arc::new(disk), options()).unwrap();
    assert!(store.stages().sequenced >= 1);
}

#[test]
fn oversized_batches_are_refused_before_anything_is_written() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store =
        Store::open_with(Arc::new(disk), Options { batch_events_max: 4, ..options() }).unwrap();
    let err = store.append((0..5).map(|i| event(i, None)).collect()).unwrap_err();
    assert!(matches!(err, StoreError::InvalidInput(_)));
    assert_eq!(store.stages().sequenced, 0);
}
