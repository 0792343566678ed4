//! Exports and the governance settings that bind them, end to end: NDJSON streamed to the
//! caller, CSV and FHIR checked by Python's csv module and fhir.resources, an export written to
//! a real S3 (SeaweedFS) and read back with boto3, the log's record of each export, and
//! "disable local export / import" with per-project exceptions.

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
    let r = s.put_json("/api/v1/settings/governance", &body);
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
    assert_eq!(r.header("x-export-total"), Some("1200"), "the count, known up front");
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
    // In another format: the object is named for it.
    let r = post(
        json!({"destination": DESTINATION, "filters": {"project": "oncology"}, "format": "csv"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        (r.json()["format"].as_str(), r.json()["events"].as_u64()),
        (Some("csv"), Some(300))
    );
    let key =
        r.json()["object"].as_str().unwrap().strip_prefix("s3://exports/").unwrap().to_string();
    assert!(key.ends_with(".csv"), "{key}");
    let o = weed.admin(&["get", "exports", &key, file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(&file).unwrap();
    assert!(csv.starts_with("seq,id,occurred_at,") && csv.lines().count() == 301, "{csv}");
    let r = post(json!({"destination": DESTINATION, "format": "xml"}));
    assert_eq!(code(&r), (400, "invalid_parameter".into()));

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

/// Cells a spreadsheet would run as formulas, and cells that need RFC 4180 quoting.
const TRICKY: &[&str] = &[
    "=HYPERLINK(\"http://evil\",\"x\")",
    "+1+2",
    "-3+4",
    "@SUM(A1:A9)",
    "a, b",
    "say \"hi\"",
    "two\nlines",
];

/// Python's csv module, strict, on `text`: the rows.
pub(crate) fn python_csv(text: &str) -> Vec<Vec<String>> {
    let script = "import csv, io, json, sys\n\
        rows = list(csv.reader(io.TextIOWrapper(sys.stdin.buffer, encoding='utf-8', newline=''), strict=True))\n\
        print(json.dumps(rows))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut stdin = child.stdin.take().unwrap();
    let input = text.as_bytes().to_vec();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(o.status.success(), "python csv: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// `scripts/fhir_check.py` (fhir.resources, R4B models) on one resource.
fn fhir_check(resource: &[u8]) {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), resource).unwrap();
    let o = std::process::Command::new("python3")
        .arg(root.join("scripts/fhir_check.py"))
        .arg(file.path())
        .output()
        .expect("python3 runs (scripts/test installs fhir.resources)");
    assert!(
        o.status.success(),
        "fhir.resources rejects the export:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn csv_and_fhir_exports_parse_back_with_independent_tools() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"));
    // More than one index page (1,000), with the tricky values spread over names and context.
    let events: Vec<Value> = (0..1100)
        .map(|i| {
            let mut e = event(i, "cardiology");
            e["actor"]["name"] = TRICKY[i % TRICKY.len()].into();
            e["actor"]["roles"] = json!(["physician", "on-call"]);
            e["context"] = json!({"note": TRICKY[(i + 3) % TRICKY.len()]});
            e
        })
        .collect();
    for chunk in events.chunks(550) {
        assert_eq!(s.post_json("/api/v1/events", &json!(chunk)).status, 201);
    }
    // One AuditEvent received over FHIR, stored as received.
    let balp = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/balp/AuditEvent-ex-auditBasicCreate1.json");
    let resource = std::fs::read(&balp).unwrap();
    let r = s.request("POST", "/fhir/AuditEvent", "application/fhir+json", &resource);
    assert_eq!(r.status, 201, "{}", r.text());
    s.wait_indexed();
    let total = 1101;

    // CSV, strictly parsed by Python: the header, one row per event, neutralised formulas.
    let r = s.get("/api/v1/events/export?format=csv");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8; header=present"));
    assert_eq!(r.header("x-export-total"), Some(total.to_string().as_str()));
    let rows = python_csv(&r.text());
    assert_eq!(rows.len(), total + 1, "a header and one row per event");
    let header: Vec<&str> = rows[0].iter().map(String::as_str).collect();
    assert_eq!(
        header[..7],
        ["seq", "id", "occurred_at", "recorded_at", "category", "action", "outcome"]
    );
    assert_eq!(header.len(), 31);
    assert!(rows.iter().all(|r| r.len() == 31));
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let by_id: std::collections::HashMap<&str, &Vec<String>> =
        rows[1..].iter().map(|r| (r[column("id")].as_str(), r)).collect();
    for i in [0usize, 1, 2, 3, 4, 5, 6, 1099] {
        let row = by_id[format!("exp-{i}").as_str()];
        let sent = TRICKY[i % TRICKY.len()];
        let expected = if sent.starts_with(['=', '+', '-', '@']) {
            format!("'{sent}")
        } else {
            sent.to_string()
        };
        assert_eq!(row[column("actor_name")], expected, "exp-{i}");
        assert_eq!(row[column("actor_roles")], "physician;on-call");
        assert_eq!(row[column("patient_id")], format!("MRN{}", i % 5));
        let context: Value = serde_json::from_str(&row[column("context")]).unwrap();
        assert_eq!(context["note"], TRICKY[(i + 3) % TRICKY.len()]);
    }
    let seqs: Vec<u64> = rows[1..].iter().map(|r| r[column("seq")].parse().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "oldest first");
    assert!(rows.iter().flatten().all(|c| !c.starts_with(['=', '+', '-', '@'])), "no live formula");
    // Chosen by Accept as well; masked for an exporter without patient identifiers.
    let r = crate::http::request_with_headers(
        &s.addr,
        Some(&s.token),
        "GET",
        "/api/v1/events/export?patient=MRN3",
        "",
        b"",
        &[("Accept", "text/csv")],
    );
    assert_eq!(python_csv(&r.text()).len(), 220 + 1);
    let body = json!({"name": "exporter", "scopes": ["events:export"]});
    let r = s.request("POST", "/api/v1/api-keys", "application/json", body.to_string().as_bytes());
    let exporter = r.json()["key"].as_str().unwrap().to_string();
    let r = s.request_as(
        Some(&exporter),
        "GET",
        "/api/v1/events/export?format=csv&project=cardiology",
        "",
        b"",
    );
    let masked = python_csv(&r.text());
    assert_eq!(masked.len(), 1100 + 1);
    assert!(masked[1..].iter().all(|r| r[column("patient_id")] == "***"));

    // FHIR: one searchset Bundle, valid for fhir.resources, every event an entry.
    let r = s.get("/api/v1/events/export?format=fhir");
    assert_eq!(r.header("content-type"), Some("application/fhir+json"));
    let bundle = r.json();
    assert_eq!(
        (bundle["type"].as_str(), bundle["total"].as_u64()),
        (Some("searchset"), Some(total as u64))
    );
    let entries = bundle["entry"].as_array().unwrap();
    assert_eq!(entries.len(), total);
    assert!(entries.iter().all(|e| e["resource"]["resourceType"] == "AuditEvent"));
    assert!(entries.iter().any(|e| e["resource"]["agent"][0]["who"]["display"] == TRICKY[0]));
    fhir_check(&r.body);
    // By Accept, and with no match at all (FHIR has no empty arrays: no `entry`).
    let r = crate::http::request_with_headers(
        &s.addr,
        Some(&s.token),
        "GET",
        "/api/v1/events/export?user=nobody",
        "",
        b"",
        &[("Accept", "application/fhir+json")],
    );
    assert_eq!(
        r.json(),
        json!({"resourceType": "Bundle", "type": "searchset", "timestamp": r.json()["timestamp"], "total": 0})
    );
    fhir_check(&r.body);
    assert_eq!(code(&s.get("/api/v1/events/export?format=xml")), (400, "invalid_parameter".into()));
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
