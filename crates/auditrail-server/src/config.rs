//! Configuration: defaults, then a TOML file, then `AUDITRAIL_*` environment variables, then
//! command-line flags (applied by the binary). Every setting is documented in
//! `docs/operations.md`; unknown keys in the file are an error, so a typo is never ignored.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The data directory; initialised on first start.
    pub data: PathBuf,
    /// Address to listen on.
    pub listen: String,
    /// The log's name in checkpoints, used when initialising a new data directory.
    pub origin: String,
    /// Largest request body for one event or a JSON array of events.
    pub body_bytes_max: usize,
    /// Largest NDJSON body for the bulk endpoint.
    pub bulk_bytes_max: usize,
    /// Most events in one JSON array or one FHIR Bundle.
    pub batch_events_max: usize,
    /// Bytes of request bodies being ingested at once; beyond it requests get 503.
    pub ingest_bytes_in_flight_max: usize,
    /// How often a new checkpoint is published while the log grows.
    pub publish_interval_ms: u64,
    /// Bulk ingest waits while the index is this many events behind the log (0: never).
    pub index_lag_events_max: u64,
    /// Events per index segment file.
    pub index_memtable_rows_max: usize,
    /// Decoded log blocks kept in memory for reads.
    pub block_cache_bytes_max: usize,
    /// Largest page of a search.
    pub search_limit_max: usize,
    /// Most events in one evidence bundle (`GET /api/v1/events/evidence`).
    pub evidence_events_max: usize,
    /// The base URL clients reach this server at (`https://audit.example.org`), for FHIR
    /// `Location` headers and `fullUrl`s; empty means `http://` plus the request's `Host`.
    pub public_url: String,
    /// Days events are kept (counted from `recorded_at`); seven years by default.
    pub retention_days: u32,
    /// Per-project retention in days, overriding `retention_days`.
    pub retention_projects: std::collections::BTreeMap<String, u32>,
    /// Allows a retention under six years (the HIPAA minimum for documentation).
    pub retention_force: bool,
    /// How often the server purges what retention allows (0: only on request).
    pub retention_check_interval_ms: u64,
    /// A log segment rolls at this size (and at each UTC day): the unit retention purges.
    pub segment_bytes_max: u64,
    /// How often the server verifies the events published since the last verification
    /// (0: only on request).
    pub integrity_incremental_interval_ms: u64,
    /// How often the server audits the whole log (0: only on request).
    pub integrity_full_interval_ms: u64,
    /// Forwarding the log to Elasticsearch/OpenSearch and syslog (`[forward.elasticsearch]`,
    /// `[forward.syslog]`; `AUDITRAIL_FORWARD_ELASTICSEARCH_*`, `AUDITRAIL_FORWARD_SYSLOG_*`).
    pub forward: auditrail_forward::ForwardConfig,
    /// Alert rules and webhooks (`[alerts]`, `[[alerts.rules]]`, `[[alerts.webhooks]]`; see
    /// docs/alerts.md). `AUDITRAIL_ALERTS_ENABLED` turns evaluation off.
    pub alerts: crate::alerts::AlertsConfig,
    /// Where scheduled backups go (`s3://bucket/prefix`, `gs://…`, `az://…`, `file:///…`);
    /// empty: no scheduled backup. Credentials come from `AWS_*`, `GOOGLE_*`, `AZURE_*`.
    pub archive_url: String,
    /// Time between two backups (the delay after a failure starts at 500 ms and doubles up
    /// to this).
    pub archive_interval_ms: u64,
    /// Lifetime of an access token (a session refreshes it).
    pub access_token_ttl_ms: u64,
    /// A session ends after this long without a request.
    pub session_idle_timeout_ms: u64,
    /// A session ends this long after login, however active.
    pub session_lifetime_ms: u64,
    /// Concurrent sessions per user; a new login beyond it ends the oldest.
    pub sessions_per_user_max: usize,
    /// Failed logins in a row that lock an account.
    pub lockout_failures: u32,
    /// How long a lockout lasts.
    pub lockout_duration_ms: u64,
    /// Roles whose holders must enrol and use TOTP (`*`: everyone; empty: MFA optional).
    pub mfa_required_roles: Vec<String>,
    /// Longest break-glass elevation.
    pub break_glass_duration_max_ms: u64,
    /// Login and refresh attempts per client address per minute.
    pub auth_attempts_per_minute_max: u32,
    /// The server's certificate chain (PEM, leaf first); with `tls_key_file`, serve HTTPS.
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// The oldest TLS version accepted: 1.3, or 1.2 for old clients. Never older.
    pub tls_min_version: crate::tls::TlsVersion,
    /// CA certificates (PEM) client certificates must chain to, for `tls_client_auth`.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Which connections must present a client certificate: off, ingest (asked, required by
    /// the ingest routes), all (required in the handshake).
    pub tls_client_auth: crate::tls::ClientAuth,
    /// Development: serve HTTPS with a self-signed certificate for localhost kept in
    /// `<data>/tls/`.
    pub tls_self_signed: bool,
    /// Allows plain HTTP on a non-loopback address, for a TLS-terminating proxy in front.
    pub tls_plaintext_allowed: bool,
    /// Proxies (CIDR or address) whose `X-Forwarded-For` names the client; from anyone else
    /// the header is ignored, since a client could write it.
    pub trusted_proxies: Vec<String>,
    /// Object-storage URLs exports may be written to (`POST /api/v1/events/export`): the only
    /// way events leave when governance disables local export.
    pub export_destinations: Vec<String>,
    /// The master key file, best kept outside the data directory so that a copy of the
    /// directory alone is unreadable; unset: `<data>/keys/master.keys`. Must be mode 0600
    /// (or stricter).
    pub master_key_file: Option<PathBuf>,
    /// The privacy filter every ingest path runs (`[privacy]`; `AUDITRAIL_PRIVACY_*`): on by
    /// default with the built-in rules. docs/privacy.md.
    pub privacy: auditrail_core::privacy::PrivacyConfig,
    /// The master key text itself, from `AUDITRAIL_MASTER_KEYS` only (never from the file):
    /// for containers and secret managers.
    #[serde(skip)]
    pub master_keys: Option<MasterKeysText>,
}

