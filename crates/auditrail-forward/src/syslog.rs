//! The syslog destination: one RFC 5424 message per event over TLS, framed by octet counting
//! (RFC 5425: `<length> <message>`).
//!
//! ```text
//! <PRI>1 <recorded_at> <HOSTNAME> auditrail <PROCID> <action> [auditrail@32473 id="…" seq="…" outcome="…"] <event JSON>
//! ```
//!
//! PRI = facility × 8 + severity, the severity from the outcome: success → notice (5);
//! failure → warning (4), or by FHIR outcome code 8 → error (3), 12 → critical (2).
//! `32473` is the private enterprise number RFC 5612 reserves for documentation.
//!
//! Syslog over TCP has no acknowledgements: the cursor advances once a batch has been written
//! and flushed into the TLS connection. A connection that breaks loses what the receiver had
//! not yet processed; after a reconnect the forwarder resends from its cursor, so delivery is
//! at least once across reconnects and restarts, best effort within one connection.

use crate::config::{SyslogConfig, facility_code};
use crate::runner::Delivery;
use crate::{ForwardError, LogEvent};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long a new connection is watched for an immediate hang-up before it is used.
const SETTLE: Duration = Duration::from_millis(200);

/// The structured-data id of auditrail's parameters.
pub const SD_ID: &str = "auditrail@32473";

/// Splits `host:port` (`[v6]:port` for IPv6 literals).
pub fn split_host_port(address: &str) -> Option<(&str, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() || host.contains(' ') {
        return None;
    }
    Some((host, port.parse().ok()?))
}

/// The fields of a stored event a message header needs.
#[derive(Deserialize)]
struct Head {
    id: String,
    seq: u64,
    action: String,
    outcome: String,
    #[serde(default)]
    outcome_code: Option<u8>,
    recorded_at: String,
}

/// RFC 5424 severity of an outcome.
pub fn severity(outcome: &str, outcome_code: Option<u8>) -> u8 {
    match (outcome, outcome_code) {
        ("success", _) | (_, Some(0)) => 5,
        (_, Some(12)) => 2,
        (_, Some(8)) => 3,
        _ => 4,
    }
}

/// Keeps the printable US-ASCII characters RFC 5424 allows in header fields, at most `max`.
fn header_field(s: &str, max: usize) -> String {
    let cleaned: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if cleaned.is_empty() { "-".into() } else { cleaned }
}

/// Escapes a structured-data parameter value (`"`, `\` and `]`).
fn sd_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One event as an RFC 5424 message (without framing).
pub fn message(
    facility: u8,
    hostname: &str,
    procid: u32,
    event: &LogEvent,
) -> Result<Vec<u8>, ForwardError> {
    let head: Head = serde_json::from_slice(&event.canonical).map_err(|e| {
        ForwardError::Unavailable(format!(
            "seq {}: stored event lacks a header field: {e}",
            event.seq
        ))
    })?;
    assert_eq!(head.seq, event.seq, "the stored event carries its own seq");
    let pri = u16::from(facility) * 8 + u16::from(severity(&head.outcome, head.outcome_code));
    let mut m = format!(
        "<{pri}>1 {} {hostname} auditrail {procid} {} [{SD_ID} id=\"{}\" seq=\"{}\" outcome=\"{}\"] ",
        header_field(&head.recorded_at, 64),
        header_field(&head.action, 32),
        sd_value(&head.id),
        head.seq,
        sd_value(&head.outcome),
    )
    .into_bytes();
    m.extend_from_slice(&event.canonical);
    Ok(m)
}

/// The machine's host name, for HOSTNAME.
fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

struct Connection {
    writer: WriteHalf<TlsStream<TcpStream>>,
    /// Set by the reader task when the receiver closes the connection (it never sends data).
    closed: Arc<AtomicBool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

pub struct Syslog {
    address: String,
    server_name: rustls_pki_types::ServerName<'static>,
    connector: TlsConnector,
    connect_timeout: Duration,
    facility: u8,
    hostname: String,
    procid: u32,
    connection: Option<Connection>,
}

impl Syslog {
    pub fn new(config: &SyslogConfig) -> Result<Syslog, ForwardError> {
        let (host, _) = split_host_port(&config.address)
            .ok_or_else(|| ForwardError::config("forward.syslog.address", "must be host:port"))?;
        let name = if config.server_name.is_empty() { host } else { &config.server_name };
        let server_name = rustls_pki_types::ServerName::try_from(name.to_string())
            .map_err(|e| ForwardError::config("forward.syslog.server_name", e.to_string()))?;
        let client_cert = config.client_cert_file.as_deref().zip(config.client_key_file.as_deref());
        let tls = crate::tls::client_config(config.ca_file.as_deref(), client_cert)?;
        let facility = facility_code(&config.facility)
            .ok_or_else(|| ForwardError::config("forward.syslog.facility", "unknown facility"))?;
        let hostname =
            if config.hostname.is_empty() { system_hostname() } else { config.hostname.clone() };
        Ok(Syslog {
            address: config.address.clone(),
            server_name,
            connector: TlsConnector::from(Arc::new(tls)),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            facility,
            hostname: header_field(&hostname, 255),
            procid: std::process::id(),
            connection: None,
        })
    }

