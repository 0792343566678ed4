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
    assert_eq!(
        again[0],
        auditrail_store::Receipt { duplicate: true, recorded_at_ms: 0, ..first[0].clone() }
    );
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

#[test]
fn the_tail_follows_the_log_across_blocks_and_segments_and_blocks_read_back() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    // Tiny blocks and segments, so 600 events span many of each.
    let options = Options { block_plain_bytes_target: 1024, segment_bytes_max: 2048, ..options() };
    let store = Store::open_with(Arc::new(disk.clone()), options).unwrap();
    let mut tail = store.tail(0);
    let mut seen = Vec::new();
    let mut locations = Vec::new();
    for b in 0..30 {
        store.append((0..20).map(|i| event(b * 100 + i, None)).collect()).unwrap();
        let durable = store.stages().sequenced;
        // One block per call: the reader must keep its place between calls.
        while tail.next_seq() < durable {
            tail.read(durable, 1, |at, seq, record| {
                if locations.last() != Some(at) {
                    locations.push(*at);
                }
                seen.push((seq, record.canonical.to_vec()));
                Ok(())
            })
            .unwrap();
        }
    }
    assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), (0..600).collect::<Vec<_>>());
    assert_eq!(seen, store.read_events(0, 600).unwrap());
    assert!(locations.len() >= 30, "every append call is at least one block");
    assert!(
        locations.iter().map(|l| l.segment).collect::<std::collections::BTreeSet<_>>().len() > 3
    );

    // Starting in the middle of a block delivers from that seq on.
    let mut middle = store.tail(333);
    let mut from_middle = Vec::new();
    middle
        .read(600, usize::MAX, |_, seq, _| {
            let _: () = from_middle.push(seq);
            Ok(())
        })
        .unwrap();
    assert_eq!(from_middle, (333..600).collect::<Vec<_>>());
    // Never past the durable size it is given.
    let mut bounded = store.tail(0);
    assert_eq!(bounded.read(0, usize::MAX, |_, _, _| Ok(())).unwrap(), 0);

    let reader = store.block_reader();
    for at in &locations {
        let block = reader.read(at).unwrap();
        assert_eq!(block.len(), at.count as usize);
        for seq in at.first_seq..at.end_seq() {
            assert_eq!(block.get(seq).unwrap(), seen[seq as usize].1.as_slice());
        }
        assert!(block.get(at.end_seq()).is_none());
    }
    let wrong = auditrail_store::tail::BlockLocation { count: 999, ..locations[3] };
    assert!(matches!(reader.read(&wrong), Err(StoreError::Corrupted { .. })));
}

#[test]
fn a_group_commit_is_cut_into_blocks_between_and_within_append_calls() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    // The sequencer waits 50 ms for appends to join a group, so the 8 concurrent one-event
    // calls of each round land in one group commit, which must then be cut into several blocks.
    let target = 600;
    let options = Options { block_plain_bytes_target: target, batch_wait_us: 50_000, ..options() };
    let store = Arc::new(Store::open_with(Arc::new(disk.clone()), options).unwrap());
    let rounds = 5;
    for round in 0..rounds {
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let store = store.clone();
                std::thread::spawn(move || store.append(vec![event(round * 100 + i, None)]))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
    }
    // One call of many events is cut too: a bulk request's chunk must not become one huge
    // block that every lookup of one of its events decompresses whole.
    let big_call = 60;
    store.append((0..big_call).map(|i| event(10_000 + i, None)).collect()).unwrap();
    let durable = store.stages().sequenced;
    assert_eq!(durable, 8 * rounds + big_call);
    let mut blocks = Vec::new();
    store
        .tail(0)
        .read(durable, usize::MAX, |at, _, _| {
            if blocks.last() != Some(at) {
                blocks.push(*at);
            }
            Ok(())
        })
        .unwrap();
    // Without cutting there would be at most one block per group, i.e. per round and call.
    assert!(
        blocks.len() > rounds as usize + 1,
        "{} blocks for {} groups",
        blocks.len(),
        rounds + 1
    );
    let in_big_call = blocks.iter().filter(|b| b.first_seq >= 8 * rounds).count();
    assert!(in_big_call > 1, "the {big_call}-event call stayed in {in_big_call} block");
    // No block grows past the target by more than its last event.
    let reader = store.block_reader();
    for at in &blocks {
        let block = reader.read(at).unwrap();
        let sizes: Vec<usize> =
            (at.first_seq..at.end_seq()).map(|s| block.get(s).unwrap().len()).collect();
        let before_last: usize = sizes[..sizes.len() - 1].iter().sum();
        assert!(before_last < target, "block at {at:?} kept growing past the target: {sizes:?}");
    }
}

