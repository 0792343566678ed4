//! A running `auditrail serve` on 127.0.0.1:0 and a minimal HTTP/1.1 client for talking to it
//! (one connection per request, so each test step is independent).

use std::io::{BufRead, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};

pub struct Server {
    pub child: Child,
    pub addr: String,
    /// An API key with every permission a key can hold, sent with each request.
    pub token: String,
    /// Events in the log when the server started (the repository's own record of its first
    /// administrator and of the test's key included): the seq of the test's first event.
    pub base: u64,
    /// What the server wrote so far: stderr, and stdout after its first line.
    log: Arc<Mutex<String>>,
}

/// Copies a server's output to the test's stderr, line by line, and keeps it in `log`.
fn keep(output: impl BufRead + Send + 'static, log: &Arc<Mutex<String>>) {
    let log = log.clone();
    std::thread::spawn(move || {
        for line in output.lines().map_while(Result::ok) {
            eprintln!("{line}");
            log.lock().unwrap().push_str(&(line + "\n"));
        }
    });
}

/// Every permission an API key can hold (all but `emergency:access`, which is for people).
pub const ALL_SCOPES: &[&str] = &[
    "events:write",
    "events:read",
    "events:patient_identifiers",
    "events:export",
    "reports:run",
    "alerts:manage",
    "integrity:verify",
    "security:read",
    "retention:manage",
    "users:manage",
    "keys:manage",
    "settings:manage",
    "projects:create",
];

/// Provisions an API key in a stopped server's data directory (initialising it if new).
/// Events in a stopped server's log (`env`: the server's, for its master key source).
pub fn events_in_log(data: &Path, env: &[(&str, &str)]) -> u64 {
    let o = crate::run_env(&["export", "--data", data.to_str().unwrap()], env);
    assert!(o.status.success(), "export: {}", crate::stderr(&o));
    crate::stdout(&o).lines().count() as u64
}

pub fn provision_key(data: &Path, scopes: &[&str], env: &[(&str, &str)]) -> String {
    if !data.join("keys").exists() {
        let o = crate::run_env(
            &["init", "--data", data.to_str().unwrap(), "--origin", "test.auditrail.local/log"],
            env,
        );
        assert!(o.status.success(), "init: {}", crate::stderr(&o));
    }
    let mut args = vec!["api-key", "create", "--data", data.to_str().unwrap(), "--name", "tests"];
    for s in scopes {
        args.extend(["--scope", s]);
    }
    let o = crate::run_env(&args, env);
    assert!(o.status.success(), "api-key create: {}", crate::stderr(&o));
    crate::stdout(&o).trim().to_string()
}

