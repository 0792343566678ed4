//! `auditrail serve` with forwarding to Elasticsearch configured: events posted over HTTP reach
//! a `_bulk` endpoint (a minimal one written here, one request per connection), the lag shows
//! in /metrics and the security status, and after a restart only new events are sent.

use crate::http::Server;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Cluster {
    docs: HashMap<String, Value>,
    /// `_id`s in the order they were written (a resend appears twice).
    writes: Vec<String>,
    templates: Vec<String>,
}

struct FakeEs {
    addr: String,
    cluster: Arc<Mutex<Cluster>>,
    stop: Arc<AtomicBool>,
}

impl FakeEs {
    fn start() -> FakeEs {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cluster = Arc::new(Mutex::new(Cluster::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (cluster.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    answer(stream, &c);
                }
            }
        });
        FakeEs { addr, cluster, stop }
    }
}

impl Drop for FakeEs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(&self.addr);
    }
}

fn answer(stream: TcpStream, cluster: &Mutex<Cluster>) {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return;
    }
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        if line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap(), parts.next().unwrap());
    let mut c = cluster.lock().unwrap();
    let reply = match (method, path) {
        ("PUT", p) if p.starts_with("/_index_template/") => {
            c.templates.push(p.to_string());
            json!({"acknowledged": true})
        }
        ("POST", "/_bulk") => {
            let text = String::from_utf8(body).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            let mut items = Vec::new();
            for pair in lines.chunks(2) {
                let action: Value = serde_json::from_str(pair[0]).unwrap();
                let id = action["index"]["_id"].as_str().unwrap().to_string();
                c.docs.insert(id.clone(), serde_json::from_str(pair[1]).unwrap());
                c.writes.push(id.clone());
                items.push(json!({"index": {"_id": id, "status": 201}}));
            }
            json!({"took": 1, "errors": false, "items": items})
        }
        _ => json!({"error": "unexpected request"}),
    };
    let body = reply.to_string();
    let mut stream = reader.into_inner();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(20), "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn events(range: std::ops::Range<usize>) -> Value {
    range
        .map(|i| {
            json!({"id": format!("fw-{i}"), "action": "patient.read", "outcome": "success",
                        "actor": {"user_id": "u1", "ip": "192.0.2.7"}, "patient": {"id": "MRN1"}})
        })
        .collect()
}

#[test]
fn serve_forwards_to_elasticsearch_and_resumes_after_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let es = FakeEs::start();
    let url = format!("http://{}", es.addr);
    let env = [
        ("AUDITRAIL_FORWARD_ELASTICSEARCH_URL", url.as_str()),
        ("AUDITRAIL_FORWARD_ELASTICSEARCH_INDEX", "audit-e2e"),
        ("AUDITRAIL_FORWARD_ELASTICSEARCH_POLL_INTERVAL_MS", "10"),
    ];
    let server = Server::start_with(&data, &env);
    // The repository's own events are forwarded too (a SIEM wants who read the trail); the
    // checks below count the test's events, `fw-…`.
    let b = server.base;
    let sent = |es: &FakeEs| {
        es.cluster.lock().unwrap().docs.keys().filter(|k| k.starts_with("fw-")).count()
    };
    let r = server.post_json("/api/v1/events", &events(0..30));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_until("30 events in Elasticsearch", || sent(&es) == 30);

    let status = server.get("/api/v1/security/status").json();
    let fw = &status["forwarding"]["forwarders"][0];
    assert_eq!(
        (fw["name"].as_str(), fw["destination"].as_str()),
        (Some("elasticsearch"), Some(url.as_str()))
    );
    wait_until("the status catches up", || {
        server.get("/api/v1/security/status").json()["forwarding"]["forwarders"][0]["next_seq"]
            .as_u64()
            .unwrap()
            >= 30 + b
    });
    let metrics = server.get("/metrics").text();
    let sent_total: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("auditrail_forward_sent_total{forwarder=\"elasticsearch\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(sent_total >= 30 + b, "{metrics}");
    {
        let c = es.cluster.lock().unwrap();
        assert_eq!(c.templates, ["/_index_template/auditrail-events"]);
        let doc = &c.docs["fw-7"];
        assert_eq!(
            (doc["seq"].as_u64(), doc["actor"]["ip"].as_str()),
            (Some(7 + b), Some("192.0.2.7"))
        );
    }
    assert!(server.stop().success());
    assert!(data.join("forward/elasticsearch.cursor").exists());

    // After a restart, only the new events are sent.
    let server = Server::start_with(&data, &env);
    let r = server.post_json("/api/v1/events", &events(30..40));
    assert_eq!(r.status, 201, "{}", r.text());
    wait_until("40 events in Elasticsearch", || sent(&es) == 40);
    let c = es.cluster.lock().unwrap();
    let expected: Vec<String> = (0..40).map(|i| format!("fw-{i}")).collect();
    let written: Vec<String> = c.writes.iter().filter(|w| w.starts_with("fw-")).cloned().collect();
    assert_eq!(written, expected, "each event written once, in log order");
    let mut unique = c.writes.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), c.writes.len(), "nothing written twice across the restart");
    drop(c);
    assert!(server.stop().success());
}
