//! Black-box tests of `auditrail serve`: a real server process on 127.0.0.1:0.

use crate::http::{Server, request_as};
use crate::*;
use auditrail_store::sim::Rng;
use serde_json::{Value, json};
use std::collections::BTreeSet;

fn event(i: usize) -> Value {
    json!({
        "id": format!("e-{i}"),
        "occurred_at": format!("2026-11-{:02}T10:00:00Z", 1 + i % 20),
        "category": if i.is_multiple_of(5) { "authentication" } else { "phi_access" },
        "action": if i.is_multiple_of(5) { "login.failure" } else { "patient.read" },
        "outcome": if i.is_multiple_of(5) { "failure" } else { "success" },
        "actor": {"user_id": format!("u{}", i % 3), "ip": format!("10.0.0.{}", i % 4)},
        "source": {"system": if i.is_multiple_of(2) { "ehr" } else { "pacs" }},
        "project": "cardiology",
        "patient": {"id": format!("MRN{}", i % 7)},
        "context": {"reason": if i.is_multiple_of(11) { "emergency override" } else { "chart review" }},
    })
}

fn seqs(r: &crate::http::Response) -> Vec<u64> {
    r.json()["events"].as_array().unwrap().iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// Waits (boundedly) until the log has published a checkpoint covering `size` events, both
/// as the checkpoint file (`/log/checkpoint`) and as the size proofs are answered for
/// (`auditrail_log_published`, which follows the file).
pub fn wait_published(server: &Server, size: u64) {
    for _ in 0..200 {
        let cp = server.get("/log/checkpoint").text();
        let metrics = server.get("/metrics").text();
        let proofs = metrics
            .lines()
            .find_map(|l| l.strip_prefix("auditrail_log_published "))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if cp.lines().nth(1).and_then(|l| l.parse::<u64>().ok()).unwrap_or(0) >= size
            && proofs >= size
        {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("no checkpoint of size {size} within 10 s");
}

#[test]
fn ingest_search_proofs_and_the_log_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    assert_eq!(server.get("/healthz").status, 200);

    // One event, then an array, then NDJSON bulk with a bad line in the middle.
    let r = server.post_json("/api/v1/events", &event(0));
    assert_eq!(r.status, 201, "{}", r.text());
    // The log opens with the repository's own events (its first administrator, the key).
    let b = server.base;
    assert_eq!(r.json()["seq"], b);
    assert_eq!(r.json()["leaf_hash"].as_str().unwrap().len(), 64);
    let r = server.post_json("/api/v1/events", &json!((1..40).map(event).collect::<Vec<_>>()));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["receipts"].as_array().unwrap().len(), 39);
    let mut ndjson: String = (40..100).map(|i| event(i).to_string() + "\n").collect();
    ndjson.insert_str(0, "{\"action\": 5}\n\n");
    let r =
        server.request("POST", "/api/v1/events/bulk", "application/x-ndjson", ndjson.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].as_array().unwrap().clone();
    assert_eq!(r.json()["errors"], true);
    assert_eq!(items.len(), 61);
    assert_eq!((items[0]["line"].as_u64(), items[0]["status"].as_u64()), (Some(1), Some(400)));
    let details = items[0]["error"]["details"].as_array().unwrap();
    assert!(
        details.iter().any(|d| d["field"] == "action" && d["code"] == "wrong_type"),
        "{details:?}"
    );
    assert_eq!((items[1]["line"].as_u64(), items[1]["seq"].as_u64()), (Some(3), Some(40 + b)));
    // Idempotent by id: the original receipt, nothing appended.
    let again = server.post_json("/api/v1/events", &event(7));
    assert_eq!(again.status, 200);
    assert_eq!(
        (again.json()["seq"].as_u64(), again.json()["duplicate"].as_bool()),
        (Some(7 + b), Some(true))
    );

    // Searches, each checked against the fixture's own rule.
    server.wait_indexed();
    let all: Vec<Value> = (0..100).map(event).collect();
    let expect = |f: &dyn Fn(&Value) -> bool| -> Vec<u64> {
        (0..100u64).rev().filter(|&i| f(&all[i as usize])).map(|i| i + b).collect()
    };
    let cases: Vec<(&str, Vec<u64>)> = vec![
        ("patient=MRN3", expect(&|e| e["patient"]["id"] == "MRN3")),
        (
            "user=u1&outcome=failure",
            expect(&|e| e["actor"]["user_id"] == "u1" && e["outcome"] == "failure"),
        ),
        ("action=login.failure", expect(&|e| e["action"] == "login.failure")),
        (
            "category=phi_access&source=pacs",
            expect(&|e| e["category"] == "phi_access" && e["source"]["system"] == "pacs"),
        ),
        ("project=cardiology&ip=10.0.0.2", expect(&|e| e["actor"]["ip"] == "10.0.0.2")),
        ("q=EMERGENCY", expect(&|e| e["context"]["reason"] == "emergency override")),
        (
            "from=2026-11-05T00:00:00Z&to=2026-11-07T00:00:00Z",
            expect(&|e| {
                let d = e["occurred_at"].as_str().unwrap();
                ("2026-11-05".."2026-11-07").contains(&d)
            }),
        ),
        ("patient=nobody", vec![]),
    ];
    for (query, expected) in &cases {
        let r = server.get(&format!("/api/v1/events?{query}&limit=1000"));
        assert_eq!(r.status, 200, "{query}: {}", r.text());
        assert_eq!(&seqs(&r), expected, "{query}");
        assert!(r.json()["indexed_through"].as_u64().unwrap() >= 100 + b);
        assert_eq!(r.header("content-type"), Some("application/json"), "{query}");
        let timing = r.header("server-timing").unwrap_or_default();
        assert!(
            timing.starts_with("index;dur=") && timing.contains(", log;dur="),
            "{query}: Server-Timing {timing:?}"
        );
    }
    // Cursor pages walk the same results, newest first, and oldest first on request.
    let mut paged = Vec::new();
    let mut url = "/api/v1/events?user=u2&limit=4".to_string();
    loop {
        let r = server.get(&url);
        paged.extend(seqs(&r));
        match r.json()["next_cursor"].as_str() {
            Some(c) => url = format!("/api/v1/events?user=u2&limit=4&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(paged, expect(&|e| e["actor"]["user_id"] == "u2"));
    let asc = seqs(&server.get("/api/v1/events?user=u2&order=asc&limit=3"));
    assert_eq!(asc, vec![2 + b, 5 + b, 8 + b]);

    let stats = server.get("/api/v1/events/stats?group_by=action").json();
    // Counts include the repository's own events (its logins, the searches above).
    assert!(stats["total"].as_u64().unwrap() >= 100, "{stats}");
    assert_eq!(stats["groups"][0], json!({"key": "patient.read", "count": 80}));
    let stats = server
        .get("/api/v1/events/stats?group_by=user&from=2026-11-01T00:00:00Z&to=2026-11-02T00:00:00Z")
        .json();
    assert_eq!(stats["total"], 5);

    // One event with an inclusion proof that verifies against the signed checkpoint.
    wait_published(&server, 100 + b);
    let r = server.get("/api/v1/events/e-42?proof=inclusion");
    assert_eq!(r.status, 200, "{}", r.text());
    let body = r.json();
    assert_eq!(body["event"]["seq"], 42 + b);
    let proof = &body["proof"];
    let cp = proof["checkpoint"].as_str().unwrap();
    let vkey = vkey(&data);
    let verifier = auditrail_core::note::NoteVerifier::from_vkey(&vkey).unwrap();
    let checkpoint = auditrail_core::checkpoint::Checkpoint::parse(
        auditrail_core::note::open(cp, &[verifier]).unwrap(),
    )
    .unwrap();
    assert_eq!(checkpoint.size, proof["tree_size"].as_u64().unwrap());
    // The leaf hash is the receipt's: the proof connects this event's receipt to the root.
    let receipt_hash = items.iter().find(|i| i["seq"] == 42 + b).unwrap()["leaf_hash"]
        .as_str()
        .unwrap()
        .to_string();
    let b64 = |s: &str| -> [u8; 32] {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(s).unwrap().try_into().unwrap()
    };
    let hashes: Vec<[u8; 32]> =
        proof["hashes"].as_array().unwrap().iter().map(|h| b64(h.as_str().unwrap())).collect();
    let leaf: [u8; 32] = (0..32)
        .map(|i| u8::from_str_radix(&receipt_hash[2 * i..2 * i + 2], 16).unwrap())
        .collect::<Vec<_>>()
        .try_into()
        .unwrap();
    auditrail_core::merkle::verify_inclusion(
        &leaf,
        42 + b,
        checkpoint.size,
        &hashes,
        &checkpoint.root,
    )
    .unwrap();
    assert_eq!(server.get("/api/v1/events/no-such-id").status, 404);

    // The log at C2SP paths, and proofs between sizes.
    assert!(
        server.get("/log/checkpoint").header("content-type").unwrap().starts_with("text/plain")
    );
    let published: u64 =
        server.get("/log/checkpoint").text().lines().nth(1).unwrap().parse().unwrap();
    assert!(published < 256, "one partial tile");
    let tile = server.get(&format!("/log/tile/0/000.p/{published}"));
    assert_eq!((tile.status, tile.body.len()), (200, published as usize * 32));
    let bundle = server.get(&format!("/log/tile/entries/000.p/{published}"));
    assert_eq!(bundle.status, 200);
    assert_eq!(server.get("/log/tile/0/x999/000").status, 404);
    assert_eq!(server.get("/log/tile/../../keys/log.key").status, 404);
    let r = server.get(&format!("/api/v1/log/proof/consistency?from=1&to={published}"));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = server.get(&format!("/api/v1/log/proof/inclusion?seq=5&tree_size={published}"));
    assert!(!r.json()["hashes"].as_array().unwrap().is_empty(), "{}", r.text());
    assert_eq!(server.get("/api/v1/log/proof/inclusion?seq=5&tree_size=100000").status, 400);
    // A tree_size not larger than the seq is a bad parameter, also with 100 published.
    for size in [3, 5] {
        let r = server.get(&format!("/api/v1/log/proof/inclusion?seq=5&tree_size={size}"));
        assert_eq!(r.status, 400, "tree_size={size}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "invalid_parameter", "tree_size={size}");
    }

    let sequenced = server.sequenced();
    assert!(sequenced >= 100 + b, "{sequenced} events in the log");

    // A clean stop keeps everything; the restarted server answers from its index files.
    let status = server.stop();
    assert!(status.success(), "{status:?}");
    let index_files = std::fs::read_dir(data.join("index")).unwrap().count();
    assert!(index_files >= 1);
    let server = Server::start(&data);
    assert_eq!(seqs(&server.get("/api/v1/events?patient=MRN3&limit=1000")), cases[0].1);
    let size = server.get("/log/checkpoint").text().lines().nth(1).unwrap().parse::<u64>().unwrap();
    assert!(size >= sequenced, "the final checkpoint covers every event");
    drop(server);
    assert!(verify(&data).status.success());

    // `reindex` rebuilds the same answers from the log alone.
    std::fs::remove_dir_all(data.join("index")).unwrap();
    let o = run(&["reindex", "--data", data.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let server = Server::start(&data);
    assert_eq!(seqs(&server.get("/api/v1/events?patient=MRN3&limit=1000")), cases[0].1);
}

#[test]
fn bad_requests_get_a_4xx_with_a_code_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &[("AUDITRAIL_BODY_BYTES_MAX", "100000"), ("AUDITRAIL_BATCH_EVENTS_MAX", "10")],
    );
    let ok = event(1).to_string();
    let big = json!({"action": "a.b", "outcome": "success", "outcome_desc": "x".repeat(2000)});
    let huge = format!("[{}]", vec![ok.as_str(); 300].join(","));
    let cases: Vec<(&str, &str, &str, String, u16, &str)> = vec![
        (
            "POST",
            "/api/v1/events",
            "application/json",
            "{\"action\": \"a.b\", \"outc".into(),
            400,
            "invalid_json",
        ),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            "{\"action\": 5, \"outcome\": \"success\"}".into(),
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            "{\"action\": \"a.b\", \"outcome\": \"maybe\"}".into(),
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            "{\"action\": \"a.b\", \"outcome\": \"success\", \"seq\": 4}".into(),
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            "{\"action\": \"a.b\", \"outcome\": \"success\", \"occurred_at\": \"yesterday\"}"
                .into(),
            400,
            "invalid_event",
        ),
        ("POST", "/api/v1/events", "application/json", big.to_string(), 400, "invalid_event"),
        ("POST", "/api/v1/events", "application/json", "42".into(), 400, "wrong_type"),
        ("POST", "/api/v1/events", "application/json", "[]".into(), 400, "empty_batch"),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            format!("[{ok}, {{\"action\": \"x\"}}]"),
            400,
            "invalid_event",
        ),
        (
            "POST",
            "/api/v1/events",
            "application/json",
            format!("[{}]", [ok.as_str(); 11].join(",")),
            413,
            "too_large",
        ),
        ("POST", "/api/v1/events", "application/json", huge, 413, "too_large"),
        ("POST", "/api/v1/events", "text/plain", ok.clone(), 415, "unsupported_media_type"),
        ("POST", "/api/v1/events", "", ok.clone(), 415, "unsupported_media_type"),
        (
            "POST",
            "/api/v1/events/bulk",
            "application/json",
            ok.clone(),
            415,
            "unsupported_media_type",
        ),
        ("GET", "/api/v1/events?limit=0", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/events?limit=abc", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/events?from=2026-13-01", "", String::new(), 400, "invalid_parameter"),
        (
            "GET",
            "/api/v1/events?from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z",
            "",
            String::new(),
            400,
            "invalid_parameter",
        ),
        ("GET", "/api/v1/events?outcome=maybe", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/events?cursor=zzz", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/events?user=a&user=b", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/events?colour=red", "", String::new(), 400, "unknown_parameter"),
        ("GET", "/api/v1/events?q=%ZZ", "", String::new(), 400, "bad_query"),
        // `+1` is not two hex digits, though `u8::from_str_radix` would take it.
        ("GET", "/api/v1/events?user=%+1", "", String::new(), 400, "bad_query"),
        ("GET", "/api/v1/events/stats", "", String::new(), 400, "invalid_parameter"),
        (
            "GET",
            "/api/v1/events/stats?group_by=colour",
            "",
            String::new(),
            400,
            "invalid_parameter",
        ),
        ("GET", "/api/v1/events/x?proof=exclusion", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/log/proof/inclusion", "", String::new(), 400, "invalid_parameter"),
        ("GET", "/api/v1/log/proof/inclusion?seq=-1", "", String::new(), 400, "invalid_parameter"),
        // A tree of 3 cannot hold seq 5, however much is published: a bad request, not 409.
        (
            "GET",
            "/api/v1/log/proof/inclusion?seq=5&tree_size=3",
            "",
            String::new(),
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v1/log/proof/consistency?from=5&to=1",
            "",
            String::new(),
            400,
            "invalid_request",
        ),
        ("GET", "/api/v1/nothing", "", String::new(), 404, "not_found"),
    ];
    for (method, path, ct, body, status, code) in &cases {
        let r = server.request(method, path, ct, body.as_bytes());
        assert_eq!(r.status, *status, "{method} {path} {body:.80}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], *code, "{method} {path}: {}", r.text());
        assert!(!r.json()["error"]["message"].as_str().unwrap().is_empty());
    }
    // A bulk line longer than an event may be is refused on its own.
    let long = format!(
        "{{\"action\": \"a.b\", \"outcome\": \"success\", \"context\": {{\"k\": \"{}\"}}}}\n{ok}\n",
        "y".repeat(70_000)
    );
    let r = server.request("POST", "/api/v1/events/bulk", "application/x-ndjson", long.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["items"][0]["status"], 413);
    assert_eq!(r.json()["items"][1]["status"], 201);
    let stored = server.client_events();
    assert_eq!(stored.len(), 1, "only the one good bulk line: {stored:?}");
    // With that event in the log a checkpoint is published, and then it is served.
    let mut checkpoint = None;
    for _ in 0..200 {
        let r = server.get("/log/checkpoint");
        let covers =
            |t: &str| t.lines().nth(1).and_then(|l| l.parse::<u64>().ok()) > Some(server.base);
        if r.status == 200 && covers(&r.text()) {
            checkpoint = Some(r.text());
            break;
        }
        if r.status == 200 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            continue;
        }
        assert_eq!(r.status, 404, "before the first checkpoint: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "not_found");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let checkpoint = checkpoint.expect("a checkpoint within 10 s of the first event");
    let size: u64 = checkpoint.lines().nth(1).unwrap().parse().unwrap();
    assert!(size > server.base, "the checkpoint covers the event: {checkpoint}");
}

#[test]
fn sigkill_during_concurrent_ingest_loses_no_acknowledged_event() {
    let seed = std::env::var("KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0xbeef);
    eprintln!("server kill test seed {seed} (rerun with KILL_SEED={seed})");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut acked: BTreeSet<String> = BTreeSet::new();
    for round in 0..4 {
        let server = Server::start(&data);
        let addr = server.addr.clone();
        let token = server.token.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let addr = addr.clone();
                let token = token.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    let mut i = 0;
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) && i < 100_000 {
                        let ids: Vec<String> =
                            (0..1 + w * 20).map(|k| format!("r{round}-w{w}-{i}-{k}")).collect();
                        let body: Vec<Value> = ids
                            .iter()
                            .map(|id| {
                                let mut e = event(i);
                                e["id"] = json!(id);
                                e
                            })
                            .collect();
                        let r = std::panic::catch_unwind(|| {
                            if w % 2 == 0 {
                                request_as(
                                    &addr,
                                    Some(&token),
                                    "POST",
                                    "/api/v1/events",
                                    "application/json",
                                    json!(body).to_string().as_bytes(),
                                )
                            } else {
                                let nd: String =
                                    body.iter().map(|e| e.to_string() + "\n").collect();
                                request_as(
                                    &addr,
                                    Some(&token),
                                    "POST",
                                    "/api/v1/events/bulk",
                                    "application/x-ndjson",
                                    nd.as_bytes(),
                                )
                            }
                        });
                        // A request cut by the kill is simply not acknowledged.
                        if let Ok(r) = r
                            && (r.status == 200 || r.status == 201)
                        {
                            acked.extend(ids);
                        }
                        i += 1;
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(200 + rng.below(800)));
        let mut server = server;
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for w in workers {
            acked.extend(w.join().unwrap());
        }
    }
    assert!(acked.len() > 100, "too few acknowledged events to mean anything: {}", acked.len());
    // After restart every acknowledged event is in the log and findable by id.
    let server = Server::start(&data);
    for id in acked.iter().step_by(37) {
        assert_eq!(server.get(&format!("/api/v1/events/{id}")).status, 200, "{id}");
    }
    drop(server);
    let o = run(&["export", "--data", data.to_str().unwrap()]);
    let ids: BTreeSet<String> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<_> = acked.difference(&ids).take(5).collect();
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    assert!(verify(&data).status.success());
    eprintln!("{} acknowledged events survived 4 SIGKILLs", acked.len());
}