/// Starts `serve` on 127.0.0.1:0; returns the child, its first line (the address) and what it
/// writes from then on.
fn spawn_serve(
    data: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (std::process::Child, String, Arc<Mutex<String>>) {
    let mut cmd = crate::bin();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(data).args(args);
    // Alerts and scheduled verifications append events of their own, at times that depend on
    // the wall clock: tests that count the log's events exactly leave them off; the alert and
    // integrity tests turn them on.
    for quiet in [
        ("AUDITRAIL_ALERTS_ENABLED", "false"),
        ("AUDITRAIL_INTEGRITY_INCREMENTAL_INTERVAL_MS", "0"),
        ("AUDITRAIL_INTEGRITY_FULL_INTERVAL_MS", "0"),
    ] {
        if !env.iter().any(|(k, _)| *k == quiet.0) {
            cmd.env(quiet.0, quiet.1);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    keep(BufReader::new(child.stderr.take().unwrap()), &log);
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    keep(stdout, &log);
    (child, line, log)
}

impl Server {
    pub fn start(data: &Path) -> Server {
        Server::start_with(data, &[])
    }

    pub fn start_with(data: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_with_args(data, &[], env)
    }

    /// `serve` with extra arguments (`--config FILE`).
    pub fn start_with_args(data: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let token = provision_key(data, ALL_SCOPES, env);
        let base = events_in_log(data, env);
        let (child, line, log) = spawn_serve(data, args, env);
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let server = Server { child, addr, token, base, log };
        // Ready once the index has caught up with the log.
        for _ in 0..600 {
            if server.get("/readyz").status == 200 {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the server did not become ready");
    }

    /// `serve` over HTTPS on 127.0.0.1:0 with extra `args` and `env`; ready once `/readyz`
    /// answers 200 to `curl` with `curl_args` (`--cacert CA`, a client certificate if the
    /// server wants one).
    pub fn start_tls(
        data: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        curl_args: &[&str],
    ) -> Server {
        let token = provision_key(data, ALL_SCOPES, env);
        let base = events_in_log(data, env);
        let (child, line, log) = spawn_serve(data, args, env);
        let addr = line
            .trim()
            .strip_prefix("listening on https://")
            .unwrap_or_else(|| {
                panic!("unexpected first line {line:?}; stderr: {}", log.lock().unwrap())
            })
            .to_string();
        let server = Server { child, addr, token, base, log };
        for _ in 0..600 {
            let o = std::process::Command::new("curl")
                .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(curl_args)
                .arg(format!("https://{}/readyz", server.addr))
                .output()
                .unwrap();
            if o.stdout == b"200" {
                return server;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the server did not become ready over HTTPS");
    }

    /// What the server wrote (its stderr, and stdout after the address line), so far.
    pub fn output(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn request(&self, method: &str, path: &str, content_type: &str, body: &[u8]) -> Response {
        request_as(&self.addr, Some(&self.token), method, path, content_type, body)
    }

    /// The events applications stored (not the repository's own), once the index has caught
    /// up with everything durable: how a test checks that a bad request stored nothing.
    pub fn client_events(&self) -> Vec<serde_json::Value> {
        self.wait_indexed();
        self.get("/api/v1/events?limit=1000").json()["events"].as_array().unwrap().clone()
    }

    /// Waits (boundedly) until the index covers every event sequenced so far, the repository's
    /// own read traces included, so a search sees everything the test has written.
    pub fn wait_indexed(&self) {
        let sequenced = self.sequenced();
        for _ in 0..400 {
            let r = self.get("/api/v1/events?limit=1");
            if r.json()["indexed_through"].as_u64().unwrap() >= sequenced {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the index did not catch up with {sequenced} events within 4 s");
    }

    /// A request with these credentials (`None`: anonymous).
    pub fn request_as(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> Response {
        request_as(&self.addr, token, method, path, content_type, body)
    }

    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, "", b"")
    }

    pub fn post_json(&self, path: &str, body: &serde_json::Value) -> Response {
        self.request("POST", path, "application/json", body.to_string().as_bytes())
    }

    pub fn put_json(&self, path: &str, body: &serde_json::Value) -> Response {
        self.request("PUT", path, "application/json", body.to_string().as_bytes())
    }

    /// Events in the log (durable), from `/metrics`.
    pub fn sequenced(&self) -> u64 {
        // A read's trace is queued before its answer leaves but becomes durable with the next
        // group commit: wait for the queued ones, so the figure counts every earlier request.
        for _ in 0..400 {
            let metrics = self.get("/metrics").text();
            let gauge = |name: &str| -> u64 {
                metrics
                    .lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {name} in {metrics}"))
            };
            if gauge("auditrail_log_submitted_pending") == 0 {
                return gauge("auditrail_log_sequenced");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("read traces still queued after 4 s");
    }

    /// SIGTERM, then wait: the clean shutdown path.
    pub fn stop(mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), libc::SIGTERM);
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(unsafe_code)]
pub fn unsafe_kill(pid: u32, signal: i32) {
    // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

pub fn request_as(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Response {
    request_with_headers(addr, token, method, path, content_type, body, &[])
}

/// [`request_as`] with extra header lines, such as a proxy's `X-Forwarded-For`.
pub fn request_with_headers(
    addr: &str,
    token: Option<&str>,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
    headers: &[(&str, &str)],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !content_type.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if method != "GET" || !body.is_empty() {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete response");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body);
    }
    Response { status, headers, body }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 4 + size..];
    }
}
