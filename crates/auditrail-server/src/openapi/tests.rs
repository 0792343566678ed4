//! The document against the checked-in file, against the router (every route and every method
//! it answers), and against real answers of a running server.

use super::*;
use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Routes of `app` that are deliberately not in the document, with the reason.
const UNDOCUMENTED: [(&str, &str); 1] = [(
    "/fhir/{*rest}",
    "a catch-all that answers 404 with an OperationOutcome for resource types this server does \
     not hold, like the global fallback does for other paths (the fhir tag says so)",
)];

fn checked_in_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json")
}

fn parsed() -> Value {
    serde_json::from_str(&document()).expect("the document is JSON")
}

#[test]
fn checked_in_document_is_current() {
    let generated = document();
    let path = checked_in_path();
    if std::env::var("UPDATE_OPENAPI").as_deref() == Ok("1") {
        std::fs::write(&path, &generated).expect("docs/openapi.json is writable");
        return;
    }
    let how = "regenerate it with `UPDATE_OPENAPI=1 cargo test -p auditrail-server openapi` \
               and commit docs/openapi.json";
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}; {how}", path.display()));
    if checked_in != generated {
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(checked_in.lines().count().min(generated.lines().count()));
        panic!(
            "docs/openapi.json differs from the document the code generates (first at line {}); \
             {how}",
            line + 1
        );
    }
}

#[test]
fn document_is_openapi_3_1_with_unique_operations_and_resolvable_refs() {
    let doc = parsed();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["title"], "auditrail");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(doc["info"]["license"]["identifier"], "Apache-2.0");

    let mut ids = BTreeSet::new();
    let paths = doc["paths"].as_object().expect("paths");
    for (path, item) in paths {
        let item = item.as_object().expect("a path item");
        for (method, op) in item {
            assert!(METHODS.contains(&method.as_str()), "{method} {path}: unexpected method");
            let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path}: id"));
            assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
            assert!(op["summary"].is_string(), "{method} {path}: no summary");
            assert!(op["tags"].is_array(), "{method} {path}: no tag");
            let responses = op["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path}: no responses");
            for (status, response) in responses {
                assert!(
                    status == "204" || response["content"].is_object(),
                    "{method} {path} {status}: no content"
                );
            }
            // Every `{name}` in the path is declared as a path parameter, and nothing else is.
            let declared: BTreeSet<&str> = op["parameters"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| p["in"] == "path")
                .map(|p| p["name"].as_str().expect("a parameter name"))
                .collect();
            let in_path: BTreeSet<&str> = path
                .split('/')
                .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
                .collect();
            assert_eq!(declared, in_path, "{method} {path}: path parameters");
        }
    }

    let schemas = doc["components"]["schemas"].as_object().expect("component schemas");
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("ref {r}"));
        assert!(schemas.contains_key(name), "{r} does not resolve");
    }
}

fn collect_refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(r)) = m.get("$ref") {
                out.push(r.clone());
            }
            m.values().for_each(|v| collect_refs(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

/// Every code the server's source gives an `ApiError` is listed in `ERROR_CODES`, and every
/// listed code is used.
#[test]
fn error_codes_listed_are_the_codes_used() {
    let listed: BTreeSet<String> = crate::error::ERROR_CODES
        .lines()
        .filter_map(|l| l.strip_prefix("- `"))
        .map(|l| l.split('`').next().unwrap_or_default().to_string())
        .collect();
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut used = BTreeSet::new();
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("src is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                // This file's own examples are not codes in use.
                if !path.ends_with("openapi") {
                    dirs.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("a source file is readable");
                used.extend(codes_in(&text));
            }
        }
    }
    assert!(used.contains("internal") && used.contains("not_stored"), "the scan finds codes");
    assert_eq!(listed, used, "crate::error::ERROR_CODES must list exactly the codes in use");
}

/// The error codes written in `text`: the first string literal after each `bad_request(`,
/// `ApiError::new(`, `code: ` or `"code": `.
fn codes_in(text: &str) -> Vec<String> {
    let mut codes = Vec::new();
    for needle in ["bad_request(", "ApiError::new(", "code: \"", "\"code\": \""] {
        for (at, _) in text.match_indices(needle) {
            let rest = &text[at + needle.len()..];
            let rest =
                if needle.ends_with('"') { rest } else { &rest[rest.find('"').unwrap() + 1..] };
            let code = &rest[..rest.find('"').unwrap()];
            if !code.is_empty() && code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
                codes.push(code.to_string());
            }
        }
    }
    codes
}