/// The integrity check runs on a live store: publications during the audit replace the
/// checkpoint file and delete the partial tiles of the size being audited, and neither is a
/// problem. On a real file system too, where a tile rewritten in place is briefly empty.
#[test]
fn an_audit_of_a_store_that_keeps_publishing_finds_nothing_wrong() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    audit_while_publishing(Arc::new(disk));

    let tmp = tempfile::tempdir().unwrap();
    auditrail_store::init(tmp.path(), "test.example/log").unwrap();
    audit_while_publishing(Arc::new(auditrail_store::io::StdIo::new(tmp.path())));
}

fn audit_while_publishing(io: Arc<dyn Io>) {
    let store = Store::open_with(io.clone(), options()).unwrap();
    store.append((0..300).map(|i| event(i, None)).collect()).unwrap();
    store.publish().unwrap();
    let keys = Keys::load(io.as_ref()).unwrap();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            for b in 0..200u64 {
                store.append(vec![event(1000 + b, None)]).unwrap();
                store.publish().unwrap();
            }
        });
        let mut audits = 0;
        while !writer.is_finished() || audits == 0 {
            let report = auditrail_store::audit::audit(io.as_ref(), &keys, &mut |_| {}).unwrap();
            assert!(report.ok(), "audit {audits}: {:?}", report.problems);
            audits += 1;
        }
    });
    store.close().unwrap();
    // A tile write a crash interrupted leaves its temporary file; opening removes it.
    let stray = "log/tile/0/000.tmp";
    io.write_file(stray, b"torn").unwrap();
    Store::open_with(io.clone(), options()).unwrap().close().unwrap();
    assert_eq!(io.len(stray).unwrap(), None);
}

