//! The privacy filter end to end: canary secrets and identifiers sent through every ingest
//! path (a native event, an array, a bulk upload, FHIR create, a FHIR Bundle, `import`) are
//! masked before anything is stored. None reaches the log (read back in the clear by `export`
//! with the master key), the data directory, a reader, an answer or the server's output; each
//! event records what fired; the patient's identifier still finds every event.

use crate::fhir::fhir_check;
use crate::http::{Server, request_with_headers};
use crate::*;
use base64::Engine as _;
use serde_json::{Value, json};

const SSN: &str = "078-05-1120";
const CARD: &str = "4111 1111 1111 1111";
const PASSWORD: &str = "CanaryPassw0rd-9f1c";
const JWT: &str = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJjYW5hcnkifQ.Q2FuYXJ5U2lnN2QyZQ";
const EMAIL: &str = "canary.person@example.org";
const MRN: &str = "MRN-77120345";
/// The patient's identifier: kept in its own field, as accounting of disclosures needs it.
const PATIENT: &str = "PT-Canary-4242";
const MRN_PATTERN: &str = r"\bMRN-?[0-9]{6,10}\b";

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// The FHIR entity query: a search by e-mail with the client's token in the URL.
fn fhir_query() -> String {
    format!("GET /Patient?email={EMAIL}&access_token={JWT}")
}

/// Everything that must never be stored or printed, in every form it was sent in.
fn canaries() -> Vec<String> {
    let mut all: Vec<String> =
        [SSN, CARD, PASSWORD, JWT, EMAIL, MRN].iter().map(|c| c.to_string()).collect();
    all.push(b64(&fhir_query()));
    all.push(b64(PASSWORD));
    all
}

fn assert_no_canary(what: &str, text: &str) {
    for canary in canaries() {
        assert!(!text.contains(&canary), "{what} holds {canary:?}:\n{text}");
    }
}

fn event(id: &str, extra: Value) -> Value {
    let mut e = json!({"id": id, "occurred_at": "2026-11-22T10:15:00Z", "category": "phi_access",
        "action": "patient.read", "outcome": "success", "actor": {"user_id": "u-7"},
        "source": {"system": "ehr"}, "patient": {"id": PATIENT}});
    for (k, v) in extra.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn audit_event(extra: Value) -> Value {
    let mut r = json!({"resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "action": "R", "recorded": "2026-11-22T10:15:00Z", "outcome": "0",
        "agent": [{"who": {"identifier": {"value": "dr-who"}}, "requestor": true}],
        "source": {"observer": {"display": "ehr"}}});
    for (k, v) in extra.as_object().unwrap() {
        r[k] = v.clone();
    }
    r
}

fn patient_entity() -> Value {
    json!({"what": {"reference": format!("Patient/{PATIENT}")},
           "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1"}})
}

/// The `(rule, field)` pairs recorded on a stored event.
fn fired(e: &Value) -> Vec<(String, String)> {
    e["redactions"]
        .as_array()
        .unwrap_or_else(|| panic!("no redactions on {e}"))
        .iter()
        .map(|r| (r["rule"].as_str().unwrap().into(), r["field"].as_str().unwrap().into()))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
}