#[test]
fn codes_in_finds_each_form() {
    let text = r#"bad_request("a_b", "m") ApiError::new(
        StatusCode::CONFLICT,
        "c_d", x) code: "e", json!({"code": "f_g"})"#;
    assert_eq!(codes_in(text), ["a_b", "c_d", "e", "f_g"]);
}

// ---------------------------------------------------------------------------------------------
// Against a running server

/// A server on `127.0.0.1:0` over a fresh data directory, stopped cleanly on drop.
struct TestServer {
    addr: SocketAddr,
    /// An API key with every permission a key can hold.
    token: String,
    /// A ready session (access token) for a user holding each built-in role.
    roles: std::collections::BTreeMap<&'static str, String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = crate::Config {
            data: dir.path().join("data"),
            publish_interval_ms: 20,
            ..crate::Config::default()
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("a runtime");
            rt.block_on(async move {
                let service = tokio::task::spawn_blocking(move || crate::start(config))
                    .await
                    .unwrap()
                    .expect("the service starts");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let scopes = crate::auth::roles::Permission::ALL
                    .iter()
                    .copied()
                    .filter(|p| *p != crate::auth::roles::Permission::EmergencyAccess)
                    .collect();
                let (_, token) = service
                    .state
                    .auth
                    .create_api_key(&crate::auth::Auth::system(), "tests", scopes, None, vec![])
                    .expect("a key");
                let roles = crate::auth::roles::BUILTIN_ROLES
                    .iter()
                    .map(|r| {
                        let grants = vec![crate::auth::accounts::Grant {
                            role: r.to_string(),
                            projects: None,
                        }];
                        (*r, service.state.auth.test_session(&format!("user-{r}"), grants))
                    })
                    .collect();
                addr_tx.send((listener.local_addr().unwrap(), token, roles)).unwrap();
                axum::serve(listener, crate::app(service.state.clone()))
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
                tokio::task::spawn_blocking(move || service.shutdown())
                    .await
                    .unwrap()
                    .expect("the service stops cleanly");
            });
        });
        let (addr, token, roles) = addr_rx.recv().expect("the test server starts");
        TestServer { addr, token, roles, stop: Some(stop), thread: Some(thread), _dir: dir }
    }

    fn get(&self, target: &str) -> Answer {
        self.request("GET", target, None, b"")
    }

    fn post(&self, target: &str, content_type: &str, body: &[u8]) -> Answer {
        self.request("POST", target, Some(content_type), body)
    }

    /// One HTTP/1.1 request on its own connection, with the all-scopes API key.
    fn request(
        &self,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Answer {
        self.request_as(Some(&self.token), method, target, content_type, body)
    }

    /// One request with these credentials (`None`: anonymous).
    fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Answer {
        let mut stream = TcpStream::connect(self.addr).expect("the server accepts");
        let mut head = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.addr,
            body.len(),
        );
        if let Some(token) = token {
            head.push_str(&format!("Authorization: Bearer {token}\r\n"));
        }
        if let Some(t) = content_type {
            head.push_str(&format!("Content-Type: {t}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(body).unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).expect("the server answers");
        Answer::parse(&raw)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let joined = thread.join();
            if !std::thread::panicking() {
                joined.expect("the test server stops cleanly");
            }
        }
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names lowercased.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn parse(raw: &[u8]) -> Answer {
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
        let head = std::str::from_utf8(&raw[..split]).expect("an ASCII head");
        let mut lines = head.split("\r\n");
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).expect("a status line");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut body = raw[split + 4..].to_vec();
        if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
            body = dechunk(&body);
        }
        Answer { status: status.parse().expect("a numeric status"), headers, body }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The media type without parameters.
    fn media_type(&self) -> String {
        let t = self.header("content-type").unwrap_or("");
        t.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
    }

    fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("{e}: {} does not match the schema: {}", self.status, self.text())
        })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// axum's own 405 for a method the route has no handler for (it names the allowed ones);
    /// a handler's 405 (the FHIR `not_allowed`) carries no `Allow`.
    fn unrouted_method(&self) -> bool {
        self.status == 405 && self.header("allow").is_some()
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = body.windows(2).position(|w| w == b"\r\n").expect("a chunk size line");
        let size = std::str::from_utf8(&body[..eol]).unwrap().split(';').next().unwrap();
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[eol + 2 + size + 2..];
    }
}

