//! The forwarders' settings: the `[forward.elasticsearch]` and `[forward.syslog]` tables of the
//! server's TOML file, or `AUDITRAIL_FORWARD_ELASTICSEARCH_<KEY>` / `AUDITRAIL_FORWARD_SYSLOG_<KEY>`
//! variables. A forwarder is on when its `url` / `address` is set. docs/operations.md lists
//! every key.

use crate::ForwardError;
use serde::Deserialize;
use std::path::PathBuf;

/// A password or API key: read from the configuration, never printed.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardConfig {
    pub elasticsearch: ElasticsearchConfig,
    pub syslog: SyslogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ElasticsearchConfig {
    /// Base URL of the cluster (`https://es.example.org:9200`); empty turns the forwarder off.
    pub url: String,
    /// The index the events are written to.
    pub index: String,
    /// The name of the index template installed at start (`PUT _index_template/<name>`).
    pub template: String,
    /// Basic authentication (with `password`).
    pub username: String,
    pub password: Secret,
    /// `Authorization: ApiKey <api_key>` (the base64 `id:api_key` Elasticsearch hands out).
    pub api_key: Secret,
    /// PEM file of the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Most events in one `_bulk` request.
    pub batch_events_max: usize,
    /// How long one request may take before it counts as failed.
    pub request_timeout_ms: u64,
    /// First wait after a failure; doubles up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// How often the log is checked for new events once everything has been sent.
    pub poll_interval_ms: u64,
}

