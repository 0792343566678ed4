//! The FHIR Audit Record Repository against the IHE BALP examples (../shared/corpus/balp),
//! with every resource we return checked by an independent FHIR implementation
//! (`fhir.resources`, R4B models, through scripts/fhir_check.py).

use crate::http::Server;
use serde_json::{Value, json};
use std::path::PathBuf;

fn corpus() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/balp");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("BALP corpus at {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with("AuditEvent-") && name.ends_with(".json")
        })
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn coding(c: &Value) -> Option<String> {
    let code = c.get("code")?.as_str()?;
    Some(match c.get("system").and_then(Value::as_str) {
        Some(system) => format!("{system}|{code}"),
        None => code.to_string(),
    })
}

/// The searches an auditor would use to find this AuditEvent again.
fn searches_for(r: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let entities = r["entity"].as_array().cloned().unwrap_or_default();
    for e in &entities {
        if let Some(reference) = e.pointer("/what/reference").and_then(Value::as_str) {
            if reference.starts_with("Patient/") {
                out.push(format!("patient={}", enc(reference)));
            }
            out.push(format!("entity={}", enc(reference)));
        }
    }
    for a in r["agent"].as_array().cloned().unwrap_or_default() {
        if let Some(reference) = a.pointer("/who/reference").and_then(Value::as_str) {
            out.push(format!("agent={}", enc(reference)));
        }
    }
    if let Some(t) = coding(&r["type"]) {
        out.push(format!("type={}", enc(&t)));
    }
    for s in r["subtype"].as_array().cloned().unwrap_or_default() {
        if let Some(t) = coding(&s) {
            out.push(format!("subtype={}", enc(&t)));
        }
    }
    if let Some(a) = r["action"].as_str() {
        out.push(format!("action={a}"));
    }
    if let Some(o) = r["outcome"].as_str() {
        out.push(format!("outcome={o}"));
    }
    if let Some(d) = r["recorded"].as_str() {
        out.push(format!("date=ge{}&date=le{}", enc(d), enc(d)));
    }
    out
}