/// Segments after the first compress with a dictionary trained on the one before
/// (`dictionary.rs`); every reader opens them: the tail, the block reader, the audit, and
/// recovery after a reopen. A roll that crashed before its rename leaves a temporary file,
/// which recovery removes.
#[test]
fn later_segments_compress_with_a_dictionary_and_every_reader_opens_them() {
    use auditrail_store::segment::{self, SEGMENT_VERSION, SEGMENT_VERSION_DICTIONARY};
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    // Segments of a few thousand events: enough samples to train on at half of one.
    let options = Options { segment_bytes_max: 64 << 10, ..options() };
    let store = Store::open_with(Arc::new(disk.clone()), options.clone()).unwrap();
    let batches = 100u64;
    for b in 0..batches {
        store.append((0..200).map(|i| event(b * 1000 + i, None)).collect()).unwrap();
        if b % 10 == 9 {
            // Training runs beside the writer: give it time, as a real workload's pace does.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let total = batches * 200;
    let versions: Vec<u8> = auditrail_store::reader::list_segments(&disk)
        .unwrap()
        .iter()
        .map(|&f| {
            let path = auditrail_store::reader::segment_path(f);
            segment::SegmentHeader::decode(&disk.read_at(&path, 0, 96).unwrap()).unwrap().version
        })
        .collect();
    assert_eq!(versions[0], SEGMENT_VERSION, "the first segment has nothing to learn from");
    // Once a segment has a dictionary, every later one has one too.
    let first_with = versions.iter().position(|&v| v == SEGMENT_VERSION_DICTIONARY);
    assert!(first_with.is_some_and(|i| i < versions.len() - 2), "{versions:?}");
    assert!(
        versions[first_with.unwrap()..].iter().all(|&v| v == SEGMENT_VERSION_DICTIONARY),
        "{versions:?}"
    );

    let mut blocks = Vec::new();
    let mut seen = Vec::new();
    store
        .tail(0)
        .read(total, usize::MAX, |at, seq, record| {
            if blocks.last() != Some(at) {
                blocks.push(*at);
            }
            seen.push((seq, record.canonical.to_vec()));
            Ok(())
        })
        .unwrap();
    assert_eq!(seen.len() as u64, total);
    assert_eq!(seen, store.read_events(0, total).unwrap());
    let reader = store.block_reader();
    for at in &blocks {
        let block = reader.read(at).unwrap();
        for seq in at.first_seq..at.end_seq() {
            assert_eq!(block.get(seq).unwrap(), seen[seq as usize].1.as_slice());
        }
    }
    store.publish().unwrap();
    let keys = Keys::load(&disk).unwrap();
    let report = auditrail_store::audit::audit(&disk, &keys, &mut |_| {}).unwrap();
    assert!(report.ok(), "{:?}", report.problems);
    store.close().unwrap();

    // A roll interrupted before its rename: the temporary file is not part of the log.
    disk.write_file("segments/00000000000099999999.seg.tmp", b"ATRLSEG1 torn").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options).unwrap();
    assert!(!disk.list("segments").unwrap().iter().any(|n| n.ends_with(".tmp")));
    store.append((0..200).map(|i| event(900_000 + i, None)).collect()).unwrap();
    let after = store.read_events(0, total + 200).unwrap();
    assert_eq!(&after[..total as usize], seen.as_slice());
    assert_eq!(after.len() as u64, total + 200);

    // A block far larger than a dictionary segment's usual one (an event with 24 KB of
    // text that does not compress) is read whole, beyond the first read's 2 KiB.
    let noise = |n: u64| -> String {
        (0..1000u64)
            .map(|i| char::from(b'a' + ((((n * 1000 + i) * 2_654_435_761) >> 7) & 15) as u8))
            .collect()
    };
    let context: serde_json::Map<String, serde_json::Value> =
        (0..24).map(|n| (format!("note{n}"), noise(n).into())).collect();
    let mut big = serde_json::json!({
        "occurred_at": "2026-11-22T10:15:00Z", "category": "phi_access", "action": "patient.read",
        "outcome": "success", "actor": {"user_id": "u1"}, "source": {"system": "ehr"},
        "context": context
    });
    big["id"] = serde_json::json!("big-1");
    let big = auditrail_core::event::ClientEvent::validate(big).unwrap().prepare().unwrap();
    let seq = store.append(vec![big]).unwrap()[0].seq;
    let mut at = None;
    store
        .tail(seq)
        .read(seq + 1, usize::MAX, |block, _, _| {
            at = Some(*block);
            Ok(())
        })
        .unwrap();
    let block = store.block_reader().read(&at.unwrap()).unwrap();
    assert_eq!(block.get(seq).unwrap(), store.read_events(seq, seq + 1).unwrap()[0].1.as_slice());
    store.close().unwrap();
}

/// The callback form answers once the batch is durable (a power cut right after the answer
/// keeps it), and answers a failed sync with the error instead of receipts.
#[test]
fn try_append_then_answers_after_the_sync_and_reports_a_failed_one() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let store = Store::open_with(Arc::new(disk.clone()), options()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let answer = tx.clone();
    store
        .try_append_then((0..5).map(|i| event(i, None)).collect(), move |r| answer.send(r).unwrap())
        .unwrap();
    let receipts = rx.recv().unwrap().unwrap();
    assert_eq!(receipts.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    let survivor = disk.after_power_cut(&mut auditrail_store::sim::Rng::new(3));
    let reopened = Store::open_with(Arc::new(survivor), options()).unwrap();
    assert_eq!(reopened.stages().sequenced, 5, "acknowledged means durable");
    reopened.close().unwrap();

    disk.fail_sync(1);
    let answer = tx.clone();
    store.try_append_then(vec![event(9, None)], move |r| answer.send(r).unwrap()).unwrap();
    assert!(matches!(rx.recv().unwrap(), Err(StoreError::Poisoned(_))));
    // Refused at once from now on, and the callback of a refused batch is never called.
    let answer = tx.clone();
    let refused = store.try_append_then(vec![event(10, None)], move |r| answer.send(r).unwrap());
    assert!(refused.is_err());
    drop(tx);
    assert!(rx.recv().is_err(), "no answer for a refused batch");
}

/// Submitted events (nobody waits for them) wait up to `submit_wait_us` for company and are
/// then sealed together; an awaited append, a publish or a close takes them along at once.
#[test]
fn submitted_events_coalesce_until_someone_waits() {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let options = Options { submit_wait_us: 600_000_000, ..options() };
    let store = Store::open_with(Arc::new(disk.clone()), options.clone()).unwrap();
    let syncs = disk.syncs();
    for i in 0..20 {
        store.submit(vec![event(i, None)]).unwrap();
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(store.stages().sequenced, 0, "still waiting for company");
    assert_eq!(store.submitted_pending(), 20, "and counted as waiting");
    assert_eq!(disk.syncs(), syncs);
    // An append someone waits for is not held up: it seals the group, submitted events too.
    let started = std::time::Instant::now();
    let receipts = store.append(vec![event(20, None)]).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    assert_eq!(receipts[0].seq, 20);
    assert_eq!(store.stages().sequenced, 21);
    // The submitted ones were answered (to nobody) before the append's own answer.
    assert_eq!(store.submitted_pending(), 0);
    // A publish takes them along; so does a close.
    store.submit(vec![event(21, None)]).unwrap();
    assert_eq!(store.publish().unwrap().sequenced, 22);
    assert_eq!(store.submitted_pending(), 0);
    store.submit(vec![event(22, None)]).unwrap();
    store.close().unwrap();
    let reopened = Store::open_with(Arc::new(disk.clone()), options).unwrap();
    assert_eq!(reopened.stages().sequenced, 23);
    reopened.close().unwrap();

    // With the default wait, a lone submitted event is sealed within milliseconds.
    // Once none is pending, the stages count it: what a reader of its own traces waits for.
    let store = Store::open_with(Arc::new(disk.clone()), self::options()).unwrap();
    store.submit(vec![event(23, None)]).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while store.submitted_pending() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(store.stages().sequenced, 24);
    store.close().unwrap();
}
