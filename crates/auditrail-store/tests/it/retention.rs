//! Retention with a controllable clock: whole sealed segments past retention are purged
//! (crypto-erased), held ones stay, the audit passes before and after, and proofs of purged
//! events still verify against the signed checkpoint.

use auditrail_core::event::{ClientEvent, PreparedEvent};
use auditrail_core::merkle::{self, verify_inclusion};
use auditrail_store::audit::audit;
use auditrail_store::io::Io;
use auditrail_store::keys::Keys;
use auditrail_store::reader::{list_segments, segment_path};
use auditrail_store::retention::{DAY_MS, Hold, RetentionPolicy};
use auditrail_store::sim::SimDisk;
use auditrail_store::{Options, Store};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// 2019-01-01T00:00:00Z.
const T0: i64 = 1_546_300_800_000;

fn event(day: i64, i: u64, project: &str, patient: &str) -> PreparedEvent {
    ClientEvent::validate(json!({
        "occurred_at": auditrail_core::time::format_millis(T0 + day * DAY_MS),
        "action": "patient.read", "outcome": "success", "project": project,
        "patient": {"id": patient}, "actor": {"user_id": format!("u{i}")}
    }))
    .unwrap()
    .prepare()
    .unwrap()
}

struct Log {
    disk: SimDisk,
    clock: Arc<AtomicI64>,
}

impl Log {
    fn options(&self) -> Options {
        let clock = self.clock.clone();
        Options {
            publish_interval_ms: 0,
            clock: Arc::new(move || clock.load(Ordering::SeqCst)),
            ..Options::default()
        }
    }

    fn open(&self) -> Store {
        Store::open_with(Arc::new(self.disk.clone()), self.options()).unwrap()
    }

    fn audit_ok(&self) -> auditrail_store::audit::AuditReport {
        let keys = Keys::load(&self.disk).unwrap();
        let report = audit(&self.disk, &keys, &mut |_| {}).unwrap();
        assert!(report.ok(), "audit: {:?}", report.problems);
        report
    }
}

/// Ten days of events, one segment a day (segments roll at each UTC day), then today's.
/// Day 1 is project "trial"; day 2 mentions patient HOLD-ME; every other day is "clinic".
fn ten_days() -> (Log, Store, Vec<(u64, u64)>) {
    let disk = SimDisk::new();
    Keys::install(&disk, "test.example/log").unwrap();
    let log = Log { disk, clock: Arc::new(AtomicI64::new(T0 + 3_600_000)) };
    let store = log.open();
    let mut days = Vec::new();
    for day in 0..10 {
        log.clock.store(T0 + day * DAY_MS + 3_600_000, Ordering::SeqCst);
        let project = if day == 1 { "trial" } else { "clinic" };
        let first = store.stages().sequenced;
        let batch = (0..50)
            .map(|i| {
                let patient = if day == 2 && i == 7 { "HOLD-ME".into() } else { format!("P{i}") };
                event(day, i, project, &patient)
            })
            .collect();
        store.append(batch).unwrap();
        days.push((first, store.stages().sequenced));
    }
    // Today, years later: the active segment, never purged.
    log.clock.store(T0 + 3000 * DAY_MS, Ordering::SeqCst);
    store.append(vec![event(3000, 0, "clinic", "P0")]).unwrap();
    store.publish().unwrap();
    assert_eq!(list_segments(&log.disk).unwrap().len(), 11);
    (log, store, days)
}

fn hold(
    store: &Store,
    id: &str,
    project: Option<&str>,
    patient: Option<&str>,
    range: Option<(i64, i64)>,
) -> Hold {
    Hold {
        id: id.into(),
        reason: "litigation 2026-114".into(),
        created_ms: T0,
        project: project.map(str::to_string),
        patient_token: patient.map(|p| store.patient_token(p)),
        from_ms: range.map(|r| r.0),
        to_ms: range.map(|r| r.1),
    }
}

