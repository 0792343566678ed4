//! Compliance reports end to end against a real server: the patient access report agrees with
//! a direct search event for event (JSON and CSV, across index pages, with a date range),
//! marks the accounting of disclosures by purpose of use (native and BALP FHIR events), groups
//! by user, organisation and purpose; the other reports select what they say; parameters and
//! permissions are enforced with stable codes; and every run is itself in the log.

use crate::export::python_csv;
use crate::http::{Response, Server};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

const PURPOSES: [Option<&str>; 8] = [
    Some("TREAT"),
    Some("TREAT"),
    Some("HPAYMT"),
    Some("HOPERAT"),
    Some("HRESCH"),
    Some("PATRQT"),
    None,
    Some("TREAT;PUBHLTH"),
];
const ORGS: [Option<&str>; 3] = [Some("St. Mary"), Some("North Clinic"), None];

/// Event `i` of the mix: patients MRN-A (half the events), MRN-B and MRN-C; five users;
/// purposes and organisations cycling; every 16th a disclosure action without a purpose.
fn event(i: usize) -> Value {
    let patient = match (i / 7) % 4 {
        0 | 2 => "MRN-A",
        1 => "MRN-B",
        _ => "MRN-C",
    };
    let minute = i % 60;
    let hour = (i / 60) % 24;
    let day = 1 + i / 1440;
    let mut e = json!({
        "id": format!("rep-{i}"),
        "occurred_at": format!("2026-03-{day:02}T{hour:02}:{minute:02}:00Z"),
        "category": "phi_access",
        "action": if i % 16 == 6 { "patient.disclose" } else { "patient.read" },
        "outcome": "success",
        "actor": {"user_id": format!("dr.{}", i % 5), "ip": "10.1.2.3"},
        "patient": {"id": patient},
    });
    if let Some(p) = PURPOSES[i % 8] {
        let codes: Vec<&str> = p.split(';').collect();
        e["purpose_of_use"] = if codes.len() == 1 { json!(codes[0]) } else { json!(codes) };
    }
    if let Some(o) = ORGS[i % 3] {
        e["context"] = json!({"organization": o});
    }
    e
}

/// The accounting rule, restated independently of the server's code.
fn expected_disclosure(e: &Value) -> bool {
    let tpo = ["TREAT", "HPAYMT", "HOPERAT"];
    let purposes: Vec<&str> = match &e["purpose_of_use"] {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().map(|v| v.as_str().unwrap()).collect(),
        _ => vec![],
    };
    purposes.iter().any(|p| !tpo.contains(p))
        || (purposes.is_empty() && e["action"] == "patient.disclose")
}

/// A patient access group: (user, organisation, purpose of use) -> (events, disclosures).
type GroupCounts = BTreeMap<(String, Option<String>, Option<String>), (u64, u64)>;

fn code(r: &Response) -> (u16, String) {
    (r.status, r.json()["error"]["code"].as_str().unwrap_or_default().to_string())
}

