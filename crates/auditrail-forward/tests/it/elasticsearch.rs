//! The Elasticsearch forwarder against a server written here that keeps the `_bulk` contract:
//! NDJSON `index` actions in, `{"errors", "items": [{"index": {"_id", "status", "error"?}}]}`
//! out, documents stored by `_id`. The test can make it fail in every way a cluster does.

use crate::{append, open_store, wait_for};
use auditrail_forward::{ElasticsearchConfig, ForwardConfig, Forwarding, Secret};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use serde_json::{Value, json};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the fake cluster holds and how it is told to misbehave.
#[derive(Default)]
struct Cluster {
    /// Stored documents by `_id`.
    docs: HashMap<String, Value>,
    /// How often each `_id` was written (a redelivery writes it again).
    writes: HashMap<String, u32>,
    templates: HashMap<String, Value>,
    /// Mappings put on an existing index (`PUT <index>/_mapping`), by index.
    mappings: HashMap<String, Value>,
    /// Every request answers 503.
    unavailable: bool,
    /// Per `_id`: how many more times its item answers 429.
    throttle: HashMap<String, u32>,
    /// `_id`s whose documents fail the mapping (400, for good).
    unmappable: HashSet<String>,
    /// The next `_bulk` is applied but answered 502, as when a proxy loses the answer.
    lose_next_answer: bool,
    /// Every Authorization header seen.
    authorizations: Vec<String>,
    bulk_requests: u32,
    /// A `_bulk` of more actions than this answers 413 (0: no limit).
    actions_max: usize,
}

type Shared = Arc<Mutex<Cluster>>;

async fn put_template(
    State(c): State<Shared>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut c = c.lock().unwrap();
    c.authorizations.push(auth(&headers));
    if c.unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable").into_response();
    }
    let template: Value = serde_json::from_slice(&body).unwrap();
    c.templates.insert(name, template);
    axum::Json(json!({"acknowledged": true})).into_response()
}

async fn put_mapping(
    State(c): State<Shared>,
    Path(index): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut c = c.lock().unwrap();
    c.authorizations.push(auth(&headers));
    if c.unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable").into_response();
    }
    c.mappings.insert(index, serde_json::from_slice(&body).unwrap());
    axum::Json(json!({"acknowledged": true})).into_response()
}

fn auth(headers: &HeaderMap) -> String {
    headers.get("authorization").map(|v| v.to_str().unwrap().to_string()).unwrap_or_default()
}

async fn bulk(State(c): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let mut c = c.lock().unwrap();
    c.authorizations.push(auth(&headers));
    c.bulk_requests += 1;
    if c.unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "cluster unavailable").into_response();
    }
    assert_eq!(headers["content-type"], "application/x-ndjson");
    let text = std::str::from_utf8(&body).unwrap();
    assert!(text.ends_with('\n'), "a _bulk body ends with a newline");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.len().is_multiple_of(2), "action and source lines come in pairs");
    if c.actions_max > 0 && lines.len() / 2 > c.actions_max {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request too large").into_response();
    }
    let mut items = Vec::new();
    let mut errors = false;
    for pair in lines.chunks(2) {
        let action: Value = serde_json::from_str(pair[0]).unwrap();
        let id = action["index"]["_id"].as_str().unwrap().to_string();
        assert_eq!(action["index"]["_index"], "audit-test");
        let doc: Value = serde_json::from_str(pair[1]).unwrap();
        assert_eq!(doc["id"], id.as_str(), "_id is the event's id");
        let throttled = c.throttle.get_mut(&id).filter(|n| **n > 0);
        let (status, error) = if let Some(n) = throttled {
            *n -= 1;
            (429, Some(json!({"type": "es_rejected_execution_exception", "reason": "queue full"})))
        } else if c.unmappable.contains(&id) {
            let reason = format!("failed to parse field [occurred_at] of document with id '{id}'");
            (400, Some(json!({"type": "document_parsing_exception", "reason": reason})))
        } else {
            let created = c.docs.insert(id.clone(), doc).is_none();
            *c.writes.entry(id.clone()).or_default() += 1;
            (if created { 201 } else { 200 }, None)
        };
        errors |= error.is_some();
        let mut item = json!({"_index": "audit-test", "_id": id, "status": status});
        if let Some(e) = error {
            item["error"] = e;
        }
        items.push(json!({"index": item}));
    }
    if std::mem::take(&mut c.lose_next_answer) {
        return (StatusCode::BAD_GATEWAY, "upstream connection reset").into_response();
    }
    axum::Json(json!({"took": 1, "errors": errors, "items": items})).into_response()
}

