//! Alerting end to end: attack scenarios generated against a real server, with the clock under
//! the test's control (rules run on the events' own `occurred_at`), raise exactly the expected
//! alerts while normal traffic raises none; a real local HTTP receiver takes the webhooks,
//! refusing the first deliveries so they are retried, and every signature is checked with
//! openssl; the lifecycle, deduplication, the log's record and a restart.

use crate::http::Server;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::sync::{Arc, Mutex};

const ALERTS_ON: &[(&str, &str)] = &[("AUDITRAIL_ALERTS_ENABLED", "true")];
const SECRET: &str = "a-webhook-secret-for-tests";
/// Monday 2026-11-30 00:00 UTC: the tests' business week starts here.
const MONDAY: i64 = 1_795_996_800_000;
const HOUR: i64 = 3_600_000;
const MINUTE: i64 = 60_000;

/// One request a receiver took: headers (lowercase names), body, the status it answered.
type Received = (Vec<(String, String)>, Vec<u8>, u16);

/// A webhook receiver: answers 500 to the first `fail_first` requests, then 204; keeps every
/// request's headers and body.
struct Receiver {
    port: u16,
    requests: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(fail_first: usize) -> Receiver {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests: Arc<Mutex<Vec<_>>> = Arc::default();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                let mut headers = Vec::new();
                loop {
                    let mut h = String::new();
                    reader.read_line(&mut h).unwrap();
                    let h = h.trim_end();
                    if h.is_empty() {
                        break;
                    }
                    let (k, v) = h.split_once(':').unwrap();
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .map_or(0, |(_, v)| v.parse().unwrap());
                let mut body = vec![0u8; len];
                reader.read_exact(&mut body).unwrap();
                let mut all = seen.lock().unwrap();
                let status = if all.len() < fail_first { 500 } else { 204 };
                all.push((headers, body, status));
                drop(all);
                let reason = if status == 500 { "Internal Server Error" } else { "No Content" };
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            }
        });
        Receiver { port, requests }
    }
}

/// The signature openssl computes for `timestamp.body`.
fn openssl_signature(timestamp: &str, body: &[u8]) -> String {
    let mut child = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", SECRET])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("openssl");
    let mut input = child.stdin.take().unwrap();
    input.write_all(format!("{timestamp}.").as_bytes()).unwrap();
    input.write_all(body).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    format!("sha256={}", text.trim().rsplit(' ').next().unwrap())
}

fn at(ms: i64) -> String {
    auditrail_core::time::format_millis(ms)
}

fn read(user: &str, ip: &str, patient: &str, t: i64) -> Value {
    json!({"occurred_at": at(t), "category": "phi_access", "action": "patient.read", "outcome": "success",
        "actor": {"user_id": user, "ip": ip}, "patient": {"id": patient}, "source": {"system": "ehr"}})
}

fn login(user: &str, ip: &str, ok: bool, t: i64) -> Value {
    json!({"occurred_at": at(t), "category": "authentication",
        "action": if ok { "login.success" } else { "login.failure" },
        "outcome": if ok { "success" } else { "failure" },
        "actor": {"user_id": user, "ip": ip}, "source": {"system": "ehr"}})
}