#[test]
fn purges_expired_segments_keeps_held_ones_and_proofs_still_verify() {
    let (log, store, days) = ten_days();
    let before = log.audit_ok();
    assert_eq!(before.purged_events, 0);
    let policy = RetentionPolicy::default();
    store.add_hold(hold(&store, "by-project", Some("trial"), None, None)).unwrap();
    store.add_hold(hold(&store, "by-patient", None, Some("HOLD-ME"), None)).unwrap();
    let day4 = (T0 + 4 * DAY_MS, T0 + 5 * DAY_MS);
    store.add_hold(hold(&store, "by-time", None, None, Some(day4))).unwrap();
    assert!(
        store.add_hold(hold(&store, "by-time", Some("x"), None, None)).is_err(),
        "ids are unique"
    );

    // The day before day 0 expires, nothing goes.
    let expiry = |day: i64| T0 + day * DAY_MS + 3_600_000 + 2557 * DAY_MS;
    assert!(store.purge(&policy, expiry(0) - 1, "test").unwrap().is_empty());

    // Days 0..=5 have expired at expiry(5); 1, 2 and 4 are held.
    let plan = store.retention_plan(&policy, expiry(5)).unwrap();
    let held: Vec<(u64, Vec<String>)> = plan
        .iter()
        .filter(|d| !d.held_by.is_empty())
        .map(|d| (d.first_seq, d.held_by.clone()))
        .collect();
    assert_eq!(
        held,
        [
            (days[1].0, vec!["by-project".to_string()]),
            (days[2].0, vec!["by-patient".to_string()]),
            (days[4].0, vec!["by-time".to_string()])
        ]
    );
    let gone = store.purge(&policy, expiry(5), "test").unwrap();
    let gone_ranges: Vec<(u64, u64)> = gone.iter().map(|p| (p.first_seq, p.end_seq)).collect();
    assert_eq!(gone_ranges, [days[0], days[3], days[5]]);
    store.publish().unwrap();

    // Gone: no file, nothing readable, even with every key.
    for &(first, end) in &gone_ranges {
        assert_eq!(log.disk.len(&segment_path(first)).unwrap(), None);
        assert!(store.read_events(first, end).unwrap().is_empty());
        assert!(store.purged().find(first).is_some() && store.purged().find(end - 1).is_some());
    }
    // Held and young segments are all there.
    for &(first, end) in [days[1], days[2], days[4], days[6], days[9]].iter() {
        assert_eq!(store.read_events(first, end).unwrap().len() as u64, end - first);
        assert!(store.purged().find(first).is_none());
    }

    // The proof that a purged event existed still verifies against the signed checkpoint.
    let seq = days[3].0 + 17;
    let size = store.stages().published;
    let checkpoint = store.checkpoint(None).unwrap();
    let text = auditrail_core::note::open(&checkpoint, &[store.verifier()]).unwrap();
    let root = auditrail_core::checkpoint::Checkpoint::parse(text).unwrap().root;
    let leaf = merkle::leaf_hash(&store.leaf_entry(seq).unwrap().encode());
    let proof = store.inclusion_proof(seq, size).unwrap();
    verify_inclusion(&leaf, seq, size, &proof, &root).unwrap();

    let after = log.audit_ok();
    assert_eq!(after.purged_segments, 3);
    assert_eq!(after.purged_events, 150);
    // The purge event itself was appended and published.
    assert_eq!(after.published, before.published + 1);

    // Releasing a hold lets the next purge take what it kept; the purge survives a restart.
    assert_eq!(store.release_hold("by-project").unwrap().unwrap().id, "by-project");
    assert!(store.release_hold("by-project").unwrap().is_none());
    store.close().unwrap();
    let store = log.open();
    assert_eq!(store.purged().segments().len(), 3);
    let gone = store.purge(&policy, expiry(5), "test").unwrap();
    assert_eq!(gone.iter().map(|p| (p.first_seq, p.end_seq)).collect::<Vec<_>>(), [days[1]]);
    // Appending goes on after purges.
    store.append(vec![event(3000, 1, "clinic", "P1")]).unwrap();
    store.publish().unwrap();
    store.close().unwrap();
    log.audit_ok();
}

#[test]
fn per_project_retention_keeps_a_segment_until_its_longest_project_expires() {
    let (log, store, days) = ten_days();
    let mut policy = RetentionPolicy { default_days: 2557, ..Default::default() };
    policy.projects.insert("trial".into(), 3650);
    let at = T0 + 9 * DAY_MS + 2557 * DAY_MS + 7_200_000;
    let gone: Vec<u64> =
        store.purge(&policy, at, "test").unwrap().iter().map(|p| p.first_seq).collect();
    assert!(!gone.contains(&days[1].0), "the trial's ten years are not over");
    assert_eq!(gone.len(), 9);
    let gone = store.purge(&policy, T0 + 3652 * DAY_MS, "test").unwrap();
    assert_eq!(gone.len(), 1);
    store.close().unwrap();
    log.audit_ok();
}

#[test]
fn an_interrupted_purge_is_finished_on_open() {
    let (log, store, days) = ten_days();
    let bytes = log.disk.read(&segment_path(days[0].0)).unwrap();
    store.purge(&RetentionPolicy::default(), T0 + 2558 * DAY_MS, "test").unwrap();
    store.close().unwrap();
    // As if the crash came after the record was durable but before the file was deleted.
    log.disk.write_file(&segment_path(days[0].0), &bytes).unwrap();
    log.audit_ok();
    let store = log.open();
    assert_eq!(log.disk.len(&segment_path(days[0].0)).unwrap(), None);
    store.close().unwrap();
    log.audit_ok();
}

#[test]
fn tampering_with_a_purged_range_is_detected() {
    let (log, store, days) = ten_days();
    store.purge(&RetentionPolicy::default(), T0 + 2558 * DAY_MS, "test").unwrap();
    store.close().unwrap();
    // Deleting a segment without a purge record is a gap the audit reports.
    log.disk.remove(&segment_path(days[6].0)).unwrap();
    let keys = Keys::load(&log.disk).unwrap();
    let report = audit(&log.disk, &keys, &mut |_| {}).unwrap();
    assert!(!report.ok());
    assert!(
        report.problems.iter().any(|p| p.detail.contains("was expected")),
        "{:?}",
        report.problems
    );
}

#[test]
fn a_patient_hold_placed_after_planning_still_holds() {
    let (log, store, days) = ten_days();
    let policy = RetentionPolicy::default();
    let at = T0 + 5 * DAY_MS + 3_600_000 + 2557 * DAY_MS;
    // Planning first caches summaries that name no patient (no hold named one yet).
    let plan = store.retention_plan(&policy, at).unwrap();
    assert!(plan.iter().find(|d| d.first_seq == days[2].0).unwrap().purge);
    store.add_hold(hold(&store, "late", None, Some("HOLD-ME"), None)).unwrap();
    let gone: Vec<u64> =
        store.purge(&policy, at, "test").unwrap().iter().map(|p| p.first_seq).collect();
    assert!(!gone.contains(&days[2].0), "the patient's segment is held");
    assert_eq!(gone.len(), 5);
    store.close().unwrap();
    log.audit_ok();
}
