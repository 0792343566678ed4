//! Master key rotation over the simulated disk: a rewrap crashed at every sync point (and cut
//! by a power failure that tears in-place header writes) always reopens with every header
//! decodable, whichever master keys are at hand, and finishes when run again; retiring then
//! removes the old version, and everything still reads back.

use crate::event;
use auditrail_store::audit::audit;
use auditrail_store::io::Io;
use auditrail_store::keys::{self, Keys, MASTER_KEYS_PATH, MasterKeySource, MasterKeys};
use auditrail_store::reader::{list_segments, segment_path};
use auditrail_store::rekey::{self, REWRAP_JOURNAL_PATH};
use auditrail_store::retention::{HOLDS_PATH, Hold};
use auditrail_store::segment::{SEGMENT_HEADER_BYTES, SegmentHeader};
use auditrail_store::sim::{Rng, SimDisk};
use auditrail_store::{Options, Store};
use std::sync::Arc;

fn options() -> Options {
    Options { publish_interval_ms: 0, segment_bytes_max: 2048, ..Options::default() }
}

fn open(disk: &SimDisk) -> Store {
    Store::open_with(Arc::new(disk.clone()), options()).unwrap_or_else(|e| panic!("open: {e}"))
}

/// An exact copy of a disk whose every byte and name is durable.
fn copy(disk: &SimDisk) -> SimDisk {
    disk.sync_all().unwrap();
    disk.after_power_cut(&mut Rng::new(0))
}

fn hold(store: &Store) -> Hold {
    Hold {
        id: "h1".into(),
        reason: "litigation".into(),
        created_ms: 0,
        project: None,
        patient_token: Some(store.patient_token("MRN00000003")),
        from_ms: None,
        to_ms: None,
    }
}

/// A log of several segments under master key version 1 with a legal hold, then version 2
/// added: the state `auditrail key rotate` leaves. Returns the disk, the events and the key
/// text before rotation.
fn rotated_log() -> (SimDisk, Vec<(u64, Vec<u8>)>, String) {
    let disk = SimDisk::new();
    Keys::install(&disk, "rekey.test/log").unwrap();
    let store = open(&disk);
    for b in 0..24u64 {
        store.append((0..8).map(|i| event(b * 10 + i, None)).collect()).unwrap();
    }
    store.add_hold(hold(&store)).unwrap();
    let events = store.read_events(0, u64::MAX).unwrap();
    store.close().unwrap();
    assert!(list_segments(&disk).unwrap().len() >= 5, "several segments to rewrap");
    let v1 = String::from_utf8(disk.read(MASTER_KEYS_PATH).unwrap()).unwrap();
    let (version, text) = rekey::rotate(&disk, &MasterKeySource::DataDir).unwrap();
    assert_eq!((version, text), (2, None));
    (disk, events, v1)
}

/// Everything a reader needs is intact: the store opens (finishing any journal), every header
/// unwraps, every event reads back unchanged, the holds open, and the audit passes.
fn check_intact(disk: &SimDisk, events: &[(u64, Vec<u8>)], context: &str) {
    let store = Store::open_with(Arc::new(disk.clone()), options())
        .unwrap_or_else(|e| panic!("{context}: reopening failed: {e}"));
    assert_eq!(disk.len(REWRAP_JOURNAL_PATH).unwrap(), None, "{context}: journal finished");
    assert_eq!(store.read_events(0, u64::MAX).unwrap(), events, "{context}");
    assert_eq!(store.holds().unwrap().len(), 1, "{context}");
    store.close().unwrap();
    let keys = Keys::load(disk).unwrap();
    let report = audit(disk, &keys, &mut |_| {}).unwrap();
    assert!(report.ok(), "{context}: {:?}", report.problems);
}

/// Each segment header's master key version (`None`: it does not decode, e.g. torn).
fn header_versions_or_torn(disk: &SimDisk) -> Vec<Option<u32>> {
    list_segments(disk)
        .unwrap()
        .into_iter()
        .map(|f| {
            let b = disk.read_at(&segment_path(f), 0, SEGMENT_HEADER_BYTES).unwrap();
            SegmentHeader::decode(&b).ok().map(|h| h.key_version)
        })
        .collect()
}

fn header_versions(disk: &SimDisk) -> Vec<u32> {
    header_versions_or_torn(disk).into_iter().map(|v| v.expect("header decodes")).collect()
}