pub(crate) fn fhir_check(resources: &[Value]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let file = tempfile::NamedTempFile::new().unwrap();
    let ndjson: String = resources.iter().map(|r| r.to_string() + "\n").collect();
    std::fs::write(file.path(), ndjson).unwrap();
    let o = std::process::Command::new("python3")
        .arg(root.join("scripts/fhir_check.py"))
        .stdin(std::fs::File::open(file.path()).unwrap())
        .output()
        .expect("python3 runs (scripts/test installs fhir.resources)");
    assert!(
        o.status.success(),
        "fhir.resources rejects what we returned:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn every_balp_example_is_stored_and_found_again() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    let corpus = corpus();
    assert!(corpus.len() >= 40, "corpus has {} AuditEvents", corpus.len());
    let mut returned = Vec::new();
    let mut ids = Vec::new();
    // Half one by one (ITI-20 create), half in one batch Bundle.
    let (single, batched) = corpus.split_at(corpus.len() / 2);
    for (name, resource) in single {
        let r = server.request(
            "POST",
            "/fhir/AuditEvent",
            "application/fhir+json",
            resource.to_string().as_bytes(),
        );
        assert_eq!(r.status, 201, "{name}: {}", r.text());
        let location = r.header("location").unwrap().to_string();
        let id =
            location.split("/AuditEvent/").nth(1).unwrap().split('/').next().unwrap().to_string();
        returned.push(r.json());
        ids.push((name.clone(), id, resource.clone()));
    }
    let bundle = json!({
        "resourceType": "Bundle", "type": "batch",
        "entry": batched.iter().map(|(_, r)| json!({"resource": r, "request": {"method": "POST", "url": "AuditEvent"}})).collect::<Vec<_>>(),
    });
    let r = server.request("POST", "/fhir", "application/fhir+json", bundle.to_string().as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let response = r.json();
    assert_eq!(response["type"], "batch-response");
    for ((name, resource), entry) in batched.iter().zip(response["entry"].as_array().unwrap()) {
        assert_eq!(entry["response"]["status"], "201 Created", "{name}");
        let id = entry["resource"]["id"].as_str().unwrap().to_string();
        ids.push((name.clone(), id, resource.clone()));
    }
    returned.push(response);
    server.wait_indexed();

    let mut searches = 0;
    for (name, id, resource) in &ids {
        // Read back: the resource as received, plus its id and meta.lastUpdated.
        let r = server.get(&format!("/fhir/AuditEvent/{id}"));
        assert_eq!(r.status, 200, "{name}");
        let got = r.json();
        assert_eq!(got["id"], id.as_str());
        assert!(got.pointer("/meta/lastUpdated").is_some(), "{name}");
        assert_eq!(got["agent"], resource["agent"], "{name}: stored as received");
        assert_eq!(got["entity"], resource["entity"], "{name}");
        returned.push(got);
        for query in searches_for(resource) {
            let r = server.get(&format!("/fhir/AuditEvent?{query}&_count=1000"));
            assert_eq!(r.status, 200, "{name} {query}: {}", r.text());
            let bundle = r.json();
            let found = bundle["entry"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["resource"]["id"] == id.as_str());
            assert!(found, "{name}: not found by {query}");
            assert!(bundle["total"].as_u64().unwrap() >= 1);
            searches += 1;
        }
    }
    assert!(searches > 300, "only {searches} searches");

    // Paging: next links walk every match exactly once.
    let mut url = "/fhir/AuditEvent?_count=7&_sort=-date".to_string();
    let mut seen = Vec::new();
    let mut total;
    loop {
        let bundle = server.get(&url).json();
        total = bundle["total"].as_u64().unwrap();
        for e in bundle["entry"].as_array().unwrap() {
            seen.push(e["resource"]["id"].as_str().unwrap().to_string());
        }
        returned.push(bundle.clone());
        let next =
            bundle["link"].as_array().unwrap().iter().find(|l| l["relation"] == "next").cloned();
        match next {
            Some(l) => {
                url = l["url"].as_str().unwrap().split(&server.addr).nth(1).unwrap().to_string()
            }
            None => break,
        }
    }
    assert_eq!(seen.len() as u64, total);
    assert_eq!(total, corpus.len() as u64);
    let unique: std::collections::BTreeSet<_> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len());

    // Native events are readable as FHIR too.
    let r = server.post_json(
        "/api/v1/events",
        &json!({"action": "patient.read", "outcome": "success",
        "occurred_at": "2026-11-22T10:00:00Z", "actor": {"user_id": "dr.who", "ip": "10.1.1.1"},
        "patient": {"id": "MRN77"}, "source": {"system": "ehr", "site": "north"}}),
    );
    assert_eq!(r.status, 201);
    server.wait_indexed();
    let bundle = server.get("/fhir/AuditEvent?patient=MRN77").json();
    assert_eq!(bundle["total"], 1);
    returned.push(bundle);
    returned.push(server.get("/fhir/metadata").json());
    let outcome = server.get("/fhir/AuditEvent?date=garbage");
    assert_eq!(outcome.status, 400);
    returned.push(outcome.json());
    fhir_check(&returned);
}

#[test]
fn bad_fhir_requests_get_an_operation_outcome_and_store_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start(&tmp.path().join("data"));
    let ae = corpus().remove(0).1;
    let patient_bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": ae, "request": {"method": "POST", "url": "AuditEvent"}},
        {"resource": {"resourceType": "Patient", "id": "p"}, "request": {"method": "POST", "url": "Patient"}}]});
    // Cursors whose text starts with a multi-byte character (a kind letter is one byte).
    let b64url = |s: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let multibyte_cursor = format!("/fhir/AuditEvent?_cursor={}", b64url("é123"));
    let multibyte_page = format!("/fhir/AuditEvent?_page={}", b64url("\u{1F600}7"));
    let cases: Vec<(&str, &str, &str, String, u16)> = vec![
        (
            "POST",
            "/fhir/AuditEvent",
            "application/fhir+json",
            "{\"resourceType\": \"AuditEvent\", ".into(),
            400,
        ),
        (
            "POST",
            "/fhir/AuditEvent",
            "application/fhir+json",
            "{\"resourceType\": \"Patient\"}".into(),
            400,
        ),
        ("POST", "/fhir/AuditEvent", "application/fhir+json", "[1, 2]".into(), 400),
        (
            "POST",
            "/fhir/AuditEvent",
            "application/fhir+json",
            "{\"resourceType\": \"AuditEvent\", \"recorded\": 5}".into(),
            400,
        ),
        ("POST", "/fhir/AuditEvent", "text/plain", ae.to_string(), 415),
        ("POST", "/fhir", "application/fhir+json", patient_bundle.to_string(), 400),
        (
            "POST",
            "/fhir",
            "application/fhir+json",
            json!({"resourceType": "Bundle", "type": "collection"}).to_string(),
            400,
        ),
        ("POST", "/fhir", "application/fhir+json", ae.to_string(), 400),
        ("PUT", "/fhir/AuditEvent/x", "application/fhir+json", ae.to_string(), 405),
        ("PATCH", "/fhir/AuditEvent/x", "application/json-patch+json", "[]".into(), 405),
        ("DELETE", "/fhir/AuditEvent/x", "", String::new(), 405),
        ("DELETE", "/fhir/AuditEvent", "", String::new(), 405),
        ("GET", "/fhir/AuditEvent/does-not-exist", "", String::new(), 404),
        ("GET", "/fhir/Patient/1", "", String::new(), 404),
        ("GET", "/fhir/AuditEvent?date=2026-13-45", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?date=xx2026", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?_count=many", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?_sort=colour", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?flavour=mint", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?agent:contains=x", "", String::new(), 400),
        ("GET", "/fhir/AuditEvent?_cursor=nonsense", "", String::new(), 400),
        ("GET", &multibyte_cursor, "", String::new(), 400),
        ("GET", &multibyte_page, "", String::new(), 400),
    ];
    let mut outcomes = Vec::new();
    for (method, path, ct, body, status) in &cases {
        let r = server.request(method, path, ct, body.as_bytes());
        assert_eq!(r.status, *status, "{method} {path}: {}", r.text());
        let v = r.json();
        assert_eq!(v["resourceType"], "OperationOutcome", "{method} {path}");
        assert!(v["issue"][0]["diagnostics"].as_str().is_some_and(|d| !d.is_empty()));
        outcomes.push(v);
    }
    assert_eq!(server.client_events(), Vec::<Value>::new(), "nothing stored");
    fhir_check(&outcomes);
}

