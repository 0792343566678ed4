//! Access control end to end, as a new operator and their users meet it: the bootstrap
//! administrator's first login, MFA, roles and masking, break-glass, and the log's record of
//! every read. Plus canary values that must never reach the server's output or rest in the
//! clear in its data directory.

use crate::http::{Response, Server, request_with_headers};
use serde_json::{Value, json};
use std::path::Path;

const PASSWORD: &str = "violet-anchor-sleeps-42-ways";

fn call(s: &Server, token: &str, method: &str, path: &str, body: &Value) -> Response {
    let bytes = if body.is_null() { Vec::new() } else { body.to_string().into_bytes() };
    let ct = if body.is_null() { "" } else { "application/json" };
    s.request_as(Some(token), method, path, ct, &bytes)
}

fn login(s: &Server, name: &str, password: &str, totp: Option<String>) -> Response {
    let body = json!({"username": name, "password": password, "totp_code": totp});
    s.request_as(
        None,
        "POST",
        "/api/v1/auth/login",
        "application/json",
        body.to_string().as_bytes(),
    )
}

fn totp_now(secret_b32: &str) -> String {
    let secret = totp_rs::Secret::try_from_base32(secret_b32).unwrap();
    let t = totp_rs::Builder::new().with_secret(secret.to_vec()).build_noncompliant();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    t.generate(now).to_string()
}

