//! Evidence bundles end to end: fetched from a running server, checked by `auditrail
//! verify-bundle` with nothing else, by `tlogverify` and the shell recipe of the bundle's own
//! README after `tar -x`, and found out when any byte of them changes or when the checkpoint
//! the recipient trusts does not match.

use crate::http::{Response, Server};
use crate::interop::tlogverify;
use crate::{bin, stderr, stdout, vkey};
use auditrail_core::evidence::{VerifyOptions, verify};
use auditrail_core::note::NoteVerifier;
use auditrail_core::ustar;
use serde_json::{Value, json};
use std::path::Path;
use std::process::Output;

/// `n` events; patient `MRN1` is in every sixth.
fn events(from: usize, n: usize) -> Value {
    let events: Vec<Value> = (from..from + n)
        .map(|i| {
            json!({"id": format!("ev-{i}"), "occurred_at": "2026-11-22T10:15:00Z",
                "category": "phi_access", "action": "patient.read", "outcome": "success",
                "actor": {"user_id": format!("u{}", i % 3), "name": "Dr. Ünïcode, \"quoted\""},
                "patient": {"id": format!("MRN{}", i % 6)}, "context": {"reason": "chart review"}})
        })
        .collect();
    json!(events)
}

fn ingest(s: &Server, from: usize, n: usize) {
    let r = s.post_json("/api/v1/events", &events(from, n));
    assert_eq!(r.status, 201, "{}", r.text());
    s.wait_indexed();
}