/// Master key text from the environment; never printed.
#[derive(Clone, Default)]
pub struct MasterKeysText(pub String);

impl std::fmt::Debug for MasterKeysText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKeysText(..)")
    }
}

/// Bounds of `segment_bytes_max`.
const SEGMENT_BYTES_MIN: u64 = 64 << 10;
const SEGMENT_BYTES_MAX: u64 = 1 << 30;

/// The largest `evidence_events_max`: a bundle streams, but its list of seqs, its pre-checks
/// and its proofs are all made before the first byte.
const EVIDENCE_EVENTS_MAX: usize = 1_000_000;

/// Bounds of `index_memtable_rows_max`.
const INDEX_SEGMENT_ROWS_MIN: usize = 1024;
const INDEX_SEGMENT_ROWS_MAX: usize = 1 << 22;

impl Default for Config {
    fn default() -> Config {
        Config {
            data: PathBuf::from("./auditrail-data"),
            listen: "127.0.0.1:8600".into(),
            origin: "auditrail.local/log".into(),
            body_bytes_max: 8 << 20,
            bulk_bytes_max: 1 << 30,
            batch_events_max: 10_000,
            ingest_bytes_in_flight_max: 256 << 20,
            publish_interval_ms: 1000,
            index_lag_events_max: 50_000,
            index_memtable_rows_max: 1 << 18,
            block_cache_bytes_max: 256 << 20,
            search_limit_max: 1000,
            evidence_events_max: 10_000,
            public_url: String::new(),
            retention_days: auditrail_store::retention::RETENTION_DAYS_DEFAULT,
            retention_projects: std::collections::BTreeMap::new(),
            retention_force: false,
            retention_check_interval_ms: 3_600_000,
            segment_bytes_max: 64 << 20,
            integrity_incremental_interval_ms: 300_000,
            integrity_full_interval_ms: 86_400_000,
            forward: auditrail_forward::ForwardConfig::default(),
            alerts: crate::alerts::AlertsConfig::default(),
            archive_url: String::new(),
            archive_interval_ms: 300_000,
            access_token_ttl_ms: 5 * 60_000,
            session_idle_timeout_ms: 30 * 60_000,
            session_lifetime_ms: 12 * 3_600_000,
            sessions_per_user_max: 5,
            lockout_failures: 5,
            lockout_duration_ms: 30 * 60_000,
            mfa_required_roles: vec!["admin".into()],
            break_glass_duration_max_ms: 4 * 3_600_000,
            auth_attempts_per_minute_max: 20,
            tls_cert_file: None,
            tls_key_file: None,
            tls_min_version: crate::tls::TlsVersion::V1_3,
            tls_client_ca_file: None,
            tls_client_auth: crate::tls::ClientAuth::Off,
            tls_self_signed: false,
            tls_plaintext_allowed: false,
            trusted_proxies: Vec::new(),
            export_destinations: Vec::new(),
            master_key_file: None,
            privacy: auditrail_core::privacy::PrivacyConfig::default(),
            master_keys: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
}

impl Config {
    /// The session and login rules for [`crate::auth::Auth`].
    pub fn auth_settings(&self) -> crate::auth::AuthSettings {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        crate::auth::AuthSettings {
            access_token_ttl_ms: ms(self.access_token_ttl_ms),
            session_idle_timeout_ms: ms(self.session_idle_timeout_ms),
            session_lifetime_ms: ms(self.session_lifetime_ms),
            sessions_per_user_max: self.sessions_per_user_max,
            lockout_failures: self.lockout_failures,
            lockout_duration_ms: ms(self.lockout_duration_ms),
            mfa_required_roles: self.mfa_required_roles.iter().cloned().collect(),
            break_glass_duration_max_ms: ms(self.break_glass_duration_max_ms),
            issuer: self.origin.clone(),
        }
    }

    /// Defaults, overridden by `file` (if given) and then by the environment.
    pub fn load(
        file: Option<&std::path::Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut config = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.display().to_string(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: path.display().to_string(),
                    message: e.message().to_string(),
                })?
            }
            None => Config::default(),
        };
        for (name, value) in env {
            let Some(key) = name.strip_prefix("AUDITRAIL_") else { continue };
            config
                .set(&key.to_ascii_lowercase(), &value)
                .map_err(|message| ConfigError::Env { name: name.clone(), message })?;
        }
        config.check().map_err(|message| ConfigError::Parse {
            path: file.map_or("(defaults and environment)".into(), |p| p.display().to_string()),
            message,
        })?;
        Ok(config)
    }

    /// Settings that only make sense together. A body larger than the ingest budget could
    /// never be admitted and would be answered 503 forever.
    pub fn check(&self) -> Result<(), String> {
        if self.body_bytes_max > self.ingest_bytes_in_flight_max {
            return Err(format!(
                "body_bytes_max ({}) must not exceed ingest_bytes_in_flight_max ({})",
                self.body_bytes_max, self.ingest_bytes_in_flight_max
            ));
        }
        let url = &self.public_url;
        if !(url.is_empty() || url.starts_with("https://") || url.starts_with("http://")) {
            return Err(format!("public_url ({url}) must start with https:// or http://"));
        }
        if self.batch_events_max == 0 || self.search_limit_max == 0 {
            return Err("batch_events_max and search_limit_max must be at least 1".into());
        }
        if !(1..=EVIDENCE_EVENTS_MAX).contains(&self.evidence_events_max) {
            return Err(format!(
                "evidence_events_max ({}) must be 1 to {EVIDENCE_EVENTS_MAX}",
                self.evidence_events_max
            ));
        }
        if self.archive_interval_ms == 0 {
            return Err("archive_interval_ms must be at least 1".into());
        }
        // An index segment addresses its term and posting bytes with u32 offsets.
        if !(INDEX_SEGMENT_ROWS_MIN..=INDEX_SEGMENT_ROWS_MAX)
            .contains(&self.index_memtable_rows_max)
        {
            return Err(format!(
                "index_memtable_rows_max ({}) must be {INDEX_SEGMENT_ROWS_MIN} to {INDEX_SEGMENT_ROWS_MAX}",
                self.index_memtable_rows_max
            ));
        }
        if !(SEGMENT_BYTES_MIN..=SEGMENT_BYTES_MAX).contains(&self.segment_bytes_max) {
            return Err(format!(
                "segment_bytes_max ({}) must be {SEGMENT_BYTES_MIN} to {SEGMENT_BYTES_MAX}",
                self.segment_bytes_max
            ));
        }
        if self.access_token_ttl_ms < 10_000 || self.session_idle_timeout_ms < 60_000 {
            return Err("access_token_ttl_ms must be at least 10000 and session_idle_timeout_ms at least 60000".into());
        }
        if self.session_lifetime_ms < self.session_idle_timeout_ms {
            return Err("session_lifetime_ms must be at least session_idle_timeout_ms".into());
        }
        if self.sessions_per_user_max == 0
            || self.lockout_failures == 0
            || self.auth_attempts_per_minute_max == 0
        {
            return Err("sessions_per_user_max, lockout_failures and auth_attempts_per_minute_max must be at least 1".into());
        }
        for role in &self.mfa_required_roles {
            if role != "*" && !crate::auth::roles::valid_name(role) {
                return Err(format!("mfa_required_roles: {role:?} is not a role name"));
            }
        }
        for proxy in &self.trusted_proxies {
            if crate::auth::accounts::parse_network(proxy).is_none() {
                return Err(format!(
                    "trusted_proxies: {proxy:?} is not an address or CIDR network"
                ));
            }
        }
        for url in &self.export_destinations {
            auditrail_archive::destination::Destination::open(url)
                .map_err(|e| format!("export_destinations: {e}"))?;
        }
        // A bad pattern stops the server at start, never the first event that reaches it.
        auditrail_core::privacy::Filter::new(&self.privacy).map_err(|e| e.to_string())?;
        crate::retention::policy(self).check(self.retention_force)?;
        self.master_key_source()?;
        self.forward.check().map_err(|e| e.to_string())?;
        self.alerts.check()?;
        crate::tls::check(self)?;
        Ok(())
    }

    /// HTTPS is on: a certificate is configured or the self-signed one is asked for.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some() || self.tls_self_signed
    }

    /// Where the master keys come from (`master_key_file` or `AUDITRAIL_MASTER_KEYS`; both is
    /// an error).
    pub fn master_key_source(&self) -> Result<auditrail_store::keys::MasterKeySource, String> {
        auditrail_store::keys::MasterKeySource::new(
            self.master_key_file.clone(),
            self.master_keys.as_ref().map(|t| t.0.clone()),
        )
    }

    /// Sets one setting from text; unknown names are errors.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        fn num<T: std::str::FromStr>(v: &str) -> Result<T, String> {
            v.parse().map_err(|_| format!("{v:?} is not a valid number"))
        }
        /// A comma-separated list, blanks dropped (`a, b,` is `["a", "b"]`; empty is none).
        fn list(value: &str) -> Vec<String> {
            value.split(',').map(str::trim).filter(|v| !v.is_empty()).map(String::from).collect()
        }

        fn flag(v: &str) -> Result<bool, String> {
            match v {
                "true" | "1" => Ok(true),
                "false" | "0" => Ok(false),
                _ => Err(format!("{v:?} is not true or false")),
            }
        }
        fn path(v: &str) -> Option<PathBuf> {
            (!v.is_empty()).then(|| PathBuf::from(v))
        }
        if self.forward.set(key, value)? {
            return Ok(());
        }
        // `AUDITRAIL_PRIVACY_PATTERN_MRN='MRN-?[0-9]{6,10}'`: one variable per pattern, since a
        // regular expression may hold any separator; empty removes it.
        if let Some(name) = key.strip_prefix("privacy_pattern_") {
            match value {
                "" => self.privacy.patterns.remove(name),
                _ => self.privacy.patterns.insert(name.to_string(), value.to_string()),
            };
            return Ok(());
        }
        match key {
            "data" => self.data = PathBuf::from(value),
            "alerts_enabled" => self.alerts.enabled = flag(value)?,
            "listen" => self.listen = value.to_string(),
            "origin" => self.origin = value.to_string(),
            "body_bytes_max" => self.body_bytes_max = num(value)?,
            "bulk_bytes_max" => self.bulk_bytes_max = num(value)?,
            "batch_events_max" => self.batch_events_max = num(value)?,
            "ingest_bytes_in_flight_max" => self.ingest_bytes_in_flight_max = num(value)?,
            "publish_interval_ms" => self.publish_interval_ms = num(value)?,
            "index_lag_events_max" => self.index_lag_events_max = num(value)?,
            "index_memtable_rows_max" => self.index_memtable_rows_max = num(value)?,
            "block_cache_bytes_max" => self.block_cache_bytes_max = num(value)?,
            "search_limit_max" => self.search_limit_max = num(value)?,
            "evidence_events_max" => self.evidence_events_max = num(value)?,
            "public_url" => self.public_url = value.trim_end_matches('/').to_string(),
            "retention_days" => self.retention_days = num(value)?,
            // `project=days,project=days`
            "retention_projects" => {
                self.retention_projects = value
                    .split(',')
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| {
                        let (name, days) = p
                            .split_once('=')
                            .ok_or_else(|| format!("{p:?} is not project=days"))?;
                        Ok((name.trim().to_string(), num(days.trim())?))
                    })
                    .collect::<Result<_, String>>()?
            }
            "retention_force" => {
                self.retention_force = match value {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => return Err(format!("{value:?} is not true or false")),
                }
            }
            "retention_check_interval_ms" => self.retention_check_interval_ms = num(value)?,
            "segment_bytes_max" => self.segment_bytes_max = num(value)?,
            "integrity_incremental_interval_ms" => {
                self.integrity_incremental_interval_ms = num(value)?
            }
            "integrity_full_interval_ms" => self.integrity_full_interval_ms = num(value)?,
            "archive_url" => self.archive_url = value.to_string(),
            "archive_interval_ms" => self.archive_interval_ms = num(value)?,
            "access_token_ttl_ms" => self.access_token_ttl_ms = num(value)?,
            "session_idle_timeout_ms" => self.session_idle_timeout_ms = num(value)?,
            "session_lifetime_ms" => self.session_lifetime_ms = num(value)?,
            "sessions_per_user_max" => self.sessions_per_user_max = num(value)?,
            "lockout_failures" => self.lockout_failures = num(value)?,
            "lockout_duration_ms" => self.lockout_duration_ms = num(value)?,
            // `admin,security_officer`, `*`, or empty
            "mfa_required_roles" => self.mfa_required_roles = list(value),
            "break_glass_duration_max_ms" => self.break_glass_duration_max_ms = num(value)?,
            "auth_attempts_per_minute_max" => self.auth_attempts_per_minute_max = num(value)?,
            "tls_cert_file" => self.tls_cert_file = path(value),
            "tls_key_file" => self.tls_key_file = path(value),
            "tls_min_version" => self.tls_min_version = value.parse()?,
            "tls_client_ca_file" => self.tls_client_ca_file = path(value),
            "tls_client_auth" => self.tls_client_auth = value.parse()?,
            "tls_self_signed" => self.tls_self_signed = flag(value)?,
            "tls_plaintext_allowed" => self.tls_plaintext_allowed = flag(value)?,
            // `s3://exports/audit,file:///srv/exports`, or empty
            "export_destinations" => self.export_destinations = list(value),
            // `10.0.0.0/8,192.0.2.10`, or empty
            "trusted_proxies" => self.trusted_proxies = list(value),
            "privacy_enabled" => self.privacy.enabled = flag(value)?,
            // `phone,dob`, or empty
            "privacy_disabled_rules" => self.privacy.disabled_rules = list(value),
            // `pin_code,otp`, or empty
            "privacy_secret_fields" => self.privacy.secret_fields = list(value),
            "privacy_secret_field_action" => self.privacy.secret_field_action = value.parse()?,
            "master_key_file" => {
                self.master_key_file = (!value.is_empty()).then(|| PathBuf::from(value))
            }
            "master_keys" => {
                self.master_keys =
                    (!value.trim().is_empty()).then(|| MasterKeysText(value.to_string()))
            }
            // Variables the binary reads itself.
            "config" => {}
            _ => return Err(format!("unknown setting {key:?}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        std::fs::write(&path, "listen = \"0.0.0.0:9000\"\nbatch_events_max = 5\n").unwrap();
        let env = [("AUDITRAIL_BATCH_EVENTS_MAX".to_string(), "7".to_string())];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!((c.listen.as_str(), c.batch_events_max), ("0.0.0.0:9000", 7));

        std::fs::write(&path, "lisen = \"x\"\n").unwrap();
        let e = Config::load(Some(&path), []).unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let env = [("AUDITRAIL_BODY_BYTES_MAX".to_string(), "lots".to_string())];
        assert!(Config::load(None, env).is_err());
        let env = [("AUDITRAIL_INGEST_BYTES_IN_FLIGHT_MAX".to_string(), "1000".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("must not exceed"), "{e}");
        for rows in ["0", "8388608"] {
            let env = [("AUDITRAIL_INDEX_MEMTABLE_ROWS_MAX".to_string(), rows.to_string())];
            let e = Config::load(None, env).unwrap_err().to_string();
            assert!(e.contains("index_memtable_rows_max"), "{e}");
        }
        let env = [("AUDITRAIL_INDEX_MEMTABLE_ROWS_MAX".to_string(), "4096".to_string())];
        assert_eq!(Config::load(None, env).unwrap().index_memtable_rows_max, 4096);
        std::fs::write(&path, "trusted_proxies = [\"10.0.0.0/8\", \"192.0.2.7\"]\n").unwrap();
        assert_eq!(
            Config::load(Some(&path), []).unwrap().trusted_proxies,
            ["10.0.0.0/8", "192.0.2.7"]
        );
        let env = [("AUDITRAIL_TRUSTED_PROXIES".to_string(), "10.0.0.0/8, proxy.lan".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("proxy.lan"), "{e}");
        std::fs::write(&path, "archive_url = \"s3://b/p\"\narchive_interval_ms = 60000\n").unwrap();
        let env = [("AUDITRAIL_ARCHIVE_INTERVAL_MS".to_string(), "1000".to_string())];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!((c.archive_url.as_str(), c.archive_interval_ms), ("s3://b/p", 1000));
    }

    #[test]
    fn retention_under_six_years_needs_force() {
        let days = |v: &str| [("AUDITRAIL_RETENTION_DAYS".to_string(), v.to_string())];
        assert_eq!(Config::load(None, []).unwrap().retention_days, 2557);
        let e = Config::load(None, days("365")).unwrap_err().to_string();
        assert!(e.contains("six years") && e.contains("retention_force"), "{e}");
        let forced = [days("365")[0].clone(), ("AUDITRAIL_RETENTION_FORCE".into(), "true".into())];
        assert_eq!(Config::load(None, forced).unwrap().retention_days, 365);
        let env =
            [("AUDITRAIL_RETENTION_PROJECTS".to_string(), "trial=3650, quick=30".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("project \"quick\""), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        std::fs::write(&path, "[retention_projects]\ntrial = 3650\n").unwrap();
        assert_eq!(Config::load(Some(&path), []).unwrap().retention_projects["trial"], 3650);
    }

    #[test]
    fn forwarding_tables_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        let text = "[forward.elasticsearch]\nurl = \"https://es.example.org:9200\"\nindex = \"audit\"\n\
                    [forward.syslog]\naddress = \"logs.example.org:6514\"\nfacility = \"local3\"\n";
        std::fs::write(&path, text).unwrap();
        let env = [
            ("AUDITRAIL_FORWARD_ELASTICSEARCH_API_KEY".to_string(), "a2V5".to_string()),
            ("AUDITRAIL_FORWARD_SYSLOG_BATCH_EVENTS_MAX".to_string(), "32".to_string()),
        ];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!(c.forward.elasticsearch.url, "https://es.example.org:9200");
        assert_eq!(c.forward.elasticsearch.index, "audit");
        assert_eq!(c.forward.elasticsearch.api_key.0, "a2V5");
        assert_eq!(
            (c.forward.syslog.facility.as_str(), c.forward.syslog.batch_events_max),
            ("local3", 32)
        );

        std::fs::write(&path, "[forward.elasticsearch]\nurll = \"x\"\n").unwrap();
        let e = Config::load(Some(&path), []).unwrap_err().to_string();
        assert!(e.contains("urll"), "{e}");
        let env = [("AUDITRAIL_FORWARD_SYSLOG_PORT".to_string(), "1".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("forward_syslog_port"), "{e}");
        let env = [("AUDITRAIL_FORWARD_SYSLOG_ADDRESS".to_string(), "nohost".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("host:port"), "{e}");
    }
}

#[cfg(test)]
mod privacy_tests {
    use super::*;
    use auditrail_core::privacy::SecretFieldAction;

    #[test]
    fn privacy_table_then_environment_and_bad_patterns_stop_the_start() {
        assert!(Config::load(None, []).unwrap().privacy.enabled, "on by default");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        let text = "[privacy]\ndisabled_rules = [\"phone\"]\nsecret_fields = [\"pin\"]\n\
                    secret_field_action = \"drop\"\n[privacy.patterns]\nmrn = 'MRN-?\\d{6,10}'\n";
        std::fs::write(&path, text).unwrap();
        let env = [
            ("AUDITRAIL_PRIVACY_SECRET_FIELDS".to_string(), "pin, otp".to_string()),
            ("AUDITRAIL_PRIVACY_PATTERN_BADGE".to_string(), "B[0-9]{5}".to_string()),
        ];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!(c.privacy.disabled_rules, ["phone"]);
        assert_eq!(c.privacy.secret_fields, ["pin", "otp"]);
        assert_eq!(c.privacy.secret_field_action, SecretFieldAction::Drop);
        assert_eq!(c.privacy.patterns["mrn"], r"MRN-?\d{6,10}");
        assert_eq!(c.privacy.patterns["badge"], "B[0-9]{5}");

        let env = [("AUDITRAIL_PRIVACY_PATTERN_MRN".to_string(), "MRN[0-9".to_string())];
        let e = Config::load(Some(&path), env).unwrap_err().to_string();
        assert!(e.contains("privacy: patterns.mrn: not a valid regular expression"), "{e}");
        let env = [("AUDITRAIL_PRIVACY_DISABLED_RULES".to_string(), "fone".to_string())];
        let e = Config::load(None, env).unwrap_err().to_string();
        assert!(e.contains("\"fone\" is not a built-in rule"), "{e}");
        let env = [("AUDITRAIL_PRIVACY_SECRET_FIELD_ACTION".to_string(), "hide".to_string())];
        assert!(Config::load(None, env).unwrap_err().to_string().contains("mask or drop"));
        std::fs::write(&path, "[privacy]\nenable = false\n").unwrap();
        assert!(Config::load(Some(&path), []).unwrap_err().to_string().contains("enable"));
    }
}

#[cfg(test)]
mod master_key_tests {
    use super::*;
    use auditrail_store::keys::MasterKeySource;

    #[test]
    fn master_keys_from_a_file_setting_or_the_environment_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        std::fs::write(&path, "master_key_file = \"/etc/auditrail/master.keys\"\n").unwrap();
        let c = Config::load(Some(&path), []).unwrap();
        assert!(
            matches!(c.master_key_source().unwrap(), MasterKeySource::File(p) if p.ends_with("master.keys"))
        );
        let env = [("AUDITRAIL_MASTER_KEY_FILE".to_string(), "/run/secrets/mk".to_string())];
        let c = Config::load(Some(&path), env).unwrap();
        assert_eq!(c.master_key_file.as_deref(), Some(std::path::Path::new("/run/secrets/mk")));

        let text = "1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n".to_string();
        let env = [("AUDITRAIL_MASTER_KEYS".to_string(), text.clone())];
        let c = Config::load(None, env.clone()).unwrap();
        assert!(matches!(c.master_key_source().unwrap(), MasterKeySource::Env(_)));
        assert!(!format!("{c:?}").contains("AAAAAAAA"), "the key text is never printed");
        let e = Config::load(Some(&path), env).unwrap_err().to_string();
        assert!(e.contains("AUDITRAIL_MASTER_KEYS") && e.contains("only one"), "{e}");
        assert!(matches!(
            Config::load(None, []).unwrap().master_key_source().unwrap(),
            MasterKeySource::DataDir
        ));
    }
}