fn send(s: &Server, events: &[Value]) {
    for chunk in events.chunks(500) {
        let r = s.post_json("/api/v1/events", &Value::Array(chunk.to_vec()));
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

/// Waits until the engine has read everything in the log.
fn wait_evaluated(s: &Server) {
    for _ in 0..400 {
        let status = s.get("/api/v1/security/status").json();
        if status["alerts"]["next_seq"].as_u64() >= status["log"]["size"].as_u64() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    panic!("the alert engine did not catch up within 8 s");
}

fn alerts(s: &Server, query: &str) -> Vec<Value> {
    let r = s.get(&format!("/api/v1/security/alerts?limit=500{query}"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["alerts"].as_array().unwrap().clone()
}

fn fired(s: &Server) -> BTreeSet<(String, String)> {
    alerts(s, "")
        .iter()
        .map(|a| {
            (a["rule"].as_str().unwrap().to_string(), a["subject"].as_str().unwrap().to_string())
        })
        .collect()
}

/// A week of ordinary work: 20 clinicians, each from their own network, reading a handful of
/// patients during business hours, logging in, now and then mistyping a password.
fn normal_week() -> Vec<Value> {
    let mut out = Vec::new();
    for day in 0..5 {
        for u in 0..20 {
            let (user, ip) = (format!("u{u}"), format!("10.0.{u}.{}", 10 + day));
            let start = MONDAY + day * 24 * HOUR + 8 * HOUR + u * 7 * MINUTE;
            out.push(login(&user, &ip, false, start));
            out.push(login(&user, &ip, true, start + MINUTE));
            for p in 0..12 {
                out.push(read(
                    &user,
                    &ip,
                    &format!("MRN{}", (u * 31 + p * 7 + day) % 400),
                    start + (2 + p) * MINUTE,
                ));
            }
        }
    }
    out
}

#[test]
fn attacks_raise_exactly_the_expected_alerts_and_webhooks_are_signed_and_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let receiver = Receiver::start(2);
    let config = tmp.path().join("auditrail.toml");
    std::fs::write(
        &config,
        format!(
            "[alerts]\nretry_initial_ms = 100\nretry_max_ms = 400\n\n[[alerts.webhooks]]\nname = \"soc\"\n\
             url = \"http://127.0.0.1:{}/hook\"\nsecret = \"{SECRET}\"\nmin_severity = \"medium\"\n",
            receiver.port
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let s = Server::start_with_args(&data, &["--config", config_arg], ALERTS_ON);

    // Normal traffic raises nothing.
    send(&s, &normal_week());
    wait_evaluated(&s);
    assert_eq!(fired(&s), BTreeSet::new(), "normal traffic raised alerts");

    // The attacks, on the following Monday and Tuesday.
    let next = MONDAY + 7 * 24 * HOUR;
    let mut attacks = Vec::new();
    // Brute force on one account.
    for i in 0..6 {
        attacks.push(login("victim", "198.51.100.7", false, next + 9 * HOUR + i * 20_000));
    }
    // Password spraying: one attempt on each of 12 accounts from one address.
    for i in 0..12 {
        attacks.push(login(
            &format!("staff{i}"),
            "203.0.113.50",
            false,
            next + 10 * HOUR + i * 15_000,
        ));
    }
    // MFA turned off.
    attacks.push(
        json!({"occurred_at": at(next + 11 * HOUR), "category": "mfa", "action": "user.mfa.remove",
        "outcome": "success", "actor": {"user_id": "mallory", "ip": "10.0.9.9"}}),
    );
    // 500 patients opened by one user in 10 minutes, from the network they always use.
    for p in 0..500 {
        attacks.push(read("u7", "10.0.7.10", &format!("MRN-X{p}"), next + 13 * HOUR + p * 1_100));
    }
    // A known user from a network never seen for them.
    attacks.push(read("u3", "192.0.2.44", "MRN5", next + 14 * HOUR));
    // After hours: 02:30 on Tuesday.
    attacks.push(read("u5", "10.0.5.10", "MRN9", next + 24 * HOUR + 2 * HOUR + 30 * MINUTE));
    send(&s, &attacks);
    wait_evaluated(&s);
    let expected: BTreeSet<(String, String)> = [
        ("failed-logins", "victim"),
        ("password-spraying", "203.0.113.50"),
        ("mfa-disabled", "mallory"),
        ("bulk-patient-access", "u7"),
        ("phi-access-new-network", "u3"),
        ("after-hours-phi-access", "u5"),
    ]
    .into_iter()
    .map(|(r, k)| (r.to_string(), k.to_string()))
    .collect();
    assert_eq!(fired(&s), expected);
    let all = alerts(&s, "");
    let bulk = all.iter().find(|a| a["rule"] == "bulk-patient-access").unwrap();
    assert_eq!(bulk["occurrences"], 2, "200 and 400 patients: one alert, fired twice");
    assert_eq!(bulk["severity"], "high");
    assert_eq!(alerts(&s, "&severity=low").len(), 1);
    let status = s.get("/api/v1/security/status").json();
    assert_eq!(status["alerts"]["unresolved"]["high"], 4, "{status}");

    // Webhooks: the five alerts of medium severity or more, the first two attempts refused.
    let mut delivered = Vec::new();
    for _ in 0..200 {
        delivered = alerts(&s, "")
            .into_iter()
            .filter(|a| a["deliveries"][0]["state"] == "delivered")
            .collect();
        if delivered.len() == 5 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(delivered.len(), 5, "{:#}", json!(alerts(&s, "")));
    let requests = receiver.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 7, "five deliveries and two retries");
    let attempts: u64 =
        delivered.iter().map(|a| a["deliveries"][0]["attempts"].as_u64().unwrap()).sum();
    assert_eq!(attempts, 7);
    let mut ids = BTreeSet::new();
    for (headers, body, status) in &requests {
        let header =
            |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap();
        let timestamp = header("x-auditrail-timestamp");
        assert_eq!(header("x-auditrail-signature"), openssl_signature(&timestamp, body));
        let sent: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(sent["type"], "alert");
        assert_ne!(sent["alert"]["severity"], "low");
        if *status == 204 {
            ids.insert(sent["alert"]["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(ids.len(), 5, "each alert delivered once");
    let status = s.get("/api/v1/security/status").json();
    assert_eq!(status["alerts"]["webhooks"][0]["delivered"], 5, "{status}");

    // The log holds each alert raised.
    s.wait_indexed();
    let raised = s.get("/api/v1/events?category=repository&action=alert.raised&limit=100").json();
    assert_eq!(raised["events"].as_array().unwrap().len(), 6, "{raised}");

    // Lifecycle: acknowledge, not twice; resolve; both recorded.
    let brute = all.iter().find(|a| a["rule"] == "failed-logins").unwrap();
    let id = brute["id"].as_str().unwrap();
    let path = |what: &str| format!("/api/v1/security/alerts/{id}/{what}");
    let r = s.post_json(&path("acknowledge"), &json!({"note": "looking"}));
    assert_eq!(
        (r.status, r.json()["status"].clone()),
        (200, json!("acknowledged")),
        "{}",
        r.text()
    );
    let r = s.post_json(&path("acknowledge"), &json!({}));
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (409, json!("alert_state")));
    // Still unresolved: five more failures add to it instead of raising another.
    send(
        &s,
        &(0..5)
            .map(|i| login("victim", "198.51.100.7", false, next + 15 * HOUR + i * 1000))
            .collect::<Vec<_>>(),
    );
    wait_evaluated(&s);
    let again = s.get(&format!("/api/v1/security/alerts/{id}")).json();
    assert_eq!(again["occurrences"], 2);
    assert_eq!(alerts(&s, "&rule=failed-logins").len(), 1);
    let r = s.post_json(&path("resolve"), &json!({"note": "password reset, source blocked"}));
    assert_eq!(r.json()["status"], "resolved");
    assert_eq!(r.json()["resolved"]["note"], "password reset, source blocked");
    // Resolved: the next burst is a new alert.
    send(
        &s,
        &(0..5)
            .map(|i| login("victim", "198.51.100.7", false, next + 16 * HOUR + i * 1000))
            .collect::<Vec<_>>(),
    );
    wait_evaluated(&s);
    assert_eq!(alerts(&s, "&rule=failed-logins&status=open").len(), 1);
    s.wait_indexed();
    for action in ["alert.acknowledged", "alert.resolved"] {
        let found = s.get(&format!("/api/v1/events?category=repository&action={action}")).json();
        assert_eq!(found["events"].as_array().unwrap().len(), 1, "{action}");
    }

    // Rules through the API: a changed threshold applies; the change itself is a security
    // setting change (and alerts as one).
    let mut rule = s
        .get("/api/v1/security/alert-rules")
        .json()
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "failed-logins")
        .unwrap()
        .clone();
    assert_eq!(rule["origin"], "builtin");
    rule.as_object_mut().unwrap().remove("origin");
    rule["threshold"] = json!(2);
    let r = s.request(
        "PUT",
        "/api/v1/security/alert-rules/failed-logins",
        "application/json",
        rule.to_string().as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let mut bad = rule.clone();
    bad["group_by"] = Value::Null;
    let r = s.request(
        "PUT",
        "/api/v1/security/alert-rules/failed-logins",
        "application/json",
        bad.to_string().as_bytes(),
    );
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_rule")));
    send(
        &s,
        &(0..2)
            .map(|i| login("other", "198.51.100.8", false, next + 17 * HOUR + i * 1000))
            .collect::<Vec<_>>(),
    );
    wait_evaluated(&s);
    assert_eq!(alerts(&s, "&rule=failed-logins&subject=other").len(), 1);
    assert_eq!(alerts(&s, "&rule=security-settings-changed").len(), 1);

    // A restart keeps the alerts and their state. (Starting the test server provisions a new
    // API key on the command line: a security change of its own, which alerts too.)
    let ids = |alerts: Vec<Value>| -> BTreeSet<String> {
        alerts.iter().map(|a| a["id"].as_str().unwrap().to_string()).collect()
    };
    let before = ids(alerts(&s, ""));
    assert!(s.stop().success());
    let s = Server::start_with_args(&data, &["--config", config_arg], ALERTS_ON);
    wait_evaluated(&s);
    let after = alerts(&s, "");
    let new: Vec<&Value> =
        after.iter().filter(|a| !before.contains(a["id"].as_str().unwrap())).collect();
    assert!(before.is_subset(&ids(after.clone())));
    assert_eq!(new.len(), 1, "{new:?}");
    assert_eq!(new[0]["rule"], "security-settings-changed");
    let resolved = alerts(&s, "&rule=failed-logins&status=resolved");
    assert_eq!(resolved[0]["resolved"]["note"], "password reset, source blocked");
    let r = s.get("/api/v1/security/alerts?status=nosuch");
    assert_eq!((r.status, r.json()["error"]["code"].clone()), (400, json!("invalid_parameter")));
}