#[test]
fn canaries_sent_through_every_ingest_path_are_masked_before_they_are_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let d = data.to_str().unwrap();
    let mut answers = String::new();

    // `import`, with the [privacy] section of the server's settings file.
    let config = tmp.path().join("auditrail.toml");
    std::fs::write(&config, format!("[privacy.patterns]\nmrn = '{MRN_PATTERN}'\n")).unwrap();
    let file = tmp.path().join("events.ndjson");
    let imported = event(
        "import-1",
        json!({"context": {"token": PASSWORD, "note": format!("{MRN} and {SSN}")}}),
    );
    std::fs::write(&file, imported.to_string() + "\n").unwrap();
    let o =
        run(&["import", "--data", d, "--config", config.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    answers += &(stdout(&o) + &stderr(&o));

    let server = Server::start_with(&data, &[("AUDITRAIL_PRIVACY_PATTERN_MRN", MRN_PATTERN)]);
    let post = |path: &str, content_type: &str, body: String, want: u16| {
        let r = server.request("POST", path, content_type, body.as_bytes());
        assert_eq!(r.status, want, "{path}: {}", r.text());
        r
    };

    // A native event, an array, and an invalid event whose answer must not echo its values.
    let single = event(
        "native-1",
        json!({"action": "user.password.change", "outcome_desc": format!("card {CARD} declined"),
            "request": {"method": "POST", "path": "/api/users/7/password", "query": format!("access_token={JWT}")},
            "context": {"password": PASSWORD, "Authorization": format!("Bearer {JWT}"),
                        "note": format!("SSN {SSN}, reply to {EMAIL} about {MRN}")},
            "changes": [{"field": "password", "before": PASSWORD, "after": "changed"}]}),
    );
    answers += &post("/api/v1/events", "application/json", single.to_string(), 201).text();
    let array = json!([
        event(
            "array-1",
            json!({"entities": [{"type": "DocumentReference", "id": "d1", "name": format!("scan of {MRN}")}],
                                "context": {"api_key": PASSWORD, "callback": "(415) 555-2671"}})
        ),
        event("array-2", json!({"outcome_desc": format!("sent to {EMAIL}")})),
    ]);
    answers += &post("/api/v1/events", "application/json", array.to_string(), 201).text();
    let invalid =
        event("bad-1", json!({"action": "Bad Action", "context": {"note": format!("SSN {SSN}")}}));
    answers += &post("/api/v1/events", "application/json", invalid.to_string(), 400).text();

    // Bulk: two good lines around a line that is not JSON and one that is not an event.
    let bulk = [
        event("bulk-1", json!({"context": {"note": format!("retry with Bearer {JWT}"), "session_secret": PASSWORD}}))
            .to_string(),
        format!(r#"{{"action": "patient.read", "context": {{"password": "{PASSWORD}", "ssn": "{SSN}""#),
        event("bulk-bad", json!({"action": "Bad Action", "context": {"note": format!("card {CARD}")}}))
            .to_string(),
        event("bulk-2", json!({"changes": [{"field": "contact", "after": {"email": EMAIL, "card": CARD}}]}))
            .to_string(),
    ]
    .join("\n");
    let r = post("/api/v1/events/bulk", "application/x-ndjson", bulk, 200);
    answers += &r.text();
    let statuses: Vec<u64> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [201, 400, 400, 201]);

    // FHIR create, answered with the stored resource.
    let created = audit_event(json!({
        "outcomeDesc": format!("looked up SSN {SSN}"),
        "entity": [patient_entity(), {
            "what": {"reference": "DocumentReference/d2"}, "description": format!("chart {MRN}"),
            "query": b64(&fhir_query()),
            "detail": [{"type": "password", "valueString": PASSWORD}],
        }],
    }));
    let r = request_with_headers(
        &server.addr,
        Some(&server.token),
        "POST",
        "/fhir/AuditEvent",
        "application/fhir+json",
        created.to_string().as_bytes(),
        &[("Prefer", "return=representation")],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    answers += &r.text();
    let returned = r.json();
    assert_eq!(returned["meta"]["security"][0]["code"], "REDACTED", "{returned}");
    // A FHIR Bundle.
    let bundled = audit_event(json!({
        "outcomeDesc": format!("paid with {CARD}"),
        "purposeOfEvent": [{"text": format!("asked by {EMAIL}")}],
        "entity": [patient_entity(), {"what": {"reference": "Consent/c1"},
            "detail": [{"type": "client_secret", "valueBase64Binary": b64(PASSWORD)}]}],
    }));
    let bundle = json!({"resourceType": "Bundle", "type": "batch",
        "entry": [{"resource": bundled, "request": {"method": "POST", "url": "AuditEvent"}}]});
    answers += &post("/fhir", "application/fhir+json", bundle.to_string(), 200).text();
    assert_no_canary("an answer or import's output", &answers);

    // Read back as an administrator who may see patient identifiers: masked, with a record.
    let events = server.client_events();
    assert_eq!(events.len(), 8, "{events:#?}");
    let all = serde_json::to_string(&events).unwrap();
    assert_no_canary("the events read back", &all);
    for rule in ["secret", "bearer", "ssn", "card", "email", "phone", "mrn"] {
        assert!(all.contains(&format!("[REDACTED:{rule}]")), "no {rule} indicator in {all}");
    }
    let by_id = |id: &str| events.iter().find(|e| e["id"] == id).unwrap_or_else(|| panic!("{id}"));
    assert_eq!(
        fired(by_id("native-1")),
        pairs(&[
            ("card", "outcome_desc"),
            ("secret", "request.query"),
            ("secret", "context.Authorization"),
            ("secret", "context.password"),
            ("mrn", "context.note"),
            ("ssn", "context.note"),
            ("email", "context.note"),
            ("secret", "changes[0].after"),
            ("secret", "changes[0].before"),
        ])
    );
    assert_eq!(
        by_id("native-1")["context"]["note"],
        "SSN [REDACTED:ssn], reply to [REDACTED:email] about [REDACTED:mrn]"
    );
    assert_eq!(
        fired(by_id("import-1")),
        pairs(&[("secret", "context.token"), ("mrn", "context.note"), ("ssn", "context.note")])
    );
    assert_eq!(
        fired(by_id("array-1")),
        pairs(&[
            ("mrn", "entities[0].name"),
            ("secret", "context.api_key"),
            ("phone", "context.callback")
        ])
    );
    assert_eq!(fired(by_id("array-2")), pairs(&[("email", "outcome_desc")]));
    assert_eq!(
        fired(by_id("bulk-1")),
        pairs(&[("secret", "context.session_secret"), ("bearer", "context.note")])
    );
    assert_eq!(
        fired(by_id("bulk-2")),
        pairs(&[("card", "changes[0].after.card"), ("email", "changes[0].after.email")])
    );
    let from_fhir: Vec<&Value> = events.iter().filter(|e| e.get("fhir").is_some()).collect();
    let create =
        from_fhir.iter().find(|e| e["outcome_desc"] == "looked up SSN [REDACTED:ssn]").unwrap();
    assert_eq!(
        fired(create),
        pairs(&[
            ("mrn", "fhir.entity[1].description"),
            ("secret", "fhir.entity[1].detail[0].valueString"),
            ("secret", "fhir.entity[1].query"),
            ("email", "fhir.entity[1].query"),
            ("ssn", "fhir.outcomeDesc"),
        ])
    );
    let query = base64::engine::general_purpose::STANDARD
        .decode(create["fhir"]["entity"][1]["query"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        String::from_utf8(query).unwrap(),
        "GET /Patient?email=[REDACTED:email]&access_token=[REDACTED:secret]"
    );
    let bundled =
        from_fhir.iter().find(|e| e["outcome_desc"] == "paid with [REDACTED:card]").unwrap();
    assert_eq!(
        fired(bundled),
        pairs(&[
            ("secret", "fhir.entity[1].detail[0].valueBase64Binary"),
            ("card", "fhir.outcomeDesc"),
            ("email", "fhir.purposeOfEvent[0].text"),
        ])
    );

    // The patient's identifier still finds every event, natively and through FHIR, and the
    // FHIR view labels each as redacted and stays valid R4.
    let r = server.get(&format!("/api/v1/events?patient={PATIENT}&limit=100"));
    assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(8), "{}", r.text());
    let r = server.get(&format!("/fhir/AuditEvent?patient={PATIENT}&_count=100"));
    assert_eq!(r.status, 200, "{}", r.text());
    let found = r.json();
    let resources: Vec<&Value> =
        found["entry"].as_array().unwrap().iter().map(|e| &e["resource"]).collect();
    assert_eq!(resources.len(), 8);
    for resource in &resources {
        let labels = resource["meta"]["security"].as_array().unwrap();
        assert!(labels.iter().any(|l| l["code"] == "REDACTED"), "{resource}");
        let extensions = resource["extension"].as_array().unwrap();
        assert!(
            extensions.iter().all(|e| e["url"] == auditrail_core::fhir::REDACTION_EXTENSION),
            "{resource}"
        );
    }
    assert_no_canary("the FHIR search", &r.text());
    fhir_check(&[found.clone(), returned]);

    let output = server.output();
    assert!(server.stop().success());
    assert_no_canary("the server's output", &output);

    // The whole log in the clear (the repository's own records of the reads included), then
    // the directory as a thief would read it.
    let exported = run(&["export", "--data", d]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let log = stdout(&exported);
    assert_no_canary("the log", &log);
    assert!(log.contains(PATIENT) && log.contains("[REDACTED:ssn]"));
    let mut dirs = vec![data.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let bytes = std::fs::read(&path).unwrap();
            for canary in canaries() {
                let found = bytes.windows(canary.len()).any(|w| w == canary.as_bytes());
                assert!(!found, "{} holds {canary:?}", path.display());
            }
        }
    }
}