/// Waits (boundedly) until a search as `token` finds something; returns the events.
fn search_until(s: &Server, token: &str, query: &str) -> Vec<Value> {
    for _ in 0..200 {
        let r = call(s, token, "GET", &format!("/api/v1/events?{query}"), &Value::Null);
        assert_eq!(r.status, 200, "{}", r.text());
        let events = r.json()["events"].as_array().cloned().unwrap_or_default();
        if !events.is_empty() {
            return events;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("nothing found for {query}");
}

/// Logs the bootstrap admin in from the one-time password file, changes the password and
/// enrols TOTP, as the README says; returns a working access token.
fn first_admin_login(s: &Server, data: &Path) -> String {
    let file = data.join("auth/initial-admin-password");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let one_time = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let r = login(s, "admin", "not the password", None);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (401, Some("invalid_credentials")));
    let r = login(s, "admin", &one_time, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let t = r.json();
    assert_eq!(
        (t["must_change_password"].as_bool(), t["must_enrol_mfa"].as_bool()),
        (Some(true), Some(true))
    );
    let token = t["access_token"].as_str().unwrap().to_string();
    let r = call(s, &token, "GET", "/api/v1/events", &Value::Null);
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("password_change_required"))
    );
    let r = call(
        s,
        &token,
        "POST",
        "/api/v1/auth/password",
        &json!({"current_password": one_time, "new_password": "password1234"}),
    );
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (400, Some("weak_password")));
    let r = call(
        s,
        &token,
        "POST",
        "/api/v1/auth/password",
        &json!({"current_password": one_time, "new_password": PASSWORD}),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let r = call(s, &token, "GET", "/api/v1/events", &Value::Null);
    assert_eq!(
        (r.status, r.json()["error"]["code"].as_str()),
        (403, Some("mfa_enrolment_required"))
    );
    let r = call(s, &token, "POST", "/api/v1/auth/mfa/totp", &Value::Null);
    assert_eq!(r.status, 200, "{}", r.text());
    let enrol = r.json();
    assert!(enrol["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/"));
    let secret = enrol["secret"].as_str().unwrap().to_string();
    let r = call(
        s,
        &token,
        "POST",
        "/api/v1/auth/mfa/totp/confirm",
        &json!({"code": totp_now(&secret)}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["recovery_codes"].as_array().unwrap().len(), 10);
    let r = call(s, &token, "GET", "/api/v1/auth/me", &Value::Null);
    assert_eq!(r.json()["must_enrol_mfa"], false);
    token
}

#[test]
fn a_new_operator_logs_in_and_every_read_leaves_a_trace() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start(&data);
    let admin = first_admin_login(&s, &data);

    // Events from an application (the harness's API key), one with a patient.
    let event = json!({"id": "auth-it-1", "action": "patient.read", "outcome": "success",
        "actor": {"user_id": "dr.a"}, "patient": {"id": "MRN-4471"}, "project": "cardiology"});
    assert_eq!(s.post_json("/api/v1/events", &event).status, 201);

    // The admin searches; the search is in the log, naming who and what was asked.
    let found = search_until(&s, &admin, "user=dr.a");
    assert_eq!(found[0]["patient"]["id"], "MRN-4471");
    let traces = search_until(&s, &admin, "category=repository&action=events.search");
    let mine = traces
        .iter()
        .find(|e| e["actor"]["name"] == "admin" && e["request"]["query"] == "user=dr.a")
        .unwrap_or_else(|| panic!("no trace of the admin's search in {traces:?}"));
    assert_eq!(mine["outcome"], "success");
    assert!(mine["actor"]["session_id"].is_string());
    // Reading one event is recorded too.
    let r = call(&s, &admin, "GET", "/api/v1/events/auth-it-1", &Value::Null);
    assert_eq!(r.status, 200);
    search_until(&s, &admin, "category=repository&action=events.read");

    // A viewer sees events with the patient masked, until break-glass.
    let r = call(
        &s,
        &admin,
        "POST",
        "/api/v1/users",
        &json!({"username": "vera", "grants": [{"role": "viewer"}]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let one_time = r.json()["one_time_password"].as_str().unwrap().to_string();
    let t = login(&s, "vera", &one_time, None).json();
    let vera = t["access_token"].as_str().unwrap().to_string();
    let r = call(
        &s,
        &vera,
        "POST",
        "/api/v1/auth/password",
        &json!({"current_password": one_time, "new_password": PASSWORD}),
    );
    assert_eq!(r.status, 204);
    let r = call(&s, &vera, "GET", "/api/v1/events/auth-it-1", &Value::Null);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["event"]["patient"]["id"], "***");
    assert_eq!(r.json()["event"]["actor"]["user_id"], "dr.a");
    let r = call(&s, &vera, "GET", "/fhir/AuditEvent/auth-it-1", &Value::Null);
    assert!(!r.text().contains("MRN-4471"), "{}", r.text());
    let r = call(&s, &vera, "GET", "/api/v1/users", &Value::Null);
    assert_eq!(r.status, 403);
    let r = call(
        &s,
        &vera,
        "POST",
        "/api/v1/auth/break-glass",
        &json!({"reason": "patient in ED, chart review", "minutes": 15}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(&s, &vera, "GET", "/api/v1/events/auth-it-1", &Value::Null);
    assert_eq!(r.json()["event"]["patient"]["id"], "MRN-4471");
    let bg = search_until(&s, &admin, "category=repository&action=auth.break_glass");
    assert_eq!(bg[0]["context"]["severity"], "high");
    assert_eq!(bg[0]["actor"]["name"], "vera");

    // A key limited to one project cannot write to another; an ingest key cannot read.
    let r = call(
        &s,
        &admin,
        "POST",
        "/api/v1/api-keys",
        &json!({"name": "ehr", "scopes": ["events:write"], "projects": ["cardiology"]}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let key = r.json()["key"].as_str().unwrap().to_string();
    let r = call(
        &s,
        &key,
        "POST",
        "/api/v1/events",
        &json!({"action": "x.y", "outcome": "success", "project": "oncology"}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["details"][0]["code"], "not_permitted");
    let r = call(
        &s,
        &key,
        "POST",
        "/api/v1/events",
        &json!({"action": "x.y", "outcome": "success", "project": "cardiology"}),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(call(&s, &key, "GET", "/api/v1/events", &Value::Null).status, 403);

    // Forged tokens are refused over HTTP as in the unit tests.
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(r#"{"sub":"x","sid":"y","aud":"auditrail"}"#)
    );
    let r = call(&s, &none, "GET", "/api/v1/events", &Value::Null);
    assert_eq!((r.status, r.header("www-authenticate")), (401, Some("Bearer")));

    // Failed logins lock vera out; the security status counts them, from the log.
    let status_of = || {
        // Once the index has read everything the log holds.
        let mut status = Value::Null;
        for _ in 0..100 {
            status = call(&s, &admin, "GET", "/api/v1/security/status", &Value::Null).json();
            let indexed = status["log"]["indexed_through"].as_u64().unwrap();
            if indexed >= status["log"]["size"].as_u64().unwrap() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        status
    };
    // (The admin's first login, without its TOTP code, was a failure too.)
    let failed_before = status_of()["access"]["failed_logins_24h"].as_u64().unwrap();
    for _ in 0..5 {
        let r = login(&s, "vera", "not her password at all", None);
        assert!(matches!(r.status, 401 | 403), "{}", r.text());
    }
    let status = status_of();
    let access = &status["access"];
    assert_eq!(access["failed_logins_24h"].as_u64().unwrap(), failed_before + 5, "{status}");
    assert_eq!(access["lockouts_24h"], 1, "{status}");
    assert_eq!(access["locked_now"], 1, "{status}");
    assert_eq!(access["users"], 2, "{status}");
    assert_eq!(access["mfa_enrolled"], 1, "the admin enrolled TOTP: {status}");
    assert_eq!(access["mfa_coverage"], 0.5, "{status}");
    assert_eq!(status["tls"]["enabled"], false);
    assert_eq!(status["keys"]["signing_key"]["age_days"], 0, "{status}");
    assert_eq!(status["keys"]["master_keys"]["current_version"], 1, "{status}");

    // Logout ends the session at once.
    assert_eq!(call(&s, &vera, "POST", "/api/v1/auth/logout", &Value::Null).status, 204);
    assert_eq!(call(&s, &vera, "GET", "/api/v1/auth/me", &Value::Null).status, 401);
    assert!(s.stop().success());
}

#[test]
fn api_keys_limited_to_networks_see_the_client_behind_a_trusted_proxy() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_with(&data, &[("AUDITRAIL_TRUSTED_PROXIES", "127.0.0.1")]);
    let key_for = |name: &str, network: &str| {
        let body = json!({"name": name, "scopes": ["events:read"], "networks": [network]});
        let r = call(&s, &s.token, "POST", "/api/v1/api-keys", &body);
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["key"].as_str().unwrap().to_string()
    };
    let local = key_for("local-reporting", "127.0.0.0/8");
    let ward = key_for("ward-kiosk", "10.20.0.0/16");
    let search = |s: &Server, key: &str, forwarded: Option<&str>| {
        let headers: Vec<(&str, &str)> =
            forwarded.map(|f| ("X-Forwarded-For", f)).into_iter().collect();
        request_with_headers(&s.addr, Some(key), "GET", "/api/v1/events?limit=1", "", b"", &headers)
    };
    // Straight from loopback: the peer is the client.
    assert_eq!(search(&s, &local, None).status, 200);
    let r = search(&s, &ward, None);
    assert_eq!((r.status, r.json()["error"]["code"].as_str()), (403, Some("network_forbidden")));
    // Through the (trusted) proxy on 127.0.0.1: the address it forwards for is the client,
    // even when the client put a forged hop first.
    assert_eq!(search(&s, &ward, Some("192.0.2.1, 10.20.7.8")).status, 200);
    assert_eq!(search(&s, &local, Some("10.20.7.8")).status, 403);
    // The read's trace names the client, not the proxy.
    let traced =
        search_until(&s, &s.token, "category=repository&action=events.search&ip=10.20.7.8");
    assert_eq!(traced[0]["actor"]["ip"], "10.20.7.8", "{traced:?}");
    assert!(s.stop().success());

    // Without trusted proxies the header is only the client's claim, and ignored.
    let s = Server::start(&data);
    assert_eq!(search(&s, &ward, Some("10.20.7.8")).status, 403);
    assert_eq!(search(&s, &local, Some("10.20.7.8")).status, 200);
}

fn b64(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
}

#[test]
fn canaries_never_reach_the_server_output_or_rest_in_the_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_tls(
        &data,
        &["--tls-self-signed"],
        &[("AUDITRAIL_MFA_REQUIRED_ROLES", "")],
        &["--cacert", data.join("tls/self-signed.crt").to_str().unwrap()],
    );
    let patient = "CANARY-MRN-93817";
    let password = "canary-Passw0rd-lighthouse-77";
    // Everything below goes over HTTPS with curl, as a client would send it.
    let curl = |args: &[&str]| -> String {
        let mut cmd = std::process::Command::new("curl");
        cmd.args(["-s", "--cacert", data.join("tls/self-signed.crt").to_str().unwrap()]).args(args);
        String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
    };
    let base = format!("https://{}", s.addr);
    let auth = format!("Authorization: Bearer {}", s.token);
    let event = json!({"action": "patient.read", "outcome": "success", "actor": {"user_id": "canary-user"},
        "patient": {"id": patient}, "context": {"note": format!("chart of {patient}")}});
    let out = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        &event.to_string(),
        &format!("{base}/api/v1/events"),
    ]);
    assert!(out.contains("\"seq\""), "{out}");
    let created = curl(&[
        "-H",
        &auth,
        "-H",
        "content-type: application/json",
        "-d",
        r#"{"username":"carol","grants":[{"role":"auditor"}]}"#,
        &format!("{base}/api/v1/users"),
    ]);
    let created: Value = serde_json::from_str(&created).unwrap();
    let one_time = created["one_time_password"].as_str().unwrap().to_string();
    let t: Value = serde_json::from_str(&curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        &json!({"username": "carol", "password": one_time}).to_string(),
        &format!("{base}/api/v1/auth/login"),
    ]))
    .unwrap();
    let token = t["access_token"].as_str().unwrap().to_string();
    let refresh = t["refresh_token"].as_str().unwrap().to_string();
    curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        "-H",
        "content-type: application/json",
        "-d",
        &json!({"current_password": one_time, "new_password": password}).to_string(),
        &format!("{base}/api/v1/auth/password"),
    ]);
    // A failed login with the canary as the password, and a search by the canary patient.
    curl(&[
        "-H",
        "content-type: application/json",
        "-d",
        &json!({"username": "carol", "password": format!("{password}x")}).to_string(),
        &format!("{base}/api/v1/auth/login"),
    ]);
    curl(&["-H", &auth, &format!("{base}/api/v1/events?patient={patient}")]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let log = s.output();
    assert!(s.stop().success());
    let secrets =
        [patient, password, one_time.as_str(), token.as_str(), refresh.as_str(), s_token(&auth)];
    for canary in secrets {
        assert!(!log.contains(canary), "the server's output holds {canary}: {log}");
    }
    // The data directory: no password, token or key at rest (the patient only as a keyed
    // hash in the index, encrypted in the log).
    for path in walk(&data) {
        let bytes = std::fs::read(&path).unwrap();
        for canary in [password, one_time.as_str(), refresh.as_str(), s_token(&auth)] {
            assert!(!contains(&bytes, canary.as_bytes()), "{} holds {canary}", path.display());
        }
        if !path.to_string_lossy().contains("/index/") {
            assert!(
                !contains(&bytes, patient.as_bytes()),
                "{} holds the patient id",
                path.display()
            );
        }
    }
}

fn s_token(auth: &str) -> &str {
    auth.trim_start_matches("Authorization: Bearer ")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() { dirs.push(p) } else { out.push(p) }
        }
    }
    out
}