/// The OpenAPI spelling of an axum route path (`{*path}` is `{path}`).
fn openapi_path(route: &str) -> String {
    route.replace("{*", "{")
}

/// A concrete request path for a route path.
fn concrete(route: &str) -> String {
    route
        .replace("{id}", "probe-id")
        .replace("{name}", "probe-name")
        .replace("{*path}", "0/000")
        .replace("{*rest}", "Patient")
}

/// Checks an answer against the document: its status is documented for the operation, with
/// its media type, and a native JSON error has the `ErrorBody` (or `BulkFailure`) shape.
fn check_documented(doc: &Value, method: &str, path: &str, answer: &Answer) {
    let op = &doc["paths"][path][method];
    let response = &op["responses"][answer.status.to_string()];
    assert!(
        response.is_object(),
        "{method} {path} answered {} ({}), which the document does not list",
        answer.status,
        answer.text()
    );
    if answer.status == 204 {
        assert!(answer.body.is_empty(), "{method} {path}: 204 with a body");
        return;
    }
    let media: Vec<String> = response["content"]
        .as_object()
        .expect("a documented response has content")
        .keys()
        .map(|k| k.split(';').next().unwrap().trim().to_string())
        .collect();
    assert!(
        media.contains(&answer.media_type()),
        "{method} {path} {}: answered as {:?}, documented as {media:?}",
        answer.status,
        answer.media_type()
    );
    if answer.status >= 400 && answer.media_type() == "application/json" {
        if path == "/api/v1/events/bulk" {
            answer.json::<BulkFailure>();
        } else {
            answer.json::<ErrorBody>();
        }
    }
}

#[test]
fn every_route_is_documented_with_exactly_the_methods_it_answers() {
    let doc = parsed();
    let documented: BTreeSet<String> =
        doc["paths"].as_object().expect("paths").keys().cloned().collect();
    let routes: Vec<&str> = crate::routes().into_iter().map(|(path, _)| path).collect();
    for (path, reason) in UNDOCUMENTED {
        assert!(
            routes.contains(&path),
            "{path} is listed as undocumented ({reason}) but not routed"
        );
    }
    let routed: BTreeSet<String> = routes
        .iter()
        .filter(|r| !UNDOCUMENTED.iter().any(|(u, _)| u == *r))
        .map(|r| openapi_path(r))
        .collect();
    assert_eq!(routed, documented, "the routes of app() and the paths of the document differ");

    let server = TestServer::start();
    for route in &routes {
        let path = openapi_path(route);
        let undocumented = UNDOCUMENTED.iter().any(|(u, _)| u == route);
        for method in METHODS {
            let answer = server.request(&method.to_ascii_uppercase(), &concrete(route), None, b"");
            let answered = !answer.unrouted_method();
            let in_doc = doc["paths"][&path][method].is_object();
            if undocumented {
                continue;
            }
            assert_eq!(
                answered,
                in_doc,
                "{method} {route}: the router {} it but the document {} it",
                if answered { "answers" } else { "does not answer" },
                if in_doc { "lists" } else { "does not list" },
            );
            if answered {
                check_documented(&doc, method, &path, &answer);
            }
        }
    }
}

