//! Verifying the live log through the API: scheduled increments, a full audit started and
//! followed as a job, each result recorded in the log, a changed byte in a segment failing the
//! next increment and raising the critical alert, and the verified prefix surviving a restart.

use crate::http::{Response, Server};
use serde_json::{Value, json};

const SCHEDULED: &[(&str, &str)] = &[
    ("AUDITRAIL_ALERTS_ENABLED", "true"),
    ("AUDITRAIL_INTEGRITY_INCREMENTAL_INTERVAL_MS", "500"),
    ("AUDITRAIL_INTEGRITY_FULL_INTERVAL_MS", "0"),
    ("AUDITRAIL_PUBLISH_INTERVAL_MS", "100"),
];
const INTEGRITY: &str = "/api/v1/security/audit-log/integrity";

fn ingest(s: &Server, prefix: &str, n: usize) {
    let r = s.request(
        "POST",
        "/api/v1/events/bulk",
        "application/x-ndjson",
        crate::ndjson(prefix, n).as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Polls `GET path` (at most 30 s) until `done` holds for its JSON; returns it.
fn wait_for(s: &Server, path: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..300 {
        let v = s.get(path).json();
        if done(&v) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("{what} within 30 s; last: {}\nserver: {}", s.get(path).text(), s.output());
}

/// Waits until everything appended so far is signed (published) and read by the alert engine.
fn settle(s: &Server) {
    let size = s.sequenced();
    wait_for(s, INTEGRITY, "publication", |v| v["published"].as_u64().unwrap() >= size);
    wait_for(s, "/api/v1/security/status", "the alert engine", |v| {
        v["alerts"]["next_seq"].as_u64().unwrap() >= size
    });
}

fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
}

/// `POST` to start a verification, once none is running (a scheduled one may be).
fn post_when_idle(s: &Server, path: &str, body: &[u8]) -> Response {
    let content_type = if body.is_empty() { "" } else { "application/json" };
    for _ in 0..300 {
        let r = s.request("POST", path, content_type, body);
        if r.status != 409 {
            return r;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    panic!("a verification was still running after 30 s: {}", s.get(INTEGRITY).text());
}

fn start(s: &Server, mode: &str) -> Response {
    post_when_idle(s, INTEGRITY, json!({"mode": mode}).to_string().as_bytes())
}

fn follow(s: &Server, started: &Response) -> Value {
    assert_eq!(started.status, 202, "{}", started.text());
    let location = started.header("location").expect("a Location").to_string();
    assert_eq!(location, format!("{INTEGRITY}/jobs/{}", started.json()["id"].as_str().unwrap()));
    wait_for(s, &location, "the verification to finish", |v| v["status"] != "running")
}

/// The `integrity.verify.*` events in the log, oldest first, once indexed. (Only repository
/// events are read: once a byte of a segment changes, the events it holds cannot be.)
fn recorded(s: &Server, action: &str) -> Vec<Value> {
    let size = s.sequenced();
    let path = format!("/api/v1/events?category=repository&action={action}&limit=1");
    wait_for(s, &path, "indexing", |v| v["indexed_through"].as_u64().unwrap() >= size);
    let v = s
        .get(&format!("/api/v1/events?category=repository&action={action}&order=asc&limit=100"))
        .json();
    v["events"].as_array().unwrap().clone()
}

#[test]
fn the_live_log_is_verified_on_schedule_and_on_request_and_tampering_raises_a_critical_alert() {
    let tmp = tempfile::tempdir().unwrap();
    let data = crate::init_dir(tmp.path());
    let s = Server::start_with(&data, SCHEDULED);

    // Scheduled increments follow the log.
    ingest(&s, "a", 300);
    settle(&s);
    let size = s.get(INTEGRITY).json()["published"].as_u64().unwrap();
    let state = wait_for(&s, INTEGRITY, "a scheduled increment", |v| {
        v["last_incremental"]["status"] == "passed"
            && v["last_incremental"]["tree_size"].as_u64().unwrap() >= size
    });
    assert!(state["verified_through"].as_u64().unwrap() >= size, "{state}");
    assert_eq!(state["status"], "passed");
    assert_eq!(state["verified_at"], state["last"]["finished_at"]);
    let inc = &state["last_incremental"];
    assert_eq!(inc["requested_by"], "system:integrity");
    assert_eq!(inc["problem_count"], 0);
    let seq = inc["recorded_seq"].as_u64().expect("recorded");
    let events = recorded(&s, "integrity.verify.incremental");
    let event = events.iter().find(|e| e["seq"] == seq).expect("the increment's event");
    assert_eq!(event["outcome"], "success");
    assert_eq!(event["category"], "repository");
    assert_eq!(event["context"]["verification_id"], inc["id"]);

    // A full audit on request, followed as a job; a second request meanwhile is refused.
    let started = start(&s, "full");
    let again = s.post_json(INTEGRITY, &json!({"mode": "incremental"}));
    assert_eq!(again.status, 409, "{}", again.text());
    assert_eq!(again.json()["error"]["code"], "verification_running");
    let full = follow(&s, &started);
    assert_eq!(full["status"], "passed", "{full}");
    assert_eq!(full["mode"], "full");
    assert!(full["events_checked"].as_u64().unwrap() >= size);
    assert!(full["recorded_seq"].is_u64());
    let events = recorded(&s, "integrity.verify.full");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["outcome"], "success");
    assert_eq!(events[0]["context"]["verification_id"], full["id"]);
    assert!(events[0]["actor"]["user_id"].is_string());

    // Bad requests.
    let bad = start(&s, "partial");
    assert_eq!((bad.status, bad.json()["error"]["code"].as_str()), (400, Some("invalid_json")));
    assert_eq!(s.get(&format!("{INTEGRITY}/jobs/nosuch")).status, 404);
    let bad = s.request("POST", &format!("{INTEGRITY}?mode=sometimes"), "", b"");
    assert_eq!(
        (bad.status, bad.json()["error"]["code"].as_str()),
        (400, Some("invalid_parameter"))
    );
    // Without a body, a full verification; `?mode=` says otherwise.
    let plain = follow(&s, &post_when_idle(&s, INTEGRITY, b""));
    assert_eq!((plain["mode"].as_str(), plain["status"].as_str()), (Some("full"), Some("passed")));
    let by_query = post_when_idle(&s, &format!("{INTEGRITY}?mode=incremental"), b"");
    assert_eq!(follow(&s, &by_query)["mode"], "incremental");

    // The verified prefix and the last results outlive a restart. From here verifications
    // run only on request, so none covers the events below before their byte changes.
    let published = s.get(INTEGRITY).json()["published"].as_u64().unwrap();
    let verified = wait_for(&s, INTEGRITY, "the increments to catch up", |v| {
        v["running"].is_null() && v["verified_through"].as_u64().unwrap() >= published
    })["verified_through"]
        .as_u64()
        .unwrap();
    assert!(s.stop().success());
    let on_request =
        &[("AUDITRAIL_ALERTS_ENABLED", "true"), ("AUDITRAIL_PUBLISH_INTERVAL_MS", "100")];
    let s = Server::start_with(&data, on_request);
    let state = s.get(INTEGRITY).json();
    assert_eq!(state["verified_through"].as_u64().unwrap(), verified, "{state}");
    assert_eq!(state["last_full"]["id"], plain["id"]);

    // New events, signed; then a byte of the newest segment changes under the running server.
    ingest(&s, "c", 200);
    // The last block of these events ends the newest segment now; the server's own records
    // (traced reads) come after it.
    let newest = std::fs::read_dir(data.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .expect("a segment");
    let at = std::fs::metadata(&newest).unwrap().len() - 40;
    settle(&s);
    // One byte, written in place: the server goes on appending to this file.
    flip_byte(&newest, at);

    let failed = follow(&s, &start(&s, "incremental"));
    assert_eq!(failed["status"], "failed", "{failed}");
    assert_eq!(failed["from_size"].as_u64().unwrap(), verified, "{failed}");
    let segment_name = newest.file_name().unwrap().to_str().unwrap();
    let names_segment = |p: &Value| p["location"].as_str().unwrap().contains(segment_name);
    assert!(failed["problems"].as_array().unwrap().iter().any(names_segment), "{failed}");
    let state = s.get(INTEGRITY).json();
    assert_eq!(state["verified_through"].as_u64().unwrap(), verified, "the prefix stays");
    let failures: Vec<Value> = recorded(&s, "integrity.verify.incremental")
        .into_iter()
        .filter(|e| e["outcome"] == "failure")
        .collect();
    assert_eq!(failures.len(), 1);
    assert!(failures[0]["context"]["first_problem"].as_str().unwrap().contains(segment_name));
    let alerts =
        wait_for(&s, "/api/v1/security/alerts?rule=integrity-check-failed", "the alert", |v| {
            v["total"].as_u64().unwrap() >= 1
        });
    assert_eq!(alerts["total"], 1, "{alerts}");
    assert_eq!(alerts["alerts"][0]["severity"], "critical");
    let status = s.get("/api/v1/security/status").json();
    assert_eq!(status["integrity"]["last_incremental"]["status"], "failed", "{status}");
    assert_eq!(status["integrity"]["verified_through"].as_u64().unwrap(), verified);
    // A full audit finds it too.
    let full = follow(&s, &start(&s, "full"));
    assert_eq!(full["status"], "failed", "{full}");
    assert!(full["problems"].as_array().unwrap().iter().any(names_segment), "{full}");

    // With the byte restored, the log verifies again from the same prefix.
    assert!(s.stop().success());
    flip_byte(&newest, at);
    let s = Server::start_with(&data, on_request);
    let again = follow(&s, &start(&s, "incremental"));
    assert_eq!(again["status"], "passed", "{again}");
    assert_eq!(again["from_size"].as_u64().unwrap(), verified);

    // A damaged state file does not stop the server: the next increment starts from nothing.
    assert!(s.stop().success());
    std::fs::write(data.join("integrity/state.json"), b"{not json").unwrap();
    let s = Server::start_with(&data, on_request);
    assert_eq!(s.get(INTEGRITY).json()["verified_through"], 0);
    let fresh = follow(&s, &start(&s, "incremental"));
    assert_eq!((fresh["status"].as_str(), fresh["from_size"].as_u64()), (Some("passed"), Some(0)));
}
