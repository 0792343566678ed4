//! The syslog forwarder against a real rsyslogd receiving RFC 5425 (octet-counted RFC 5424
//! over TLS) with GnuTLS, requiring a client certificate. scripts/test installs `rsyslog` and
//! `rsyslog-gnutls`; without rsyslogd this test fails rather than skips.

use crate::{append, open_store, wait_for};
use auditrail_forward::{ForwardConfig, Forwarding, SyslogConfig};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn rsyslogd() -> PathBuf {
    ["/usr/sbin/rsyslogd", "/sbin/rsyslogd", "/usr/bin/rsyslogd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("rsyslogd not found: scripts/test installs the Debian packages rsyslog and rsyslog-gnutls")
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files.
pub fn certificates(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "auditrail test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    for (name, sans) in
        [("server", vec!["localhost".to_string()]), ("client", vec!["auditrail-client".into()])]
    {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if name == "server" {
            params.subject_alt_names.push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        let cert = params.signed_by(&key, &ca_cert, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

/// rsyslogd in the foreground on 127.0.0.1:`port`, writing each message's raw text and its
/// parsed RFC 5424 fields to files in `dir`; killed on drop.
struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    fn start(dir: &Path, port: u16) -> Rsyslog {
        let d = dir.display();
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let conf = format!(
            r#"global(
  workDirectory="{d}/work"
  maxMessageSize="128k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{d}/ca.pem"
  defaultNetstreamDriverCertFile="{d}/server.pem"
  defaultNetstreamDriverKeyFile="{d}/server.key"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="x509/certvalid")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="raw" type="string" string="%rawmsg%\n")
template(name="fields" type="string" string="%pri%\t%hostname%\t%app-name%\t%procid%\t%msgid%\t%structured-data%\t%msg%\n")
action(type="omfile" file="{d}/raw.log" template="raw")
action(type="omfile" file="{d}/fields.log" template="fields")
"#
        );
        std::fs::write(dir.join("rsyslog.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.join("rsyslogd.stderr")).unwrap();
        let child = Command::new(rsyslogd())
            .arg("-n")
            .arg("-f")
            .arg(dir.join("rsyslog.conf"))
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("rsyslogd starts");
        let mut r = Rsyslog { child };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = r.child.try_wait().unwrap() {
                panic!("rsyslogd exited ({status}): {}", stderr(dir));
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "rsyslogd did not listen: {}",
                stderr(dir)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn stderr(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("rsyslogd.stderr")).unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits (boundedly) until rsyslogd has written messages for every id in `ids`; returns the
/// parsed lines.
async fn received(dir: &Path, ids: &HashSet<String>) -> Vec<Vec<String>> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(dir.join("fields.log")).unwrap_or_default();
        let lines: Vec<Vec<String>> = text
            .lines()
            .map(|l| l.splitn(7, '\t').map(str::to_string).collect::<Vec<_>>())
            .collect();
        let seen: HashSet<String> = lines
            .iter()
            .filter_map(|f| serde_json::from_str::<Value>(f.get(6)?).ok())
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        if ids.is_subset(&seen) {
            return lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "rsyslogd received {} of {} events; stderr: {}",
            seen.intersection(ids).count(),
            ids.len(),
            stderr(dir)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc5425_over_tls_to_rsyslog_with_reconnect() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sys = tmp.path().join("rsyslog");
    std::fs::create_dir_all(&sys).unwrap();
    certificates(&sys);
    let port = free_port();
    let rsyslog = Rsyslog::start(&sys, port);

    let store = open_store(&data);
    append(&store, 0..100);
    let config = ForwardConfig {
        syslog: SyslogConfig {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            ca_file: Some(sys.join("ca.pem")),
            client_cert_file: Some(sys.join("client.pem")),
            client_key_file: Some(sys.join("client.key")),
            facility: "local4".into(),
            hostname: "test-host".into(),
            batch_events_max: 16,
            backoff_initial_ms: 10,
            backoff_max_ms: 100,
            poll_interval_ms: 10,
            ..SyslogConfig::default()
        },
        ..ForwardConfig::default()
    };
    let runtime = tokio::runtime::Handle::current();
    let forwarding = Forwarding::start(&config, &data, store.clone(), &runtime).unwrap();
    wait_for(&forwarding, Duration::from_secs(20), "100 sent", |s| s.next_seq == 100).await;
    let all: HashSet<String> = (0..100).map(|i| format!("e-{i}")).collect();
    let lines = received(&sys, &all).await;

    // Every message is whole (octet counting framed it) and its fields are right.
    let stored: HashMap<u64, Value> = store
        .read_events(0, 100)
        .unwrap()
        .into_iter()
        .map(|(seq, bytes)| (seq, serde_json::from_slice(&bytes).unwrap()))
        .collect();
    assert_eq!(lines.len(), 100, "one message per event");
    for f in &lines {
        assert_eq!(f.len(), 7, "{f:?}");
        let event: Value = serde_json::from_str(&f[6]).unwrap_or_else(|e| panic!("{e}: {f:?}"));
        let seq = event["seq"].as_u64().unwrap();
        assert_eq!(event, stored[&seq], "the message is the stored event");
        let severity = if event["outcome"] == "success" { 5 } else { 3 };
        let pid = std::process::id().to_string();
        assert_eq!(
            f[..5],
            [
                (20 * 8 + severity).to_string(),
                "test-host".into(),
                "auditrail".into(),
                pid,
                event["action"].as_str().unwrap().to_string()
            ]
        );
        let sd = format!(
            "[auditrail@32473 id=\"{}\" seq=\"{seq}\" outcome=\"{}\"]",
            event["id"].as_str().unwrap(),
            event["outcome"].as_str().unwrap()
        );
        assert_eq!(f[5], sd);
    }
    let raw = std::fs::read_to_string(sys.join("raw.log")).unwrap();
    assert!(raw.lines().all(|l| l.starts_with('<') && l.contains(" auditrail ")), "{raw}");

    // The receiver goes away: the forwarder retries with backoff, reconnects when it is back,
    // and resends from its cursor.
    rsyslog.kill();
    append(&store, 100..150);
    wait_for(&forwarding, Duration::from_secs(20), "retrying while rsyslogd is down", |s| {
        s.state == "retrying" && s.retries_total >= 2
    })
    .await;
    let s = forwarding.status().forwarders.swap_remove(0);
    assert_eq!((s.next_seq, s.lag_events), (100, 50));
    let _rsyslog = Rsyslog::start(&sys, port);
    wait_for(&forwarding, Duration::from_secs(20), "caught up after the outage", |s| {
        s.next_seq == 150 && s.state == "ok"
    })
    .await;
    let all: HashSet<String> = (0..150).map(|i| format!("e-{i}")).collect();
    received(&sys, &all).await;
    forwarding.stop(Duration::from_secs(5)).await;
    let cursor = std::fs::read(data.join("forward/syslog.cursor")).unwrap();
    assert_eq!(auditrail_forward::cursor::decode(&cursor), Ok(150));
}

/// In TLS 1.3 a receiver refuses a client certificate only after the client's handshake has
/// finished; the forwarder must notice, report it and keep its cursor, never count the
/// events as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_client_certificate_is_reported_not_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let sys = tmp.path().join("rsyslog");
    std::fs::create_dir_all(&sys).unwrap();
    certificates(&sys);
    let port = free_port();
    let _rsyslog = Rsyslog::start(&sys, port);
    let store = open_store(&data);
    append(&store, 0..5);
    let config = ForwardConfig {
        syslog: SyslogConfig {
            address: format!("127.0.0.1:{port}"),
            server_name: "localhost".into(),
            ca_file: Some(sys.join("ca.pem")),
            backoff_initial_ms: 10,
            backoff_max_ms: 50,
            poll_interval_ms: 10,
            ..SyslogConfig::default()
        },
        ..ForwardConfig::default()
    };
    let runtime = tokio::runtime::Handle::current();
    let forwarding = Forwarding::start(&config, &data, store.clone(), &runtime).unwrap();
    let s = wait_for(&forwarding, Duration::from_secs(20), "the refusal reported", |s| {
        s.retries_total >= 2
    })
    .await;
    assert!(s.last_error.as_deref().unwrap().contains("client certificate refused"), "{s:#?}");
    assert_eq!((s.next_seq, s.sent_total, s.lag_events), (0, 0, 5));
    forwarding.stop(Duration::from_secs(5)).await;
}
