//! Retention through a real server: a forced short retention and small segments, so sealed
//! segments expire at once. Purged events answer 410 with a proof that verifies, held ones
//! stay, searches leave purged events out, the purge is itself in the log, and `verify` and
//! `reindex` pass afterwards.

use crate::http::Server;
use crate::serve::wait_published;
use crate::*;
use base64::Engine as _;
use serde_json::{Value, json};

const EVENTS: usize = 1200;

fn event(i: usize) -> Value {
    json!({
        "id": format!("r-{i}"),
        "action": "patient.read", "outcome": "success",
        // The first events belong to a project under legal hold.
        "project": if i < 5 { "litigation" } else { "clinic" },
        "patient": {"id": format!("MRN{}", i % 9)},
        // Incompressible padding, so 64 KiB segments fill after about 300 events.
        "context": {"padding": noise(i)},
    })
}

fn noise(i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..50)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:08x}", x as u32)
        })
        .collect()
}

fn b64(s: &str) -> [u8; 32] {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap().try_into().unwrap()
}

#[test]
fn purge_hold_gone_proofs_verify_and_reindex() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let env = [
        ("AUDITRAIL_RETENTION_DAYS", "0"),
        ("AUDITRAIL_SEGMENT_BYTES_MAX", "65536"),
        ("AUDITRAIL_RETENTION_CHECK_INTERVAL_MS", "0"),
    ];
    // Under six years is refused unless forced.
    let refused = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(&data)
        .envs(env)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("retention_force"), "{}", stderr(&refused));

    let mut env = env.to_vec();
    env.push(("AUDITRAIL_RETENTION_FORCE", "true"));
    let server = Server::start_with(&data, &env);
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(100) {
        let batch: Vec<Value> = chunk.iter().map(|&i| event(i)).collect();
        assert_eq!(server.post_json("/api/v1/events", &json!(batch)).status, 201);
    }
    // Event r-i is at seq i + b: the log opens with the repository's own events.
    let b = server.base;
    server.wait_indexed();
    wait_published(&server, EVENTS as u64 + b);

    let r = server.post_json(
        "/api/v1/retention/holds",
        &json!({"reason": "case 114", "project": "litigation"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let hold_id = r.json()["id"].as_str().unwrap().to_string();
    let r = server.post_json("/api/v1/retention/holds", &json!({"reason": "no criterion"}));
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("invalid_parameter")));

    let plan = server.request("POST", "/api/v1/retention/purge?dry_run=true", "", b"").json();
    let segments = plan["segments"].as_array().unwrap().clone();
    assert!(segments.len() >= 3, "{plan}");
    assert_eq!(segments[0]["held_by"], json!([hold_id]));
    assert_eq!(segments[0]["purge"], false);
    assert!(segments[1..].iter().all(|s| s["purge"] == true), "{plan}");

    let r = server.request("POST", "/api/v1/retention/purge", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let purged = r.json()["purged"].as_array().unwrap().clone();
    assert_eq!(purged.len(), segments.len() - 1);
    let first_purged = purged[0]["first_seq"].as_u64().unwrap();
    let purged_end = purged.last().unwrap()["end_seq"].as_u64().unwrap();
    let purged_count: u64 = purged.iter().map(|p| p["events"].as_u64().unwrap()).sum();
    // The purged segments may also hold the repository's own events (the hold, the reads
    // above): count the purged reads by seq, wherever the segments happened to roll.
    let purged_reads = (b..b + EVENTS as u64)
        .filter(|seq| {
            purged.iter().any(|p| {
                (p["first_seq"].as_u64().unwrap()..p["end_seq"].as_u64().unwrap()).contains(seq)
            })
        })
        .count() as u64;
    assert!(purged_reads > 0);

    // Held: still readable. Purged: 410 with a proof that verifies against the checkpoint.
    assert_eq!(server.get("/api/v1/events/r-0").status, 200);
    let gone_id = format!("r-{}", first_purged + 3 - b);
    let r = server.get(&format!("/api/v1/events/{gone_id}"));
    assert_eq!(r.status, 410, "{}", r.text());
    let info = &r.json()["error"]["purged"];
    assert_eq!(r.json()["error"]["code"], "purged");
    assert_eq!(info["seq"].as_u64(), Some(first_purged + 3));
    let proof = &info["proof"];
    let verifier = auditrail_core::note::NoteVerifier::from_vkey(&vkey(&data)).unwrap();
    let checkpoint = auditrail_core::checkpoint::Checkpoint::parse(
        auditrail_core::note::open(proof["checkpoint"].as_str().unwrap(), &[verifier]).unwrap(),
    )
    .unwrap();
    let hashes: Vec<[u8; 32]> =
        proof["hashes"].as_array().unwrap().iter().map(|h| b64(h.as_str().unwrap())).collect();
    auditrail_core::merkle::verify_inclusion(
        &b64(info["leaf_hash"].as_str().unwrap()),
        first_purged + 3,
        checkpoint.size,
        &hashes,
        &checkpoint.root,
    )
    .unwrap();
    let fhir = server.get(&format!("/fhir/AuditEvent/{gone_id}"));
    assert_eq!(fhir.status, 410);
    assert_eq!(fhir.json()["issue"][0]["code"], "deleted");

    // Searches leave purged events out; the purge and the hold are in the log.
    let all = server.get("/api/v1/events?action=patient.read&limit=1000&order=asc").json();
    let seqs: Vec<u64> =
        all["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs.len() as u64, EVENTS as u64 - purged_reads);
    assert!(seqs.iter().all(|s| !(first_purged..purged_end).contains(s)));
    let stats = server.get("/api/v1/events/stats?group_by=action").json();
    let reads = stats["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["key"] == "patient.read")
        .unwrap()["count"]
        .clone();
    assert_eq!(reads.as_u64(), Some(EVENTS as u64 - purged_reads));
    server.wait_indexed();
    let log = server.get("/api/v1/events?category=repository&order=asc&limit=1000").json();
    // Among the repository's other events (its key, the reads above), the retention ones.
    let retention: Vec<&Value> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("retention."))
        .collect();
    let actions: Vec<&str> = retention.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["retention.hold.create", "retention.purge"]);
    let purge_event = retention[1];
    assert_eq!(purge_event["entities"].as_array().unwrap().len(), purged.len());
    // Clients cannot write the repository's own events (the audit trusts purge events).
    let forged =
        json!({"action": "retention.purge", "outcome": "success", "category": "repository"});
    let r = server.post_json("/api/v1/events", &forged);
    assert_eq!(
        (r.status, r.json()["error"]["details"][0]["field"].as_str()),
        (400, Some("category"))
    );
    let state = server.get("/api/v1/retention").json();
    assert_eq!(state["purged_events"].as_u64(), Some(purged_count));
    assert_eq!(state["holds"][0]["project"], "litigation");

    // Releasing the hold is logged too; the next purge takes the segment it kept.
    assert_eq!(
        server.request("DELETE", &format!("/api/v1/retention/holds/{hold_id}"), "", b"").status,
        200
    );
    assert_eq!(
        server.request("DELETE", &format!("/api/v1/retention/holds/{hold_id}"), "", b"").status,
        404
    );
    let r = server.request("POST", "/api/v1/retention/purge", "", b"").json();
    assert_eq!(r["purged"][0]["first_seq"], 0, "{r}");
    let purged_count = purged_count + r["purged"][0]["events"].as_u64().unwrap();
    // Appending goes on: the segment being written is never purged.
    let late: Vec<Value> = (0..10)
        .map(|i| json!({"id": format!("late-{i}"), "action": "patient.read", "outcome": "success"}))
        .collect();
    assert_eq!(server.post_json("/api/v1/events", &json!(late)).status, 201);
    for _ in 0..400 {
        if server.get("/api/v1/events/late-9").status == 200 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let reads_left = server.get("/api/v1/events?action=patient.read&limit=1000").json()["events"]
        .as_array()
        .unwrap()
        .len();
    assert!(server.stop().success());

    // The whole log still verifies, and the index rebuilds from what is left.
    let v = verify(&data);
    assert!(v.status.success(), "{}", stdout(&v));
    assert!(stdout(&v).contains("purged"), "{}", stdout(&v));
    // A backup of the purged log restores (purge records and holds travel with it) and the
    // restored copy verifies: the local-path object store needs no server.
    let bucket = tmp.path().join("bucket");
    std::fs::create_dir_all(&bucket).unwrap();
    let url = format!("file://{}", bucket.display());
    let o = run(&["backup", "--data", data.to_str().unwrap(), "--to", &url]);
    assert!(o.status.success(), "{}", stderr(&o));
    let restored = tmp.path().join("restored");
    std::fs::create_dir_all(restored.join("keys")).unwrap();
    for f in ["log.key", "master.keys"] {
        std::fs::copy(data.join("keys").join(f), restored.join("keys").join(f)).unwrap();
    }
    let o = run(&["restore", "--from", &url, "--data", restored.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v = verify(&restored);
    assert!(v.status.success() && stdout(&v).contains("purged"), "{}", stdout(&v));
    assert_eq!(
        std::fs::read(restored.join("retention/purged")).unwrap(),
        std::fs::read(data.join("retention/purged")).unwrap()
    );

    let r = run(&["reindex", "--data", data.to_str().unwrap()]);
    assert!(r.status.success(), "{}", stderr(&r));
    let server = Server::start_with(&data, &env);
    let all = server.get("/api/v1/events?action=patient.read&limit=1000").json();
    assert_eq!(
        all["events"].as_array().unwrap().len(),
        reads_left,
        "the same events after reindex"
    );
    let state = server.get("/api/v1/retention").json();
    assert_eq!(state["purged_events"].as_u64(), Some(purged_count), "both purges, after restart");
    // Rebuilt from the log, the index no longer knows purged ids (docs/api.md).
    assert_eq!(server.get(&format!("/api/v1/events/{gone_id}")).status, 404);
    assert_eq!(server.get("/api/v1/events/late-9").status, 200);
}