/// The fake cluster on a loopback port; `stop` closes the port (connection refused) and
/// `start` opens it again with the same state.
struct FakeEs {
    cluster: Shared,
    port: u16,
    server: Option<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)>,
}

impl FakeEs {
    async fn new() -> FakeEs {
        let mut es = FakeEs { cluster: Shared::default(), port: 0, server: None };
        es.start().await;
        es
    }

    async fn start(&mut self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await.unwrap();
        self.port = listener.local_addr().unwrap().port();
        let app = Router::new()
            .route("/_bulk", post(bulk))
            .route("/_index_template/{name}", put(put_template))
            .route("/{index}/_mapping", put(put_mapping))
            .with_state(self.cluster.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        self.server = Some((tx, task));
    }

    async fn stop(&mut self) {
        let (tx, task) = self.server.take().unwrap();
        let _ = tx.send(());
        tokio::time::timeout(Duration::from_secs(10), task).await.unwrap().unwrap();
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn with<T>(&self, f: impl FnOnce(&mut Cluster) -> T) -> T {
        f(&mut self.cluster.lock().unwrap())
    }
}

fn config(url: &str) -> ForwardConfig {
    ForwardConfig {
        elasticsearch: ElasticsearchConfig {
            url: url.to_string(),
            index: "audit-test".into(),
            template: "audit-test-template".into(),
            api_key: Secret("aWQ6c2VjcmV0".into()),
            batch_events_max: 64,
            request_timeout_ms: 5_000,
            backoff_initial_ms: 10,
            backoff_max_ms: 100,
            poll_interval_ms: 10,
            ..ElasticsearchConfig::default()
        },
        ..ForwardConfig::default()
    }
}

/// Every document the cluster holds is the stored event of the same id, byte for byte.
fn check_docs(es: &FakeEs, store: &auditrail_store::Store, expected_ids: &HashSet<String>) {
    let stored = store.read_events(0, store.stages().sequenced).unwrap();
    let by_id: HashMap<String, Value> = stored
        .iter()
        .map(|(_, bytes)| {
            let v: Value = serde_json::from_slice(bytes).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    es.with(|c| {
        let ids: HashSet<String> = c.docs.keys().cloned().collect();
        let missing: Vec<_> = expected_ids.difference(&ids).collect();
        let extra: Vec<_> = ids.difference(expected_ids).collect();
        assert!(missing.is_empty() && extra.is_empty(), "missing {missing:?}, extra {extra:?}");
        for (id, doc) in &c.docs {
            assert_eq!(doc, &by_id[id], "document {id} differs from the stored event");
        }
    });
}

fn ids(range: std::ops::Range<usize>, except: &[usize]) -> HashSet<String> {
    range.filter(|i| !except.contains(i)).map(|i| format!("e-{i}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_partial_failures_outages_redelivery_and_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path();
    let store = open_store(data);
    let mut es = FakeEs::new().await;
    let unmappable = [13, 77, 250];
    es.with(|c| {
        c.unmappable = unmappable.iter().map(|i| format!("e-{i}")).collect();
        c.throttle = HashMap::from([("e-5".into(), 2), ("e-100".into(), 1), ("e-299".into(), 3)]);
    });
    append(&store, 0..150);
    append(&store, 150..300);
    let runtime = tokio::runtime::Handle::current();
    let forwarding = Forwarding::start(&config(&es.url()), data, store.clone(), &runtime).unwrap();

    // Partial failures: 429 items are retried until stored; 400 items are reported and skipped.
    let s = wait_for(&forwarding, Duration::from_secs(20), "first 300 forwarded", |s| {
        s.next_seq == 300
    })
    .await;
    assert_eq!((s.lag_events, s.lag_seconds, s.failed_total, s.sent_total), (0, 0.0, 3, 297));
    assert!(s.retries_total >= 3, "{s:#?}");
    let refused: Vec<(u64, &str, u16)> =
        s.recent_failures.iter().map(|f| (f.seq, f.id.as_str(), f.status)).collect();
    assert_eq!(refused, [(13, "e-13", 400), (77, "e-77", 400), (250, "e-250", 400)]);
    assert!(s.recent_failures[0].reason.contains("document_parsing_exception"), "{s:#?}");
    check_docs(&es, &store, &ids(0..300, &unmappable));
    es.with(|c| {
        assert_eq!((c.writes["e-5"], c.writes["e-299"]), (1, 1));
        let template = &c.templates["audit-test-template"];
        assert_eq!(template["index_patterns"], json!(["audit-test"]));
        let mapping = &template["template"]["mappings"];
        assert_eq!(mapping["dynamic"], "strict");
        assert_eq!(mapping["properties"]["seq"]["type"], "long");
        assert_eq!(mapping["properties"]["patient"]["properties"]["id"]["type"], "keyword");
        // An index made under mapping version 1 gets the fields added since.
        let added = &c.mappings["audit-test"]["properties"]["redactions"]["properties"];
        assert_eq!(added["rule"]["type"], "keyword");
        assert!(
            c.authorizations.iter().all(|a| a == "ApiKey aWQ6c2VjcmV0"),
            "{:?}",
            c.authorizations
        );
    });

    // An outage: first 503 for every request, then connection refused, then recovery.
    es.with(|c| c.unavailable = true);
    let retries = s.retries_total;
    append(&store, 300..400);
    let s = wait_for(&forwarding, Duration::from_secs(20), "503s counted", |s| {
        s.retries_total >= retries + 3 && s.state == "retrying"
    })
    .await;
    assert_eq!((s.next_seq, s.lag_events), (300, 100));
    assert!(s.lag_seconds > 0.0, "{s:#?}");
    assert!(s.last_error.as_deref().unwrap().contains("HTTP 503"), "{s:#?}");
    let mut metrics = String::new();
    forwarding.prometheus(&mut metrics);
    assert!(
        metrics.contains("auditrail_forward_lag_events{forwarder=\"elasticsearch\"} 100\n"),
        "{metrics}"
    );
    assert!(metrics.contains("auditrail_forward_up{forwarder=\"elasticsearch\"} 0\n"), "{metrics}");
    es.stop().await;
    let retries = s.retries_total;
    let s = wait_for(&forwarding, Duration::from_secs(20), "refused connections counted", |s| {
        s.retries_total >= retries + 3 && !s.last_error.as_deref().unwrap().contains("503")
    })
    .await;
    assert_eq!(s.next_seq, 300, "{s:#?}");
    // Events appended during the outage count in the lag while the forwarder retries.
    append(&store, 400..410);
    wait_for(&forwarding, Duration::from_secs(20), "the lag grows during the outage", |s| {
        s.lag_events == 110
    })
    .await;
    es.with(|c| c.unavailable = false);
    es.start().await;
    let s = wait_for(&forwarding, Duration::from_secs(20), "caught up after the outage", |s| {
        s.next_seq == 410
    })
    .await;
    assert_eq!((s.state.as_str(), s.lag_events), ("ok", 0));
    check_docs(&es, &store, &ids(0..410, &unmappable));

    // The answer to an applied _bulk is lost: the batch is sent again, and each event still
    // ends up stored once under its id.
    es.with(|c| c.lose_next_answer = true);
    append(&store, 410..450);
    wait_for(&forwarding, Duration::from_secs(20), "caught up after a lost answer", |s| {
        s.next_seq == 450
    })
    .await;
    check_docs(&es, &store, &ids(0..450, &unmappable));
    es.with(|c| assert!((410..450).all(|i| c.writes[&format!("e-{i}")] == 2)));

    // Restart: the cursor on disk says where to resume; nothing delivered is sent again.
    forwarding.stop(Duration::from_secs(5)).await;
    let cursor = std::fs::read(data.join("forward/elasticsearch.cursor")).unwrap();
    assert_eq!(auditrail_forward::cursor::decode(&cursor), Ok(450));
    let writes_before = es.with(|c| c.writes.clone());
    append(&store, 450..500);
    let forwarding = Forwarding::start(&config(&es.url()), data, store.clone(), &runtime).unwrap();
    let s = wait_for(&forwarding, Duration::from_secs(20), "caught up after restart", |s| {
        s.next_seq == 500
    })
    .await;
    assert_eq!((s.sent_total, s.failed_total), (50, 0));
    check_docs(&es, &store, &ids(0..500, &unmappable));
    es.with(|c| {
        for (id, n) in &writes_before {
            assert_eq!(c.writes[id], *n, "{id} was sent again after the restart");
        }
    });
    forwarding.stop(Duration::from_secs(5)).await;
    es.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_a_template_outage_at_start_and_413_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_store(tmp.path());
    let es = FakeEs::new().await;
    es.with(|c| {
        c.unavailable = true;
        c.actions_max = 3;
    });
    append(&store, 0..10);
    let mut config = config(&es.url());
    config.elasticsearch.api_key = Secret::default();
    config.elasticsearch.username = "forwarder".into();
    config.elasticsearch.password = Secret("correct horse battery".into());
    let runtime = tokio::runtime::Handle::current();
    let forwarding = Forwarding::start(&config, tmp.path(), store.clone(), &runtime).unwrap();
    let s = wait_for(&forwarding, Duration::from_secs(20), "template failures counted", |s| {
        s.retries_total >= 2
    })
    .await;
    assert!(s.last_error.as_deref().unwrap().contains("index template"), "{s:#?}");
    assert_eq!(es.with(|c| c.bulk_requests), 0, "no _bulk before the template is in place");
    es.with(|c| c.unavailable = false);
    // 10 events in one batch, answered 413 until the halves are at most 3 actions long.
    let s = wait_for(&forwarding, Duration::from_secs(20), "forwarded", |s| s.next_seq == 10).await;
    assert_eq!((s.sent_total, s.failed_total), (10, 0));
    check_docs(&es, &store, &ids(0..10, &[]));
    assert!(es.with(|c| c.writes.values().all(|&n| n == 1)));
    es.with(|c| {
        // base64("forwarder:correct horse battery")
        let expected = "Basic Zm9yd2FyZGVyOmNvcnJlY3QgaG9yc2UgYmF0dGVyeQ==";
        assert!(c.authorizations.iter().all(|a| a == expected), "{:?}", c.authorizations);
    });
    forwarding.stop(Duration::from_secs(5)).await;
}

/// TLS in front of the fake cluster: accepts with the test CA's server certificate and relays
/// the bytes to the plain listener.
async fn tls_proxy(dir: &std::path::Path, backend_port: u16) -> u16 {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.pem"))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A handshake the client abandons (an untrusted certificate) just ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut backend =
                    tokio::net::TcpStream::connect(("127.0.0.1", backend_port)).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_custom_ca_and_certificates_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    crate::syslog::certificates(&certs);
    let store = open_store(&tmp.path().join("data"));
    append(&store, 0..20);
    let es = FakeEs::new().await;
    let port = tls_proxy(&certs, es.port).await;
    let runtime = tokio::runtime::Handle::current();

    // Without the CA the cluster's certificate is not trusted: nothing is sent.
    let mut untrusted = config(&format!("https://localhost:{port}"));
    let empty_roots = tmp.path().join("other-ca.pem");
    let other = rcgen::CertificateParams::new(vec!["elsewhere".to_string()])
        .unwrap()
        .self_signed(&rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(&empty_roots, other.pem()).unwrap();
    untrusted.elasticsearch.ca_file = Some(empty_roots);
    let data = tmp.path().join("data");
    let forwarding = Forwarding::start(&untrusted, &data, store.clone(), &runtime).unwrap();
    let s = wait_for(&forwarding, Duration::from_secs(20), "the certificate refused", |s| {
        s.retries_total >= 2
    })
    .await;
    let error = s.last_error.unwrap();
    assert!(error.contains("certificate") || error.contains("UnknownIssuer"), "{error}");
    assert_eq!((s.next_seq, es.with(|c| c.docs.len())), (0, 0));
    forwarding.stop(Duration::from_secs(5)).await;

    let mut trusted = config(&format!("https://localhost:{port}"));
    trusted.elasticsearch.ca_file = Some(certs.join("ca.pem"));
    let forwarding = Forwarding::start(&trusted, &data, store.clone(), &runtime).unwrap();
    wait_for(&forwarding, Duration::from_secs(20), "sent over TLS", |s| s.next_seq == 20).await;
    check_docs(&es, &store, &ids(0..20, &[]));
    forwarding.stop(Duration::from_secs(5)).await;
}