#[test]
fn rewrap_then_retire_moves_everything_to_the_new_key() {
    let (disk, events, v1_text) = rotated_log();
    let store = open(&disk);
    // Segments opened before the rewrap stay on version 1; only the active one may roll.
    assert!(header_versions(&disk).iter().all(|v| *v == 1));
    let report = store.rewrap().unwrap();
    assert_eq!(report.version, 2);
    assert_eq!(report.segments_rewrapped, report.segments);
    assert_eq!(report.files_resealed, [HOLDS_PATH]);
    assert_eq!(report.usage.versions().into_iter().collect::<Vec<_>>(), [2]);
    // Running it again changes nothing.
    let again = store.rewrap().unwrap();
    assert_eq!((again.segments_rewrapped, again.files_resealed.len()), (0, 0));
    let retired = store.retire_unused_master_keys().unwrap();
    assert_eq!((retired.retired, retired.kept), (vec![1], vec![2]));
    store.close().unwrap();

    let text = String::from_utf8(disk.read(MASTER_KEYS_PATH).unwrap()).unwrap();
    assert_eq!(MasterKeys::parse(&text).unwrap().versions(), [2]);
    check_intact(&disk, &events, "after retiring");
    // The old key alone opens nothing any more.
    let old = copy(&disk);
    old.write_file(MASTER_KEYS_PATH, v1_text.as_bytes()).unwrap();
    let e = Store::open_with(Arc::new(old), options()).unwrap_err().to_string();
    assert!(e.contains("master key version 2") && e.contains(MASTER_KEYS_PATH), "{e}");
}

#[test]
fn a_rewrap_crashed_at_every_sync_point_reopens_whole_with_either_key_file() {
    let (base, events, v1_text) = rotated_log();
    let syncs = {
        let disk = copy(&base);
        let store = open(&disk);
        let start = disk.syncs();
        store.rewrap().unwrap();
        disk.syncs() - start
    };
    assert!(syncs >= 10, "a journal, each header and the holds are synced ({syncs})");
    let mut journal_left = 0;
    for k in 1..=syncs + 1 {
        let disk = copy(&base);
        let store = open(&disk);
        disk.crash_at_sync(k);
        let _ = store.rewrap();
        drop(store);
        for cut in 0..3 {
            let image = disk.after_power_cut(&mut Rng::new(k * 31 + cut));
            let context = format!("crash at sync {k} of {syncs}, power-cut image {cut}");
            // While a journal is left (or before any header changed), the old key file alone
            // is enough: the rewrap is rolled back.
            let untouched = header_versions_or_torn(&image).iter().all(|v| *v == Some(1));
            if image.len(REWRAP_JOURNAL_PATH).unwrap().is_some() || untouched {
                journal_left += u64::from(!untouched);
                let old = copy(&image);
                old.write_file(MASTER_KEYS_PATH, v1_text.as_bytes()).unwrap();
                old.sync_file(MASTER_KEYS_PATH).unwrap();
                check_intact(&old, &events, &format!("{context}, old keys"));
                assert!(header_versions(&old).iter().all(|v| *v == 1), "{context}");
            }
            // With the new key file: finished, and a second rewrap completes the rest.
            check_intact(&image, &events, &format!("{context}, new keys"));
            let store = open(&image);
            store.rewrap().unwrap_or_else(|e| panic!("{context}: rewrap again: {e}"));
            assert_eq!(store.retire_unused_master_keys().unwrap().retired, [1], "{context}");
            store.close().unwrap();
            assert!(header_versions(&image).iter().all(|v| *v == 2), "{context}");
            check_intact(&image, &events, &format!("{context}, retired"));
        }
    }
    assert!(journal_left > 0, "some crashes left a journal over half-written headers");
}

#[test]
fn retire_refuses_while_a_journal_is_left_and_keeps_versions_in_use() {
    let (disk, _, _) = rotated_log();
    let store = open(&disk);
    // Nothing is on version 2 yet, but the newest version always stays; 1 is in use.
    let r = store.retire_unused_master_keys().unwrap();
    assert_eq!((r.retired, r.kept), (vec![], vec![1, 2]));
    disk.write_file(REWRAP_JOURNAL_PATH, b"left over").unwrap();
    let e = store.retire_unused_master_keys().unwrap_err().to_string();
    assert!(e.contains("auditrail key rewrap"), "{e}");
    drop(store);
    // A journal that does not decode is refused loudly, not guessed at.
    let e = Store::open_with(Arc::new(disk.clone()), options()).unwrap_err().to_string();
    assert!(e.contains(REWRAP_JOURNAL_PATH), "{e}");
}

#[test]
fn holds_written_in_the_clear_are_sealed_on_open() {
    let disk = SimDisk::new();
    Keys::install(&disk, "rekey.test/log").unwrap();
    let store = open(&disk);
    let h = hold(&store);
    store.close().unwrap();
    disk.write_file(HOLDS_PATH, &serde_json::to_vec(&[&h]).unwrap()).unwrap();
    let store = open(&disk);
    assert_eq!(store.holds().unwrap(), [h]);
    let sealed = disk.read(HOLDS_PATH).unwrap();
    assert!(sealed.starts_with(keys::SEALED_MAGIC));
    assert!(!String::from_utf8_lossy(&sealed).contains("litigation"));
    store.close().unwrap();
}