#[test]
fn documented_query_parameters_are_accepted() {
    let doc = parsed();
    let server = TestServer::start();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().expect("paths") {
        let Some(params) = item["get"]["parameters"].as_array() else { continue };
        for p in params.iter().filter(|p| p["in"] == "query") {
            let name = p["name"].as_str().expect("a parameter name");
            let answer = server.get(&format!("{}?{name}=probe", concrete(path)));
            let text = answer.text();
            let unknown = if path.starts_with("/fhir") {
                text.contains("is not a supported AuditEvent search parameter")
            } else {
                answer.status == 400 && answer.json::<ErrorBody>().error.code == "unknown_parameter"
            };
            assert!(!unknown, "GET {path}: the documented parameter {name} is refused: {text}");
            checked += 1;
        }
    }
    // 33 native parameters and the reports' 17, and the FHIR search's 27 (its 26 declared
    // ones and `_cursor`).
    assert_eq!(checked, 33 + 17 + 27, "query parameters checked");
    // And an undocumented one is refused, so the check above can fail.
    let answer = server.get("/api/v1/events?nosuch=1");
    assert_eq!(answer.json::<ErrorBody>().error.code, "unknown_parameter");
    let answer = server.get("/fhir/AuditEvent?nosuch=1");
    assert!(answer.text().contains("is not a supported AuditEvent search parameter"));
}