/// Every event a search finds, oldest first, a page of 1,000 at a time.
fn search_all(s: &Server, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = s.get(&format!("/api/v1/events?{query}&order=asc&limit=1000{cursor}"));
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        out.extend(page["events"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// The repository's `report.run` events, waited for (a read's trace is queued, not awaited).
fn report_runs(s: &Server, run_id: &str) -> Value {
    for _ in 0..400 {
        let runs = search_all(s, "category=repository&action=report.run");
        if let Some(e) = runs.into_iter().find(|e| e["context"]["run_id"] == run_id) {
            return e;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no report.run event for run {run_id}");
}

fn key(s: &Server, scopes: &[&str]) -> String {
    let body =
        json!({"name": format!("k{}", scopes.join("-").replace(':', "_")), "scopes": scopes});
    let r = s.request("POST", "/api/v1/api-keys", "application/json", body.to_string().as_bytes());
    assert_eq!(r.status, 201, "{}", r.text());
    r.json()["key"].as_str().unwrap().to_string()
}

#[test]
fn patient_access_report_matches_the_search_and_marks_the_accounting_of_disclosures() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start(&tmp.path().join("data"));
    let sent: Vec<Value> = (0..2600).map(event).collect();
    for chunk in sent.chunks(500) {
        assert_eq!(s.post_json("/api/v1/events", &json!(chunk)).status, 201);
    }
    // A BALP consent decision: the requestor's organisation is an agent of its own, and the
    // purpose (PATRQT) is outside treatment, payment and operations.
    let corpus = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/balp/AuditEvent-ex-auditAuthZconsent.json");
    let fhir = std::fs::read(corpus).unwrap();
    let r = s.request("POST", "/fhir/AuditEvent", "application/fhir+json", &fhir);
    assert_eq!(r.status, 201, "{}", r.text());
    s.wait_indexed();
    let n_a = sent.iter().filter(|e| e["patient"]["id"] == "MRN-A").count();
    assert!(n_a > 1000, "more than one index page: {n_a}");

    // JSON: exactly the search's events, oldest first, past the 1,000-event index page.
    let r = s.get("/api/v1/reports/patient-access?patient=MRN-A");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let report = r.json();
    let searched = search_all(&s, "patient=MRN-A");
    assert_eq!(searched.len(), n_a);
    let events = report["events"].as_array().unwrap();
    let shown: Vec<&Value> = events.iter().map(|e| &e["event"]).collect();
    assert_eq!(shown, searched.iter().collect::<Vec<_>>(), "event for event");
    assert!(events.iter().all(|e| e["seq"] == e["event"]["seq"]));
    assert_eq!(r.header("x-report-total").unwrap(), n_a.to_string());
    assert_eq!(report["events_total"], n_a);
    assert_eq!(report["report"], "patient-access");
    assert_eq!(
        report["parameters"],
        json!({"patient": "MRN-A", "from": null, "to": null, "format": "json"})
    );
    assert_eq!(r.header("x-report-id"), report["run_id"].as_str());
    let cp = &report["checkpoint"];
    assert!(cp["tree_size"].as_u64().unwrap() >= report["indexed_through"].as_u64().unwrap());
    assert!(cp["signed_note"].as_str().unwrap().contains(cp["root_hash"].as_str().unwrap()));
    assert_eq!(r.header("x-report-tree-size").unwrap(), cp["tree_size"].to_string());

    // Each event marked as the rule says, with the organisation it names.
    let by_id: BTreeMap<&str, &Value> =
        sent.iter().map(|e| (e["id"].as_str().unwrap(), e)).collect();
    let mut disclosures = 0;
    let mut expected_groups = GroupCounts::new();
    for e in events {
        let original = by_id[e["event"]["id"].as_str().unwrap()];
        let marked = expected_disclosure(original);
        assert_eq!(e["disclosure"], marked, "{e}");
        assert_eq!(e["disclosure_reason"].is_string(), marked, "{e}");
        assert_eq!(e["organization"], original["context"]["organization"], "{e}");
        disclosures += u64::from(marked);
        let purpose = match &original["purpose_of_use"] {
            Value::String(p) => Some(p.clone()),
            Value::Array(a) => {
                Some(a.iter().map(|p| p.as_str().unwrap()).collect::<Vec<_>>().join(";"))
            }
            _ => None,
        };
        let org = original["context"]["organization"].as_str().map(str::to_string);
        let user = original["actor"]["user_id"].as_str().unwrap().to_string();
        let g = expected_groups.entry((user, org, purpose)).or_default();
        g.0 += 1;
        g.1 += u64::from(marked);
    }
    assert!(disclosures > 300, "the mix holds disclosures of every kind: {disclosures}");
    assert_eq!(report["totals"]["events"], n_a);
    assert_eq!(report["totals"]["disclosures"], disclosures);
    let reasons: BTreeSet<&str> =
        events.iter().filter_map(|e| e["disclosure_reason"].as_str()).collect();
    assert!(reasons.iter().any(|r| r.contains("HRESCH")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("PUBHLTH")), "{reasons:?}");
    assert!(reasons.iter().any(|r| r.contains("no purpose")), "{reasons:?}");
    // Grouped by user, organisation and purpose of use.
    let groups: GroupCounts = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let text = |k: &str| g[k].as_str().map(str::to_string);
            (
                (text("user").unwrap(), text("organization"), text("purpose_of_use")),
                (g["events"].as_u64().unwrap(), g["disclosures"].as_u64().unwrap()),
            )
        })
        .collect();
    assert_eq!(groups, expected_groups);
    assert_eq!(report["totals"]["groups"], expected_groups.len());

    // A date range: the same as the search with the same range.
    let range = "from=2026-03-01T10:00:00Z&to=2026-03-02T05:30:00Z";
    let r = s.get(&format!("/api/v1/reports/patient-access?patient=MRN-A&{range}"));
    let ranged: Vec<Value> =
        r.json()["events"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
    let searched_range = search_all(&s, &format!("patient=MRN-A&{range}"));
    assert!(!ranged.is_empty() && ranged.len() < n_a, "{}", ranged.len());
    assert_eq!(ranged, searched_range);

    // CSV: one row per event, the report's columns then the export's, parsed by Python.
    let r = s.get("/api/v1/reports/patient-access?patient=MRN-A&format=csv");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").unwrap().starts_with("text/csv"));
    let rows = python_csv(&r.text());
    assert_eq!(rows.len(), n_a + 1, "a header and one row per event");
    assert_eq!(rows[0][..5], ["disclosure", "disclosure_reason", "organization", "seq", "id"]);
    assert_eq!(rows[0].len(), 3 + 31);
    for (row, e) in rows[1..].iter().zip(events) {
        assert_eq!(row[3], e["seq"].to_string());
        assert_eq!(row[0], if e["disclosure"] == true { "yes" } else { "no" });
        assert_eq!(row[2], e["organization"].as_str().unwrap_or(""));
        assert_eq!(row[3 + 20], "MRN-A", "patient_id");
    }

    // The BALP event: found by its patient, its organisation agent named, PATRQT marked.
    let balp = s.get("/api/v1/reports/patient-access?patient=ex-patient").json();
    assert_eq!(balp["events_total"], 1, "{balp}");
    let e = &balp["events"][0];
    assert_eq!(e["organization"], "Organization/ex-organization");
    assert_eq!(e["disclosure"], true);
    assert!(e["disclosure_reason"].as_str().unwrap().contains("PATRQT"));

    // Bad parameters: 400 with a stable code, before anything is streamed.
    for (query, want) in [
        ("", "invalid_parameter"),
        ("?patient=", "invalid_parameter"),
        ("?patient=MRN-A&patient=MRN-B", "invalid_parameter"),
        ("?patient=MRN-A&from=yesterday", "invalid_parameter"),
        ("?patient=MRN-A&from=2026-03-02T00:00:00Z&to=2026-03-01T00:00:00Z", "invalid_parameter"),
        ("?patient=MRN-A&format=xml", "invalid_parameter"),
        ("?patient=MRN-A&limit=5", "unknown_parameter"),
        ("?patient=%zz", "bad_query"),
    ] {
        let r = s.get(&format!("/api/v1/reports/patient-access{query}"));
        assert_eq!(code(&r), (400, want.to_string()), "{query}: {}", r.text());
    }

    // Permissions: reports:run is needed; without events:patient_identifiers the patient's
    // identifiers are masked.
    let reader = key(&s, &["events:read", "events:patient_identifiers"]);
    for report in [
        "patient-access?patient=MRN-A",
        "user-activity?user=dr.1",
        "failed-access",
        "security-changes",
        "alerts",
    ] {
        let r = s.request_as(Some(&reader), "GET", &format!("/api/v1/reports/{report}"), "", b"");
        assert_eq!(code(&r), (403, "forbidden".into()), "{report}");
    }
    let runner = key(&s, &["reports:run"]);
    let r =
        s.request_as(Some(&runner), "GET", "/api/v1/reports/patient-access?patient=MRN-A", "", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let masked = r.json();
    assert_eq!(masked["events_total"], n_a);
    assert!(
        masked["events"].as_array().unwrap().iter().all(|e| e["event"]["patient"]["id"] == "***")
    );

    // The run itself is in the log: who ran which report, with what parameters.
    s.wait_indexed();
    let run = report_runs(&s, report["run_id"].as_str().unwrap());
    assert_eq!(run["category"], "repository");
    assert_eq!(run["outcome"], "success");
    assert_eq!(run["context"]["report"], "patient-access");
    assert_eq!(run["context"]["route"], "/api/v1/reports/patient-access");
    assert_eq!(run["context"]["events"], n_a.to_string());
    assert_eq!(run["request"]["query"], "patient=MRN-A");
    let refused = search_all(&s, "category=repository&action=access.denied");
    assert!(refused.iter().any(|e| e["context"]["route"] == "/api/v1/reports/alerts"));
}

#[test]
fn failed_access_security_changes_user_activity_and_alert_summary() {
    let tmp = tempfile::tempdir().unwrap();
    let s = Server::start_with(&tmp.path().join("data"), &[("AUDITRAIL_ALERTS_ENABLED", "true")]);
    let client = |action: &str, outcome: &str, user: &str, category: &str| {
        json!({"action": action, "outcome": outcome, "category": category,
            "occurred_at": "2026-03-02T10:00:00Z", "actor": {"user_id": user, "ip": "10.9.9.9"}})
    };
    let events = json!([
        client("login.failure", "failure", "u1", "authentication"),
        client("login.failure", "failure", "u1", "authentication"),
        client("login.failure", "failure", "u1", "authentication"),
        client("patient.read", "failure", "u1", "phi_access"),
        client("patient.read", "success", "u1", "phi_access"),
        client("settings.update", "success", "admin1", "configuration"),
        client("mfa.disable", "success", "u2", "mfa"),
        client("login.success", "success", "u2", "authentication"),
    ]);
    assert_eq!(s.post_json("/api/v1/events", &events).status, 201);
    // The repository's own: a change of each kind, a refused request and a failed login.
    let put = |path: &str, body: Value| {
        let r = s.put_json(path, &body);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    };
    put("/api/v1/roles/report-reader", json!({"permissions": ["reports:run"]}));
    put(
        "/api/v1/settings/governance",
        json!({"only_admins_create_projects": true, "local_export_disabled": false,
            "local_export_exceptions": [], "local_import_disabled": false,
            "local_import_exceptions": []}),
    );
    let writer = key(&s, &["events:write"]);
    let r = s.request_as(Some(&writer), "GET", "/api/v1/events", "", b"");
    assert_eq!(r.status, 403);
    let r = s.request(
        "POST",
        "/api/v1/auth/login",
        "application/json",
        br#"{"username": "admin", "password": "not-the-password"}"#,
    );
    assert_eq!(r.status, 401);
    // The mfa-disabled rule raises an alert for u2.
    let mut alerts = Value::Null;
    for _ in 0..400 {
        alerts = s.get("/api/v1/security/alerts?rule=mfa-disabled").json();
        if alerts["total"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(alerts["alerts"][0]["subject"], "u2", "{alerts}");
    s.wait_indexed();

    // Failed access: every failure, the applications' and the repository's own.
    let client_failures = search_all(&s, "outcome=failure");
    let own_failures = search_all(&s, "category=repository&outcome=failure");
    assert_eq!(client_failures.len(), 4);
    assert!(own_failures.iter().any(|e| e["action"] == "access.denied"));
    assert!(own_failures.iter().any(|e| e["action"] == "auth.login"));
    s.wait_indexed();
    let report = s.get("/api/v1/reports/failed-access").json();
    let seqs = |events: &[Value]| -> BTreeSet<u64> {
        events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
    };
    let got: Vec<Value> =
        report["events"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
    let mut want = seqs(&client_failures);
    want.extend(seqs(&own_failures));
    assert_eq!(seqs(&got), want, "{report}");
    assert!(got.iter().all(|e| e["outcome"] == "failure"));
    assert!(report["events"][0].get("disclosure").is_none(), "not a disclosure report");
    let brute = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["action"] == "login.failure")
        .unwrap()
        .clone();
    assert_eq!(
        brute,
        json!({"action": "login.failure", "user": "u1", "ip": "10.9.9.9",
        "events": 3, "first_occurred_at": "2026-03-02T10:00:00.000Z",
        "last_occurred_at": "2026-03-02T10:00:00.000Z"})
    );

    // Security changes: the applications' configuration and MFA changes and the repository's
    // role, governance, key and user changes; none of its reads.
    let report = s.get("/api/v1/reports/security-changes").json();
    let actions: BTreeSet<&str> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"]["action"].as_str().unwrap())
        .collect();
    for a in [
        "settings.update",
        "mfa.disable",
        "role.put",
        "settings.governance.change",
        "api_key.create",
    ] {
        assert!(actions.contains(a), "{a} in {actions:?}");
    }
    for a in actions.iter() {
        assert!(
            !a.starts_with("read.") && !a.starts_with("events.") && *a != "login.failure",
            "{a}"
        );
    }
    let csv = python_csv(&s.get("/api/v1/reports/security-changes?format=csv").text());
    assert_eq!(csv[0].len(), 31, "no columns of its own: {:?}", csv[0]);
    assert!(csv.len() > report["events"].as_array().unwrap().len(), "header plus rows");

    // User activity: what one user did, equal to the search for them.
    let report = s.get("/api/v1/reports/user-activity?user=u1").json();
    let got: Vec<Value> =
        report["events"].as_array().unwrap().iter().map(|e| e["event"].clone()).collect();
    assert_eq!(got, search_all(&s, "user=u1"));
    assert_eq!(got.len(), 5);
    let read_failures = report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["action"] == "patient.read" && g["outcome"] == "failure")
        .unwrap()["events"]
        .clone();
    assert_eq!(read_failures, 1);
    assert_eq!(report["totals"]["disclosures"], 0);

    // The alert summary: counted per rule, severity and status, and listed.
    let r = s.get("/api/v1/reports/alerts");
    assert_eq!(r.status, 200, "{}", r.text());
    let summary = r.json();
    let total = summary["alerts_total"].as_u64().unwrap();
    assert!(total >= 1);
    assert_eq!(r.header("x-report-total").unwrap(), total.to_string());
    assert!(summary["counts"]["by_rule"]["mfa-disabled"].as_u64().unwrap() >= 1);
    let severities: u64 = summary["counts"]["by_severity"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(severities, total);
    assert_eq!(summary["counts"]["by_severity"].as_object().unwrap().len(), 4);
    assert_eq!(summary["counts"]["by_status"]["open"], total, "none acknowledged yet");
    let later = s.get("/api/v1/reports/alerts?from=2999-01-01T00:00:00Z").json();
    assert_eq!(later["alerts_total"], 0);
    let csv = python_csv(&s.get("/api/v1/reports/alerts?format=csv").text());
    assert_eq!(csv.len() as u64, total + 1);
    assert_eq!(csv[0][..4], ["id", "rule", "severity", "status"]);
    s.wait_indexed();
    let runs = search_all(&s, "category=repository&action=report.run");
    assert!(runs.iter().any(|e| e["context"]["report"] == "failed-access"));
}