#[test]
fn public_url_is_the_base_of_fhir_locations_and_must_be_http() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::start_with(
        &tmp.path().join("data"),
        &[("AUDITRAIL_PUBLIC_URL", "https://audit.example.org")],
    );
    let ae = corpus().remove(0).1;
    let r = server.request(
        "POST",
        "/fhir/AuditEvent",
        "application/fhir+json",
        ae.to_string().as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let location = r.header("location").unwrap();
    assert!(location.starts_with("https://audit.example.org/fhir/AuditEvent/"), "{location}");
    server.wait_indexed();
    let bundle = server.get("/fhir/AuditEvent").json();
    assert_eq!(bundle["total"], 1);
    let full_url = bundle["entry"][0]["fullUrl"].as_str().unwrap();
    assert!(full_url.starts_with("https://audit.example.org/fhir/AuditEvent/"), "{full_url}");
    let self_url = bundle["link"][0]["url"].as_str().unwrap();
    assert!(self_url.starts_with("https://audit.example.org/fhir/AuditEvent?"), "{self_url}");
    drop(server);

    // Anything but an http(s) URL is refused at startup, naming the setting and the value.
    let mut child = crate::bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(tmp.path().join("other"))
        .env("AUDITRAIL_PUBLIC_URL", "ftp://x")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut exited = false;
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            exited = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if !exited {
        let _ = child.kill();
    }
    let o = child.wait_with_output().unwrap();
    assert!(exited, "serve kept running with public_url ftp://x: {}", crate::stdout(&o));
    assert!(!o.status.success(), "{:?}", o.status);
    let err = crate::stderr(&o);
    assert!(err.contains("public_url") && err.contains("ftp://x"), "{err}");
}