#[test]
fn answers_match_the_documented_schemas() {
    let doc = parsed();
    let server = TestServer::start();
    let event =
        |id: &str| serde_json::json!({"id": id, "action": "patient.read", "outcome": "success"});

    let body = event("openapi-1").to_string();
    let answer = server.post("/api/v1/events", "application/json", body.as_bytes());
    check_documented(&doc, "post", "/api/v1/events", &answer);
    assert_eq!(answer.status, 201, "{}", answer.text());
    let receipt: Receipt = answer.json();
    assert!(!receipt.duplicate);

    let answer = server.post("/api/v1/events", "application/json", body.as_bytes());
    check_documented(&doc, "post", "/api/v1/events", &answer);
    assert!(answer.json::<Receipt>().duplicate);

    let batch = serde_json::json!([event("openapi-2"), event("openapi-3")]).to_string();
    let answer = server.post("/api/v1/events", "application/json", batch.as_bytes());
    check_documented(&doc, "post", "/api/v1/events", &answer);
    assert_eq!(answer.json::<Receipts>().receipts.len(), 2);

    let answer = server.post("/api/v1/events", "application/json", br#"[{"action": "x"}]"#);
    check_documented(&doc, "post", "/api/v1/events", &answer);
    assert!(!answer.json::<ErrorBody>().error.details.is_empty());

    let ndjson = format!("{}\n{{\"outcome\": \"maybe\"}}\nnot json\n", event("openapi-4"));
    let answer = server.post("/api/v1/events/bulk", "application/x-ndjson", ndjson.as_bytes());
    check_documented(&doc, "post", "/api/v1/events/bulk", &answer);
    let bulk: BulkResult = answer.json();
    assert!(bulk.errors);
    assert!(matches!(
        bulk.items.as_slice(),
        [BulkItem::Stored(_), BulkItem::Rejected(_), BulkItem::Rejected(_)]
    ));

    // The index and the checkpoint follow the log within milliseconds; wait for both, boundedly.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let answer = loop {
        let answer = server.get("/api/v1/events/openapi-4?proof=inclusion");
        check_documented(&doc, "get", "/api/v1/events/{id}", &answer);
        if answer.status == 200 || std::time::Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let found: EventAnswer = answer.json();
    let proof = found.proof.expect("the proof asked for");
    assert_eq!(found.event["id"], "openapi-4");

    let answer = server.get(&format!("/api/v1/log/proof/inclusion?seq={}", proof.leaf_index));
    check_documented(&doc, "get", "/api/v1/log/proof/inclusion", &answer);
    answer.json::<InclusionProof>();
    let answer = server.get("/api/v1/log/proof/consistency?from=1");
    check_documented(&doc, "get", "/api/v1/log/proof/consistency", &answer);
    answer.json::<ConsistencyProof>();

    let answer = server.get("/api/v1/events?action=patient.read&limit=2");
    check_documented(&doc, "get", "/api/v1/events", &answer);
    let page: SearchPage = answer.json();
    assert_eq!(page.events.len(), 2);
    assert!(page.next_cursor.is_some());

    let answer = server.get("/api/v1/events/stats?group_by=action");
    check_documented(&doc, "get", "/api/v1/events/stats", &answer);
    let stats: Stats = answer.json();
    // The four events sent, and the repository's own record of the key and of the reads.
    let reads = stats.groups.iter().find(|g| g.key == "patient.read").expect("patient.read");
    assert_eq!(reads.count, 4);
    assert!(stats.total > 4, "repository events are counted too");

    let answer = server.get("/api/v1/security/status");
    check_documented(&doc, "get", "/api/v1/security/status", &answer);
    let status: SecurityStatus = answer.json();
    assert!(!status.backup.enabled);
    assert!(status.forwarding.forwarders.is_empty(), "forwarding is off by default");
    assert_eq!(status.retention.default_days, 2557);

    let answer = server.get("/api/v1/openapi.json");
    check_documented(&doc, "get", "/api/v1/openapi.json", &answer);
    assert_eq!(answer.text(), document(), "the served document is the generated one");

    let answer = server.get("/no/such/endpoint");
    let fallback: ErrorBody = answer.json();
    assert_eq!(fallback.error.code, "not_found");
    assert!(fallback.error.message.contains("/api/v1/openapi.json"));
}

// ---------------------------------------------------------------------------------------------
// The authorisation matrix

/// Who may call each documented operation: `public` (anyone, without credentials), or the
/// built-in roles allowed (A admin, S security_officer, P privacy_officer, U auditor, V viewer,
/// I ingest). Declared here, apart from `auth::rules`, so that a change to either shows.
const MATRIX: &[(&str, &str, &str)] = &[
    ("get", "/healthz", "public"),
    ("get", "/readyz", "public"),
    ("get", "/api/v1/openapi.json", "public"),
    ("get", "/fhir/metadata", "public"),
    ("get", "/log/checkpoint", "public"),
    ("get", "/log/tile/{path}", "public"),
    ("get", "/api/v1/log/proof/inclusion", "public"),
    ("get", "/api/v1/log/proof/consistency", "public"),
    ("get", "/metrics", "AS"),
    ("post", "/api/v1/events", "AI"),
    ("post", "/api/v1/events/bulk", "AI"),
    ("post", "/fhir", "AI"),
    ("post", "/fhir/AuditEvent", "AI"),
    ("get", "/api/v1/events", "ASPUV"),
    ("get", "/api/v1/events/stats", "ASPUV"),
    ("get", "/api/v1/events/{id}", "ASPUV"),
    ("get", "/api/v1/events/export", "ASP"),
    ("post", "/api/v1/events/export", "ASP"),
    ("get", "/api/v1/events/evidence", "ASP"),
    ("get", "/api/v1/reports/patient-access", "ASPU"),
    ("get", "/api/v1/reports/user-activity", "ASPU"),
    ("get", "/api/v1/reports/failed-access", "ASPU"),
    ("get", "/api/v1/reports/security-changes", "ASPU"),
    ("get", "/api/v1/reports/alerts", "ASPU"),
    ("get", "/fhir/AuditEvent", "ASPUV"),
    ("get", "/fhir/AuditEvent/{id}", "ASPUV"),
    ("put", "/fhir/AuditEvent", "public"),
    ("patch", "/fhir/AuditEvent", "public"),
    ("delete", "/fhir/AuditEvent", "public"),
    ("post", "/fhir/AuditEvent/{id}", "public"),
    ("put", "/fhir/AuditEvent/{id}", "public"),
    ("patch", "/fhir/AuditEvent/{id}", "public"),
    ("delete", "/fhir/AuditEvent/{id}", "public"),
    ("get", "/api/v1/security/status", "AS"),
    ("get", "/api/v1/security/audit-log/integrity", "ASPU"),
    ("post", "/api/v1/security/audit-log/integrity", "ASPU"),
    ("get", "/api/v1/security/audit-log/integrity/jobs/{id}", "ASPU"),
    ("get", "/api/v1/security/alerts", "AS"),
    ("get", "/api/v1/security/alerts/{id}", "AS"),
    ("post", "/api/v1/security/alerts/{id}/acknowledge", "AS"),
    ("post", "/api/v1/security/alerts/{id}/resolve", "AS"),
    ("get", "/api/v1/security/alert-rules", "AS"),
    ("put", "/api/v1/security/alert-rules/{name}", "AS"),
    ("delete", "/api/v1/security/alert-rules/{name}", "AS"),
    ("get", "/api/v1/retention", "ASPU"),
    ("post", "/api/v1/retention/purge", "AP"),
    ("post", "/api/v1/retention/holds", "AP"),
    ("delete", "/api/v1/retention/holds/{id}", "AP"),
    ("post", "/api/v1/auth/login", "public"),
    ("post", "/api/v1/auth/refresh", "public"),
    ("get", "/api/v1/auth/me", "ASPUVI"),
    ("post", "/api/v1/auth/password", "ASPUVI"),
    ("post", "/api/v1/auth/mfa/totp", "ASPUVI"),
    ("delete", "/api/v1/auth/mfa/totp", "ASPUVI"),
    ("post", "/api/v1/auth/mfa/totp/confirm", "ASPUVI"),
    ("post", "/api/v1/auth/break-glass", "AV"),
    ("get", "/api/v1/users", "A"),
    ("post", "/api/v1/users", "A"),
    ("get", "/api/v1/users/{id}", "A"),
    ("patch", "/api/v1/users/{id}", "A"),
    ("post", "/api/v1/users/{id}/password-reset", "A"),
    ("post", "/api/v1/users/{id}/mfa-reset", "A"),
    ("post", "/api/v1/users/{id}/unlock", "A"),
    ("get", "/api/v1/sessions", "A"),
    ("delete", "/api/v1/sessions/{id}", "A"),
    ("get", "/api/v1/roles", "A"),
    ("put", "/api/v1/roles/{name}", "A"),
    ("delete", "/api/v1/roles/{name}", "A"),
    ("get", "/api/v1/api-keys", "A"),
    ("post", "/api/v1/api-keys", "A"),
    ("delete", "/api/v1/api-keys/{id}", "A"),
    ("get", "/api/v1/projects", "ASPUVI"),
    ("post", "/api/v1/projects", "A"),
    ("get", "/api/v1/settings/governance", "AS"),
    ("put", "/api/v1/settings/governance", "A"),
    // Last: it ends the session it is called with.
    ("post", "/api/v1/auth/logout", "ASPUVI"),
];

#[test]
fn authorisation_matrix_over_every_documented_operation() {
    let doc = parsed();
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("a path item").keys() {
            documented.insert((method.clone(), path.clone()));
        }
    }
    let declared: BTreeSet<(String, String)> =
        MATRIX.iter().map(|(m, p, _)| (m.to_string(), p.to_string())).collect();
    assert_eq!(declared.len(), MATRIX.len(), "an operation is declared twice");
    let undeclared: Vec<_> = documented.difference(&declared).collect();
    assert!(undeclared.is_empty(), "operations without a declared rule: {undeclared:?}");
    let gone: Vec<_> = declared.difference(&documented).collect();
    assert!(gone.is_empty(), "declared operations that do not exist: {gone:?}");

    let server = TestServer::start();
    let letter = |role: &str| match role {
        "admin" => 'A',
        "security_officer" => 'S',
        "privacy_officer" => 'P',
        "auditor" => 'U',
        "viewer" => 'V',
        "ingest" => 'I',
        other => panic!("no letter for {other}"),
    };
    let mut checked = 0;
    for (method, path, allowed) in MATRIX {
        let target = concrete(path).replace("{path}", "0/000");
        let upper = method.to_ascii_uppercase();
        let anonymous = server.request_as(None, &upper, &target, None, b"");
        let public = *allowed == "public";
        assert_eq!(
            anonymous.status != 401 && anonymous.status != 403,
            public,
            "{method} {path} anonymously answered {}: {}",
            anonymous.status,
            anonymous.text()
        );
        if !public {
            assert_eq!(anonymous.header("www-authenticate"), Some("Bearer"), "{method} {path}");
        }
        for (role, token) in &server.roles {
            let answer = server.request_as(Some(token), &upper, &target, None, b"");
            let may = public || allowed.contains(letter(role));
            let denied = answer.status == 403 || answer.status == 401;
            assert_eq!(
                !denied,
                may,
                "{method} {path} as {role} answered {}: {}",
                answer.status,
                answer.text()
            );
            checked += 1;
        }
    }
    assert_eq!(checked, MATRIX.len() * crate::auth::roles::BUILTIN_ROLES.len());
}
