//! Exports and the governance settings that bind them, end to end: NDJSON streamed to the
//! caller, an export written to a real S3 (SeaweedFS) and read back with boto3, the log's
//! record of each export, and "disable local export / import" with per-project exceptions.

use crate::archive::{WEED_LOCK, Weed};
use crate::http::{Response, Server};
use serde_json::{Value, json};
use sha2::Digest as _;

const DESTINATION: &str = "s3://exports/audit";

fn event(i: usize, project: &str) -> Value {
    json!({"id": format!("exp-{i}"), "action": "patient.read", "outcome": "success",
        "actor": {"user_id": format!("u{}", i % 3)}, "patient": {"id": format!("MRN{}", i % 5)},
        "project": project})
}

fn lines(r: &Response) -> Vec<Value> {
    r.text().lines().map(|l| serde_json::from_str(l).expect("one JSON event per line")).collect()
}

fn governance(s: &Server, body: Value) {
    let r = s.request(
        "PUT",
        "/api/v1/settings/governance",
        "application/json",
        body.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn code(r: &Response) -> (u16, String) {
    (r.status, r.json()["error"]["code"].as_str().unwrap_or_default().to_string())
}

#[test]
fn exports_stream_or_go_to_object_storage_as_governance_allows() {
    let _serial = WEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let weed = Weed::start(&tmp.path().join("weed"), "exports");
    let mut env: Vec<(String, String)> = weed.env();
    env.push(("AUDITRAIL_EXPORT_DESTINATIONS".into(), DESTINATION.into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let s = Server::start_with(&tmp.path().join("data"), &env_refs);

    let cardiology: Vec<Value> = (0..1200).map(|i| event(i, "cardiology")).collect();
    let oncology: Vec<Value> = (1200..1500).map(|i| event(i, "oncology")).collect();
    assert_eq!(s.post_json("/api/v1/events", &json!(cardiology[..600])).status, 201);
    assert_eq!(s.post_json("/api/v1/events", &json!(oncology)).status, 201);
    assert_eq!(s.post_json("/api/v1/events", &json!(cardiology[600..])).status, 201);
    s.wait_indexed();

    // Streamed: every match, oldest first, past the 1000-event index page; the repository's
    // own events are left out as in a search.
    let r = s.get("/api/v1/events/export?project=cardiology");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let got = lines(&r);
    let ids: Vec<&str> = got.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let expected: Vec<String> = (0..1200).map(|i| format!("exp-{i}")).collect();
    assert_eq!(ids, expected);
    assert!(got.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));
    assert_eq!(lines(&s.get("/api/v1/events/export")).len(), 1500);
    let newest = lines(&s.get("/api/v1/events/export?patient=MRN2&order=desc"));
    assert_eq!(newest.len(), 300);
    assert_eq!(newest[0]["id"], "exp-1197", "the last sent (cardiology after oncology)");
    assert_eq!(code(&s.get("/api/v1/events/export?limit=5")), (400, "unknown_parameter".into()));

    // Each export is in the log, naming who asked for what.
    let traces = search_all(&s, "category=repository&action=events.export", 1);
    assert!(traces.iter().any(|e| e["request"]["query"] == "project=cardiology"), "{traces:?}");

    // A key that may export but not see patient identifiers gets them masked, and one
    // limited to a project exports only that project.
    let key = |body: Value| {
        let r =
            s.request("POST", "/api/v1/api-keys", "application/json", body.to_string().as_bytes());
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["key"].as_str().unwrap().to_string()
    };
    let exporter = key(json!({"name": "exporter", "scopes": ["events:export"]}));
    let cardio =
        key(json!({"name": "cardio", "scopes": ["events:export"], "projects": ["cardiology"]}));
    let export_as = |token: &str, query: &str| {
        s.request_as(Some(token), "GET", &format!("/api/v1/events/export{query}"), "", b"")
    };
    let masked = lines(&export_as(&exporter, "?project=oncology"));
    assert_eq!(masked.len(), 300);
    assert!(masked.iter().all(|e| e["patient"]["id"] == "***"), "{:?}", masked[0]);
    assert_eq!(code(&export_as(&cardio, "?project=oncology")), (403, "forbidden".into()));
    assert_eq!(lines(&export_as(&cardio, "")).len(), 1200);

    // Local export disabled, cardiology excepted.
    governance(
        &s,
        json!({"only_admins_create_projects": true, "local_export_disabled": true,
            "local_export_exceptions": ["cardiology"], "local_import_disabled": false,
            "local_import_exceptions": []}),
    );
    assert_eq!(code(&s.get("/api/v1/events/export")), (403, "export_disabled".into()));
    let r = s.get("/api/v1/events/export?project=oncology");
    assert_eq!(code(&r), (403, "export_disabled".into()));
    assert!(r.text().contains("POST /api/v1/events/export"), "{}", r.text());
    assert_eq!(lines(&s.get("/api/v1/events/export?project=cardiology")).len(), 1200);
    // A caller limited to excepted projects needs no `project=`; one that is not is refused.
    assert_eq!(lines(&export_as(&cardio, "")).len(), 1200);
    assert_eq!(code(&export_as(&exporter, "")), (403, "export_disabled".into()));

    // To object storage: only to a configured destination.
    let post = |body: Value| {
        s.request("POST", "/api/v1/events/export", "application/json", body.to_string().as_bytes())
    };
    let r = post(json!({"destination": "s3://elsewhere/x", "filters": {"project": "oncology"}}));
    assert_eq!(code(&r), (400, "invalid_parameter".into()));
    let r = post(json!({"destination": DESTINATION, "filters": {"project": "oncology"}}));
    assert_eq!(r.status, 201, "{}", r.text());
    let receipt = r.json();
    assert_eq!(receipt["events"], 300);
    let object = receipt["object"].as_str().unwrap();
    let key = object.strip_prefix("s3://exports/").expect("in the destination");
    assert!(key.starts_with("audit/exports/") && key.ends_with(".ndjson"), "{key}");
    // Read back with boto3, not auditrail's client.
    let file = tmp.path().join("export.ndjson");
    let o = weed.admin(&["get", "exports", key, file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(receipt["bytes"], bytes.len());
    assert_eq!(receipt["sha256"], hex(&sha2::Sha256::digest(&bytes)));
    let text = String::from_utf8(bytes).unwrap();
    let exported: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(exported.len(), 300);
    assert!(exported.iter().all(|e| e["project"] == "oncology"));
    let recorded = search_all(&s, "category=repository&action=events.export", 2);
    assert!(recorded.iter().any(|e| e["context"]["object"] == object), "{recorded:?}");

    // Import (uploading a file of events) disabled, cardiology excepted: line by line.
    governance(
        &s,
        json!({"only_admins_create_projects": true, "local_export_disabled": false,
            "local_export_exceptions": [], "local_import_disabled": true,
            "local_import_exceptions": ["cardiology"]}),
    );
    let ndjson = format!("{}\n{}\n", event(2000, "cardiology"), event(2001, "oncology"));
    let r = s.request("POST", "/api/v1/events/bulk", "application/x-ndjson", ndjson.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let items = r.json()["items"].clone();
    assert_eq!((items[0]["status"].as_u64(), items[1]["status"].as_u64()), (Some(201), Some(400)));
    assert!(items[1].to_string().contains("not_permitted"), "{items}");
    // With no exception, no upload at all; single events still go through.
    governance(
        &s,
        json!({"only_admins_create_projects": true, "local_export_disabled": false,
            "local_export_exceptions": [], "local_import_disabled": true,
            "local_import_exceptions": []}),
    );
    let one = format!("{}\n", event(2002, "cardiology"));
    let r = s.request("POST", "/api/v1/events/bulk", "application/x-ndjson", one.as_bytes());
    assert_eq!(code(&r), (403, "import_disabled".into()));
    assert_eq!(s.post_json("/api/v1/events", &event(2003, "oncology")).status, 201);
    s.wait_indexed();
    let stored: Vec<String> = lines(&s.get("/api/v1/events/export"))
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .filter(|id| id.strip_prefix("exp-").unwrap().parse::<u32>().unwrap() >= 2000)
        .collect();
    assert_eq!(stored, ["exp-2000", "exp-2003"], "refused lines stored nothing");
    // Every change of the settings is in the log with before and after.
    let changes = search_all(&s, "category=repository&action=settings.governance.change", 3);
    assert!(changes.iter().all(|e| !e["changes"].as_array().unwrap().is_empty()), "{changes:?}");
}

/// Waits (boundedly) until a search finds at least `n` events; returns them.
fn search_all(s: &Server, query: &str, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let r = s.get(&format!("/api/v1/events?{query}&limit=1000"));
        assert_eq!(r.status, 200, "{}", r.text());
        let events = r.json()["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("fewer than {n} events for {query}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