impl Default for ElasticsearchConfig {
    fn default() -> ElasticsearchConfig {
        ElasticsearchConfig {
            url: String::new(),
            index: "auditrail-events".into(),
            template: "auditrail-events".into(),
            username: String::new(),
            password: Secret::default(),
            api_key: Secret::default(),
            ca_file: None,
            batch_events_max: 500,
            request_timeout_ms: 30_000,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            poll_interval_ms: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyslogConfig {
    /// `host:port` of the syslog receiver (TLS, RFC 5425; 6514 is the usual port); empty
    /// turns the forwarder off.
    pub address: String,
    /// The name the server's certificate must carry; empty means the host part of `address`.
    pub server_name: String,
    /// PEM file of the CA certificates to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate chain and key, for receivers that authenticate clients.
    pub client_cert_file: Option<PathBuf>,
    pub client_key_file: Option<PathBuf>,
    /// Syslog facility: a name (`authpriv`, `local0`, ...) or a number 0..=23.
    pub facility: String,
    /// The HOSTNAME field; empty means this machine's host name.
    pub hostname: String,
    /// Most events written per flush.
    pub batch_events_max: usize,
    /// How long connecting (TCP and the TLS handshake) may take.
    pub connect_timeout_ms: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub poll_interval_ms: u64,
}

impl Default for SyslogConfig {
    fn default() -> SyslogConfig {
        SyslogConfig {
            address: String::new(),
            server_name: String::new(),
            ca_file: None,
            client_cert_file: None,
            client_key_file: None,
            facility: "authpriv".into(),
            hostname: String::new(),
            batch_events_max: 256,
            connect_timeout_ms: 10_000,
            backoff_initial_ms: 500,
            backoff_max_ms: 60_000,
            poll_interval_ms: 100,
        }
    }
}

/// Facility names of RFC 5424 section 6.2.1, in code order.
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "ntp", "audit", "alert", "clock", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

/// The facility code of a name or number.
pub fn facility_code(s: &str) -> Option<u8> {
    if let Ok(n) = s.parse::<u8>() {
        return (usize::from(n) < FACILITIES.len()).then_some(n);
    }
    FACILITIES.iter().position(|f| f.eq_ignore_ascii_case(s)).map(|p| p as u8)
}

fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
    v.parse().map_err(|_| format!("{v:?} is not a valid number"))
}

fn path(v: &str) -> Option<PathBuf> {
    (!v.is_empty()).then(|| PathBuf::from(v))
}

impl ForwardConfig {
    /// Sets `forward_<table>_<key>` from text (an `AUDITRAIL_*` variable, lower-cased).
    /// Returns `Ok(false)` for a name outside forwarding.
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool, String> {
        if let Some(key) = name.strip_prefix("forward_elasticsearch_") {
            let c = &mut self.elasticsearch;
            match key {
                "url" => c.url = value.trim_end_matches('/').to_string(),
                "index" => c.index = value.to_string(),
                "template" => c.template = value.to_string(),
                "username" => c.username = value.to_string(),
                "password" => c.password = Secret(value.to_string()),
                "api_key" => c.api_key = Secret(value.to_string()),
                "ca_file" => c.ca_file = path(value),
                "batch_events_max" => c.batch_events_max = num(value)?,
                "request_timeout_ms" => c.request_timeout_ms = num(value)?,
                "backoff_initial_ms" => c.backoff_initial_ms = num(value)?,
                "backoff_max_ms" => c.backoff_max_ms = num(value)?,
                "poll_interval_ms" => c.poll_interval_ms = num(value)?,
                _ => return Err(format!("unknown setting {name:?}")),
            }
            return Ok(true);
        }
        if let Some(key) = name.strip_prefix("forward_syslog_") {
            let c = &mut self.syslog;
            match key {
                "address" => c.address = value.to_string(),
                "server_name" => c.server_name = value.to_string(),
                "ca_file" => c.ca_file = path(value),
                "client_cert_file" => c.client_cert_file = path(value),
                "client_key_file" => c.client_key_file = path(value),
                "facility" => c.facility = value.to_string(),
                "hostname" => c.hostname = value.to_string(),
                "batch_events_max" => c.batch_events_max = num(value)?,
                "connect_timeout_ms" => c.connect_timeout_ms = num(value)?,
                "backoff_initial_ms" => c.backoff_initial_ms = num(value)?,
                "backoff_max_ms" => c.backoff_max_ms = num(value)?,
                "poll_interval_ms" => c.poll_interval_ms = num(value)?,
                _ => return Err(format!("unknown setting {name:?}")),
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Settings that only make sense together.
    pub fn check(&self) -> Result<(), ForwardError> {
        let es = &self.elasticsearch;
        if !es.url.is_empty() {
            let key = |k: &str| format!("forward.elasticsearch.{k}");
            if !(es.url.starts_with("https://") || es.url.starts_with("http://")) {
                return Err(ForwardError::config(
                    &key("url"),
                    "must start with https:// or http://",
                ));
            }
            if es.index.is_empty()
                || es.index.starts_with(['_', '-', '+'])
                || es.index.chars().any(|c| {
                    c.is_ascii_uppercase() || "\\/*?\"<>| ,#:".contains(c) || c.is_control()
                })
            {
                return Err(ForwardError::config(
                    &key("index"),
                    "must be a valid index name: lower case, no \\/*?\"<>| ,#: and not starting with _-+",
                ));
            }
            if es.template.is_empty() || es.template.contains(['/', '?', '#', ' ']) {
                return Err(ForwardError::config(&key("template"), "must be a plain name"));
            }
            if !es.api_key.0.is_empty() && !es.username.is_empty() {
                return Err(ForwardError::config(
                    &key("api_key"),
                    "set either api_key or username/password, not both",
                ));
            }
            check_common(
                "forward.elasticsearch",
                es.batch_events_max,
                es.backoff_initial_ms,
                es.backoff_max_ms,
            )?;
        }
        let sl = &self.syslog;
        if !sl.address.is_empty() {
            let key = |k: &str| format!("forward.syslog.{k}");
            if crate::syslog::split_host_port(&sl.address).is_none() {
                return Err(ForwardError::config(&key("address"), "must be host:port"));
            }
            if facility_code(&sl.facility).is_none() {
                return Err(ForwardError::config(
                    &key("facility"),
                    format!("{:?} is not a facility name or a number 0..=23", sl.facility),
                ));
            }
            if sl.client_cert_file.is_some() != sl.client_key_file.is_some() {
                return Err(ForwardError::config(
                    &key("client_key_file"),
                    "client_cert_file and client_key_file go together",
                ));
            }
            check_common(
                "forward.syslog",
                sl.batch_events_max,
                sl.backoff_initial_ms,
                sl.backoff_max_ms,
            )?;
        }
        Ok(())
    }
}

fn check_common(
    table: &str,
    batch_events_max: usize,
    backoff_initial_ms: u64,
    backoff_max_ms: u64,
) -> Result<(), ForwardError> {
    if !(1..=crate::limits::BATCH_EVENTS_MAX).contains(&batch_events_max) {
        return Err(ForwardError::config(
            &format!("{table}.batch_events_max"),
            format!("must be 1 to {}", crate::limits::BATCH_EVENTS_MAX),
        ));
    }
    if backoff_initial_ms == 0 || backoff_max_ms < backoff_initial_ms {
        return Err(ForwardError::config(
            &format!("{table}.backoff_max_ms"),
            "backoff_initial_ms must be at least 1 and at most backoff_max_ms",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facilities_by_name_and_number() {
        assert_eq!(facility_code("authpriv"), Some(10));
        assert_eq!(facility_code("LOCAL7"), Some(23));
        assert_eq!(facility_code("13"), Some(13));
        assert_eq!(facility_code("24"), None);
        assert_eq!(facility_code("nope"), None);
    }

    #[test]
    fn settings_from_text_and_their_checks() {
        let mut c = ForwardConfig::default();
        assert_eq!(c.set("listen", "x"), Ok(false));
        assert!(c.set("forward_elasticsearch_url", "http://127.0.0.1:9200/").unwrap());
        assert_eq!(c.elasticsearch.url, "http://127.0.0.1:9200");
        assert!(c.set("forward_elasticsearch_nope", "1").is_err());
        assert!(c.set("forward_syslog_batch_events_max", "lots").is_err());
        c.check().unwrap();
        c.set("forward_elasticsearch_index", "Bad Index").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("index"));
        c.set("forward_elasticsearch_index", "audit").unwrap();
        c.set("forward_syslog_address", "localhost").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("host:port"));
        c.set("forward_syslog_address", "localhost:6514").unwrap();
        c.set("forward_syslog_facility", "local9").unwrap();
        assert!(c.check().unwrap_err().to_string().contains("facility"));
        c.set("forward_syslog_facility", "local0").unwrap();
        c.check().unwrap();
        c.set("forward_elasticsearch_password", "hunter2hunter2").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