/// The newest checkpoint once it covers at least `size` leaves.
fn checkpoint_at_least(s: &Server, size: u64) -> String {
    for _ in 0..200 {
        let note = s.get("/log/checkpoint").text();
        if tree_size(&note) >= size {
            return note;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no checkpoint of size {size} within 5 s");
}

fn tree_size(note: &str) -> u64 {
    note.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
}

fn verify_bundle(file: &Path, args: &[&str]) -> Output {
    bin().arg("verify-bundle").arg(file).args(args).output().unwrap()
}

fn code(r: &Response) -> (u16, String) {
    (r.status, r.json()["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[test]
fn evidence_bundle_verifies_offline_and_every_byte_of_it_matters() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data);
    let v = vkey(&data);
    let key = NoteVerifier::from_vkey(&v).unwrap();

    // Three rounds of events, a checkpoint kept after the first two (the recipient's).
    ingest(&s, 0, 6);
    let early = checkpoint_at_least(&s, s.sequenced());
    ingest(&s, 6, 6);
    let trusted = checkpoint_at_least(&s, s.sequenced());
    ingest(&s, 12, 6);
    let (early_size, trusted_size) = (tree_size(&early), tree_size(&trusted));
    assert!(early_size < trusted_size);
    let early_file = tmp.path().join("early.checkpoint");
    let trusted_file = tmp.path().join("trusted.checkpoint");
    std::fs::write(&early_file, &early).unwrap();
    std::fs::write(&trusted_file, &trusted).unwrap();

    let r = s.get(&format!("/api/v1/events/evidence?patient=MRN1&trusted_size={trusted_size}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-tar"));
    assert_eq!(r.header("x-export-total"), Some("3"));
    let bundle = r.body.clone();
    let file = tmp.path().join("bundle.tar");
    std::fs::write(&file, &bundle).unwrap();
    let bundle_size: u64 = r.header("x-evidence-tree-size").unwrap().parse().unwrap();
    assert!(bundle_size > trusted_size);

    // auditrail verify-bundle: with the key the recipient trusts and their checkpoint.
    let trusted_arg = trusted_file.to_str().unwrap();
    let o = verify_bundle(&file, &["--key", &v, "--trusted-checkpoint", trusted_arg]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let summary = stdout(&o);
    assert!(summary.starts_with("ok: 3 event(s) of test.auditrail.local/log"), "{summary}");
    assert!(summary.contains(&format!("extends tree size {trusted_size}")), "{summary}");
    assert!(summary.contains("your trusted checkpoint holds"), "{summary}");
    assert!(!stderr(&o).contains("WARNING"));
    // With the bundle's own key: it passes, and says loudly what that is worth.
    let o = verify_bundle(&file, &[]);
    assert!(o.status.success(), "{}", stdout(&o));
    assert!(stderr(&o).contains("WARNING: checked against the key INSIDE the bundle"));

    // A trusted checkpoint the bundle does not extend from, or a forged one: refused, named.
    let o =
        verify_bundle(&file, &["--key", &v, "--trusted-checkpoint", early_file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert!(
        stdout(&o).contains(&format!(
            "FAIL trusted checkpoint: is of size {early_size}, and the bundle proves no consistency from that size"
        )),
        "{}",
        stdout(&o)
    );
    let root_line = trusted.lines().nth(2).unwrap();
    let other_root = base64_of(&[7u8; 32]);
    let forged = tmp.path().join("forged.checkpoint");
    std::fs::write(&forged, trusted.replace(root_line, &other_root)).unwrap();
    let o = verify_bundle(&file, &["--key", &v, "--trusted-checkpoint", forged.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("FAIL trusted checkpoint: signature does not verify"),
        "{}",
        stdout(&o)
    );
    // Another key of the same name (another log, or a forger's): nothing verifies.
    let stranger = vkey(&crate::init_dir(&tmp.path().join("stranger")));
    assert_ne!(stranger, v);
    let o = verify_bundle(&file, &["--key", &stranger]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("FAIL log.vkey: is not the key you gave"), "{}", stdout(&o));
    assert!(stdout(&o).contains("FAIL checkpoint: signature does not verify"), "{}", stdout(&o));

    // The same files by hand: tar, sha256sum, tlogverify and the README's recipe.
    let dir = tmp.path().join("unpacked");
    std::fs::create_dir(&dir).unwrap();
    let o = std::process::Command::new("tar")
        .arg("-xf")
        .arg(&file)
        .arg("-C")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(o.status.success(), "tar: {}", stderr(&o));
    let top: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(top.len(), 1, "one directory: {top:?}");
    let root = &top[0];
    let sh = |script: &str| {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(o.status.success(), "{script}: {}{}", stdout(&o), stderr(&o));
        stdout(&o)
    };
    sh("sha256sum --quiet -c SHA256SUMS");
    let mut seqs: Vec<u64> = std::fs::read_dir(root.join("events"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs.len(), 3);
    for seq in &seqs {
        let d = format!("events/{seq}");
        let event: Value =
            serde_json::from_slice(&std::fs::read(root.join(&d).join("event.json")).unwrap())
                .unwrap();
        assert_eq!(event["patient"]["id"], "MRN1");
        assert_eq!(event["seq"], *seq);
        let o = tlogverify()
            .args(["proof", "-vkey", &v, "-leaf"])
            .arg(root.join(&d).join("leaf"))
            .arg(root.join(&d).join("proof.tlog-proof"))
            .output()
            .unwrap();
        assert!(o.status.success(), "tlogverify proof {d}: {}{}", stdout(&o), stderr(&o));
        assert!(
            stdout(&o).contains(&format!("OK: tlog-proof verified: leaf {seq}")),
            "{}",
            stdout(&o)
        );
        // README step 3, as written there.
        let commitment = sh(&format!(
            "{{ printf 'auditrail/commitment/v1\\0'; xxd -r -p {d}/salt; cat {d}/event.json; }} | sha256sum"
        ));
        let leaf_tail = sh(&format!("xxd -p -s 9 -c 32 {d}/leaf"));
        assert_eq!(commitment.split_whitespace().next(), Some(leaf_tail.trim()), "{d}");
        let recorded_ms =
            u64::from_str_radix(sh(&format!("xxd -p -s 1 -l 8 {d}/leaf")).trim(), 16).unwrap();
        let recorded =
            auditrail_core::time::parse_rfc3339(event["recorded_at"].as_str().unwrap()).unwrap();
        assert_eq!(recorded_ms as i64, recorded);
    }
    let o = tlogverify()
        .args(["consistency", "-vkey", &v, "-old", trusted_arg, "-checkpoint"])
        .arg(root.join("checkpoint"))
        .arg("-proof")
        .arg(root.join("consistency/proof"))
        .output()
        .unwrap();
    assert!(o.status.success(), "tlogverify consistency: {}{}", stdout(&o), stderr(&o));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    assert!(readme.contains(&v) && readme.contains("tlogverify proof"), "{readme}");

    // Every byte: flipped, the bundle fails, and the failure names the file (or the event)
    // the byte belongs to, or the archive for its headers, padding and end marker. The
    // library is what verify-bundle runs; the binary itself runs on a sample below.
    let (members, mtime_s) = ustar::parse(&bundle).unwrap();
    let unit = |name: &str| -> String {
        let file = name.split_once('/').unwrap().1;
        match file.strip_prefix("events/") {
            Some(rest) => format!("events/{}/", rest.split('/').next().unwrap()),
            None => file.to_string(),
        }
    };
    let owner = |at: usize| -> String {
        members
            .iter()
            .find(|m| {
                (m.offset + ustar::BLOCK_BYTES..m.offset + ustar::BLOCK_BYTES + m.data.len())
                    .contains(&at)
            })
            .map_or_else(|| "archive".to_string(), |m| unit(m.name))
    };
    let options = VerifyOptions { key: Some(&key), trusted_checkpoint: Some(&trusted) };
    assert!(verify(&bundle, &options).ok());
    let started = std::time::Instant::now();
    for at in 0..bundle.len() {
        let mut damaged = bundle.clone();
        damaged[at] ^= 0x01;
        let report = verify(&damaged, &options);
        let expected = owner(at);
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.at.contains(&expected) || p.message.contains(&expected)),
            "byte {at} of {} (in {expected}) flipped: {:?}",
            bundle.len(),
            report.problems
        );
    }
    eprintln!("{} flipped bytes checked in {:?}", bundle.len(), started.elapsed());
    // The binary, on the first byte of each header and of each member's data.
    let damaged_file = tmp.path().join("damaged.tar");
    let mut sample: Vec<usize> = members.iter().map(|m| m.offset).collect();
    sample.extend(
        members.iter().filter(|m| !m.data.is_empty()).map(|m| m.offset + ustar::BLOCK_BYTES),
    );
    sample.push(bundle.len() - 1);
    for at in sample {
        let mut damaged = bundle.clone();
        damaged[at] ^= 0x01;
        std::fs::write(&damaged_file, &damaged).unwrap();
        let o = verify_bundle(&damaged_file, &["--key", &v]);
        let expected = owner(at);
        assert_eq!(o.status.code(), Some(1), "byte {at}: {}", stdout(&o));
        assert!(
            stdout(&o).lines().any(|l| l.starts_with("FAIL") && l.contains(&expected)),
            "byte {at} in {expected}: {}",
            stdout(&o)
        );
    }
    // A file added or dropped: named.
    let mut extra = bundle[..bundle.len() - 2 * ustar::BLOCK_BYTES].to_vec();
    let dir_name = members[0].name.split('/').next().unwrap();
    ustar::append(&mut extra, &format!("{dir_name}/notes.txt"), mtime_s, b"hi");
    ustar::finish(&mut extra);
    let report = verify(&extra, &options);
    assert!(report.problems.iter().any(|p| p.at == "notes.txt"), "{:?}", report.problems);
}

fn base64_of(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[test]
fn evidence_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[("AUDITRAIL_EVIDENCE_EVENTS_MAX", "5")]);
    ingest(&s, 0, 12);
    let mut logins = events(100, 2);
    for e in logins.as_array_mut().unwrap() {
        e["action"] = "login.failure".into();
        e["outcome"] = "failure".into();
        e["category"] = "authentication".into();
        e.as_object_mut().unwrap().remove("patient");
    }
    assert_eq!(s.post_json("/api/v1/events", &logins).status, 201);
    s.wait_indexed();

    // Over the cap: how many match, and the cap.
    let r = s.get("/api/v1/events/evidence");
    assert_eq!(code(&r), (400, "too_many_events".into()));
    assert_eq!(r.json()["error"]["limit"], json!({"matches": 14, "max": 5}));
    assert_eq!(s.get("/api/v1/events/evidence?patient=MRN1").status, 200);
    // Parameters of no meaning here, or bad.
    assert_eq!(
        code(&s.get("/api/v1/events/evidence?order=desc")),
        (400, "unknown_parameter".into())
    );
    assert_eq!(
        code(&s.get("/api/v1/events/evidence?format=csv")),
        (400, "unknown_parameter".into())
    );
    assert_eq!(
        code(&s.get("/api/v1/events/evidence?patient=MRN1&trusted_size=0")),
        (400, "invalid_parameter".into())
    );
    let r = s.get("/api/v1/events/evidence?patient=MRN1&trusted_size=99999");
    assert_eq!(code(&r), (400, "invalid_parameter".into()));
    assert!(r.text().contains("trusted_size"), "{}", r.text());

    // A key that may export but not see patient identifiers: no bundle with patients in it
    // (the events cannot be masked and still verify), events without patients are fine.
    let key = |scopes: Value| {
        let body = json!({"name": "k", "scopes": scopes});
        let r =
            s.request("POST", "/api/v1/api-keys", "application/json", body.to_string().as_bytes());
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["key"].as_str().unwrap().to_string()
    };
    let exporter = key(json!(["events:export"]));
    let reader = key(json!(["events:read", "events:patient_identifiers"]));
    let get_as = |token: &str, q: &str| {
        s.request_as(Some(token), "GET", &format!("/api/v1/events/evidence{q}"), "", b"")
    };
    let r = get_as(&exporter, "?patient=MRN1");
    assert_eq!(code(&r), (403, "forbidden".into()));
    assert!(r.text().contains("patient identifiers"), "{}", r.text());
    assert_eq!(get_as(&exporter, "?action=login.failure").status, 200);
    assert_eq!(code(&get_as(&reader, "?patient=MRN1")), (403, "forbidden".into()));

    // Each bundle is in the log as an export, with its size.
    s.wait_indexed();
    let r = s.get("/api/v1/events?category=repository&action=events.export&limit=100");
    let traces = r.json()["events"].as_array().cloned().unwrap();
    let bundles: Vec<&Value> = traces
        .iter()
        .filter(|e| e["context"]["route"] == "/api/v1/events/evidence" && e["outcome"] == "success")
        .collect();
    assert_eq!(bundles.len(), 2, "{traces:?}");
    // The context is a string map (schema/event.schema.json).
    assert!(
        bundles
            .iter()
            .all(|e| e["context"]["events"] == "2" && e["context"]["format"] == "evidence"),
        "{bundles:?}"
    );

    // Governance: local export off means no bundles either.
    let body = json!({"only_admins_create_projects": true, "local_export_disabled": true,
        "local_export_exceptions": [], "local_import_disabled": false, "local_import_exceptions": []});
    let r = s.put_json("/api/v1/settings/governance", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        code(&s.get("/api/v1/events/evidence?patient=MRN1")),
        (403, "export_disabled".into())
    );
}