    async fn connect(&self) -> Result<Connection, ForwardError> {
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            ForwardError::Unavailable(format!("{what} {}: {e}", self.address))
        };
        let attempt = async {
            let tcp = TcpStream::connect(&self.address)
                .await
                .map_err(|e| unavailable("connecting to", &e))?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| unavailable("TLS handshake with", &e))
        };
        let tls = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| unavailable("connecting to", &"timed out"))??;
        let (mut read, writer) = tokio::io::split(tls);
        let closed = Arc::new(AtomicBool::new(false));
        let (hung_up, mut hang_up) = tokio::sync::watch::channel(false);
        let flag = closed.clone();
        let reader = tokio::spawn(async move {
            // The receiver never speaks; reading only notices when it hangs up.
            let mut buf = [0u8; 512];
            loop {
                match read.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            flag.store(true, Ordering::SeqCst);
            let _ = hung_up.send(true);
        });
        // In TLS 1.3 the client finishes its handshake before the server has checked the
        // client certificate, and a refusal arrives as an alert just after: wait a moment for
        // it, so a refused certificate is reported instead of silently losing what is written.
        if tokio::time::timeout(SETTLE, hang_up.wait_for(|closed| *closed)).await.is_ok() {
            reader.abort();
            return Err(ForwardError::Unavailable(format!(
                "{} closed the connection right after the TLS handshake (client certificate refused?)",
                self.address
            )));
        }
        Ok(Connection { writer, closed, reader })
    }

    /// Writes `events` as framed messages and flushes them.
    pub(crate) async fn send(&mut self, events: &[&LogEvent]) -> Result<Delivery, ForwardError> {
        let mut frames = Vec::new();
        let mut delivery = Delivery::default();
        for e in events {
            // A stored event always has these fields; one without them could never be sent,
            // so it is refused rather than retried forever.
            let m = match message(self.facility, &self.hostname, self.procid, e) {
                Ok(m) => m,
                Err(err) => {
                    delivery.failed.push(crate::FailedEvent {
                        seq: e.seq,
                        id: String::new(),
                        status: 0,
                        reason: err.to_string(),
                    });
                    continue;
                }
            };
            frames.extend_from_slice(format!("{} ", m.len()).as_bytes());
            frames.extend_from_slice(&m);
        }
        if self.connection.as_ref().is_some_and(|c| c.closed.load(Ordering::SeqCst)) {
            self.connection = None;
        }
        let connection = match &mut self.connection {
            Some(c) => c,
            None => self.connection.insert(self.connect().await?),
        };
        let written = async {
            connection.writer.write_all(&frames).await?;
            connection.writer.flush().await
        }
        .await;
        if let Err(e) = written {
            self.connection = None;
            return Err(ForwardError::Unavailable(format!("writing to {}: {e}", self.address)));
        }
        Ok(delivery)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(outcome: &str, code: Option<u8>) -> LogEvent {
        let mut v = serde_json::json!({
            "action": "patient.read", "id": "a\"b]", "outcome": outcome,
            "recorded_at": "2026-11-22T10:15:00.123Z", "seq": 7,
        });
        if let Some(c) = code {
            v["outcome_code"] = c.into();
        }
        LogEvent { seq: 7, recorded_at_ms: 0, canonical: v.to_string().into_bytes() }
    }

    #[test]
    fn message_layout_and_severities() {
        let m =
            String::from_utf8(message(10, "host-1", 42, &event("success", None)).unwrap()).unwrap();
        assert!(
            m.starts_with(
                "<85>1 2026-11-22T10:15:00.123Z host-1 auditrail 42 patient.read \
                 [auditrail@32473 id=\"a\\\"b\\]\" seq=\"7\" outcome=\"success\"] {"
            ),
            "{m}"
        );
        let cases = [
            ("failure", None, 4),
            ("failure", Some(4), 4),
            ("failure", Some(8), 3),
            ("failure", Some(12), 2),
        ];
        for (outcome, code, sev) in cases {
            assert_eq!(severity(outcome, code), sev);
            let m = message(23, "h", 1, &event(outcome, code)).unwrap();
            assert!(m.starts_with(format!("<{}>1 ", 23 * 8 + sev).as_bytes()));
        }
        assert_eq!(split_host_port("[::1]:6514"), Some(("::1", 6514)));
        assert_eq!(split_host_port("log.example.org:6514"), Some(("log.example.org", 6514)));
        assert_eq!(split_host_port("log.example.org"), None);
    }
}
