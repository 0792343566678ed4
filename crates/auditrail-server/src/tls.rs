//! HTTPS for the server: rustls with the ring provider, TLS 1.3 only unless
//! `tls_min_version = "1.2"` (never older), optional client certificates, a development
//! self-signed certificate, and the certificate re-read on SIGHUP.
//!
//! Handshakes run in their own tasks under a deadline, so a slow or hostile client never holds
//! up accepting others. Handlers learn who connected from [`Peer`] (see [`peer`]), for plain
//! and TLS connections alike.

use crate::Config;
use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha2::Digest as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::server::TlsStream;

/// A TLS handshake must finish within this, or the connection is dropped.
pub const HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// Handshakes in progress at once; beyond it accepting pauses and new connections wait in the
/// kernel's backlog, so a flood of half-open handshakes cannot exhaust memory.
pub const HANDSHAKES_IN_FLIGHT_MAX: usize = 1024;

/// The oldest TLS version the server accepts (`tls_min_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

impl std::str::FromStr for TlsVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<TlsVersion, String> {
        match s {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err(format!("{s:?} is not a TLS version auditrail accepts: 1.3, or 1.2")),
        }
    }
}

/// Which connections must show a client certificate (`tls_client_auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    Off,
    /// Asked for in every handshake, not required by it: a certificate that is shown must
    /// chain to the CA, and the ingest routes refuse requests without one.
    Ingest,
    /// Required in the handshake: no certificate chaining to the CA, no connection.
    All,
}

impl std::str::FromStr for ClientAuth {
    type Err = String;
    fn from_str(s: &str) -> Result<ClientAuth, String> {
        match s {
            "off" => Ok(ClientAuth::Off),
            "ingest" => Ok(ClientAuth::Ingest),
            "all" => Ok(ClientAuth::All),
            _ => Err(format!("{s:?} is not off, ingest or all")),
        }
    }
}

/// Who is on the other end of a connection; every request carries it as
/// `ConnectInfo<Peer>`.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The client certificate the handshake verified against `tls_client_ca_file`.
    pub client_cert: Option<ClientCert>,
}

/// A verified client certificate.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The subject as an RFC 4514 string (`CN=ehr,O=Hospital`); empty if it cannot be read.
    pub subject: String,
    /// SHA-256 of the certificate's DER, lower-case hex: stable for pinning in access rules.
    pub sha256: String,
}

impl ClientCert {
    pub fn from_der(der: &[u8]) -> ClientCert {
        ClientCert {
            subject: subject(der).unwrap_or_default(),
            sha256: crate::ingest::hex(&sha2::Sha256::digest(der)),
        }
    }
}

/// The connection a request came on (absent when the router runs without connect info, as in
/// tests driving `app` directly).
pub fn peer(req_extensions: &axum::http::Extensions) -> Option<&Peer> {
    req_extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0)
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        Peer { addr: *stream.remote_addr(), client_cert: None }
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Peer {
        let (_, session) = stream.io().get_ref();
        // rustls only keeps certificates its verifier accepted.
        let client_cert =
            session.peer_certificates().and_then(|c| c.first()).map(|c| ClientCert::from_der(c));
        Peer { addr: *stream.remote_addr(), client_cert }
    }
}

/// Settings that only make sense together.
pub(crate) fn check(c: &Config) -> Result<(), String> {
    if c.tls_cert_file.is_some() != c.tls_key_file.is_some() {
        return Err("tls_cert_file and tls_key_file go together: set both or neither".into());
    }
    if c.tls_self_signed && c.tls_cert_file.is_some() {
        return Err("tls_self_signed and tls_cert_file exclude each other: the self-signed \
                    certificate is for development; remove one"
            .into());
    }
    match (c.tls_client_auth, &c.tls_client_ca_file) {
        (ClientAuth::Off, Some(_)) => {
            return Err("tls_client_ca_file is set but tls_client_auth is off: set \
                        tls_client_auth to ingest or all, or remove tls_client_ca_file"
                .into());
        }
        (ClientAuth::Ingest | ClientAuth::All, None) => {
            return Err("tls_client_auth needs tls_client_ca_file, the CA (PEM) client \
                        certificates must chain to"
                .into());
        }
        _ => {}
    }
    if c.tls_client_auth != ClientAuth::Off && !c.tls_enabled() {
        return Err("tls_client_auth needs TLS: set tls_cert_file and tls_key_file".into());
    }
    Ok(())
}

/// Plain HTTP only on loopback: anywhere else audit events and queries (PHI) would cross the
/// network in clear text.
pub fn check_listen(c: &Config, addrs: &[SocketAddr]) -> Result<(), String> {
    if c.tls_enabled() || c.tls_plaintext_allowed {
        return Ok(());
    }
    match addrs.iter().find(|a| !a.ip().to_canonical().is_loopback()) {
        Some(a) => Err(format!(
            "refusing plain HTTP on {a}, which is not a loopback address: set tls_cert_file and \
             tls_key_file (or --tls-self-signed for development), or set \
             tls_plaintext_allowed = true if a TLS-terminating proxy is in front"
        )),
        None => Ok(()),
    }
}

/// The server's TLS: where its files are and the configuration new handshakes use, replaced
/// whole by [`Tls::reload`].
pub struct Tls {
    files: Files,
    current: RwLock<Arc<ServerConfig>>,
}

/// The settings a [`ServerConfig`] is built from, kept to build it again on reload.
struct Files {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca_file: Option<PathBuf>,
    min_version: TlsVersion,
    client_auth: ClientAuth,
}

impl Tls {
    /// `None` when TLS is off. With `tls_self_signed`, creates the certificate on first use.
    pub fn from_config(c: &Config) -> Result<Option<Arc<Tls>>, String> {
        let (cert_file, key_file) = match (&c.tls_cert_file, &c.tls_key_file) {
            (Some(cert), Some(key)) => (cert.clone(), key.clone()),
            _ if c.tls_self_signed => self_signed(&c.data)?,
            _ => return Ok(None),
        };
        let files = Files {
            cert_file,
            key_file,
            client_ca_file: c.tls_client_ca_file.clone(),
            min_version: c.tls_min_version,
            client_auth: c.tls_client_auth,
        };
        let (config, fingerprint) = files.server_config()?;
        if c.tls_self_signed {
            let cert = files.cert_file.display();
            eprintln!(
                "auditrail: TLS with the self-signed development certificate {cert} \
                 (SHA-256 {fingerprint}); clients: curl --cacert {cert}"
            );
        }
        Ok(Some(Arc::new(Tls { files, current: RwLock::new(config) })))
    }

    /// Reads the files again; on success new handshakes use them and the certificate's
    /// SHA-256 fingerprint is returned. On failure nothing changes.
    pub fn reload(&self) -> Result<String, String> {
        let (config, fingerprint) = self.files.server_config()?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(fingerprint)
    }

    pub fn cert_file(&self) -> &Path {
        &self.files.cert_file
    }

    pub fn listener(self: &Arc<Tls>, tcp: TcpListener) -> TlsListener {
        TlsListener { tcp, tls: self.clone(), handshakes: JoinSet::new() }
    }

    fn current(&self) -> Arc<ServerConfig> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Files {
    fn server_config(&self) -> Result<(Arc<ServerConfig>, String), String> {
        let chain = certificates(&self.cert_file)?;
        let key = PrivateKeyDer::from_pem_file(&self.key_file)
            .map_err(|e| format!("{}: {e}", self.key_file.display()))?;
        let fingerprint = fingerprint(&chain[0]);
        let mut provider = rustls::crypto::ring::default_provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            TlsVersion::V1_3 => {
                provider.cipher_suites.retain(|s| s.version() == &rustls::version::TLS13);
                &[&rustls::version::TLS13]
            }
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        };
        let provider = Arc::new(provider);
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| format!("TLS setup: {e}"))?;
        let builder = match (self.client_auth, &self.client_ca_file) {
            (ClientAuth::Off, _) => builder.with_no_client_auth(),
            (_, None) => return Err("tls_client_auth needs tls_client_ca_file".into()),
            (_, Some(ca_file)) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in certificates(ca_file)? {
                    roots.add(cert).map_err(|e| format!("{}: {e}", ca_file.display()))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = match self.client_auth {
                    ClientAuth::Ingest => verifier.allow_unauthenticated(),
                    _ => verifier,
                };
                builder.with_client_cert_verifier(
                    verifier.build().map_err(|e| format!("{}: {e}", ca_file.display()))?,
                )
            }
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            format!("{} and {}: {e}", self.cert_file.display(), self.key_file.display())
        })?;
        // axum serves HTTP/1.1 only; saying so lets clients that offer h2 settle at once.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok((Arc::new(config), fingerprint))
    }
}

/// Re-reads the certificate and key on every SIGHUP. A bad file is reported and the previous
/// certificate stays in use: a typo during rotation must not take the service down.
pub async fn reload_on_sighup(tls: Arc<Tls>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let t = tls.clone();
        match tokio::task::spawn_blocking(move || t.reload()).await {
            Ok(Ok(fingerprint)) => eprintln!(
                "auditrail: SIGHUP: reloaded the TLS certificate {} (SHA-256 {fingerprint})",
                tls.cert_file().display()
            ),
            Ok(Err(e)) => eprintln!(
                "auditrail: SIGHUP: cannot reload TLS ({e}); still serving the previous certificate"
            ),
            Err(e) => eprintln!(
                "auditrail: SIGHUP: TLS reload failed ({e}); still serving the previous certificate"
            ),
        }
    }
}

/// A TCP listener whose connections come out with their TLS handshake done.
pub struct TlsListener {
    tcp: TcpListener,
    tls: Arc<Tls>,
    /// Handshakes in progress, each its own task; dropping the listener aborts them.
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    /// Starts a handshake with the configuration current now, in its own task.
    fn handshake(&mut self, stream: TcpStream, addr: SocketAddr) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.current());
        self.handshakes.spawn(async move {
            let deadline = Duration::from_millis(HANDSHAKE_TIMEOUT_MS);
            match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => Some((stream, addr)),
                // Failed handshakes are the client's problem (scanners, a wrong CA, old TLS)
                // and go unreported, so that they cannot flood stderr.
                _ => None,
            }
        });
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    /// Cancel-safe, as axum needs on shutdown: both branches only take what is ready.
    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let room = self.handshakes.len() < HANDSHAKES_IN_FLIGHT_MAX;
            tokio::select! {
                accepted = self.tcp.accept(), if room => match accepted {
                    Ok((stream, addr)) => self.handshake(stream, addr),
                    Err(e) => accept_error(e).await,
                },
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(connection)) = done {
                        return connection;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// As axum's own TCP listener: a connection that died before accept is nothing; anything else
/// (out of file descriptors) gets a second's pause instead of a busy loop.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if !matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset) {
        eprintln!("auditrail: accept: {e}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Security headers on every response. HSTS only over TLS: sent over plain HTTP it is ignored
/// by browsers and would only mislead. Handlers' own `Cache-Control` (the log's tiles are
/// immutable and cacheable) is kept; everything else is `no-store`, as audit data is PHI.
pub(crate) fn security_headers(mut res: Response, tls: bool) -> Response {
    let h = res.headers_mut();
    if tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000; includeSubDomains"),
        );
    }
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
    h.entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    res
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

/// SHA-256 of a certificate's DER as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint(der: &[u8]) -> String {
    let hex = crate::ingest::hex(&sha2::Sha256::digest(der)).to_ascii_uppercase();
    hex.as_bytes().chunks(2).map(|p| String::from_utf8_lossy(p)).collect::<Vec<_>>().join(":")
}

/// `<data>/tls/self-signed.{crt,key}`, created on first use for localhost, 127.0.0.1 and ::1,
/// then reused, so a client trusting it once keeps working across restarts.
fn self_signed(data: &Path) -> Result<(PathBuf, PathBuf), String> {
    let dir = data.join("tls");
    let (cert_file, key_file) = (dir.join("self-signed.crt"), dir.join("self-signed.key"));
    if cert_file.exists() && key_file.exists() {
        return Ok((cert_file, key_file));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let names = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "auditrail self-signed (development only)");
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot generate a key: {e}"))?;
    let cert = params.self_signed(&key).map_err(|e| format!("cannot make a certificate: {e}"))?;
    // The key first: a certificate on disk always has its key.
    write_file(&key_file, key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&cert_file, cert.pem().as_bytes(), 0o644)?;
    eprintln!("auditrail: created a self-signed TLS certificate in {}", dir.display());
    Ok((cert_file, key_file))
}

/// Writes a whole file under a temporary name with `mode` from the start, then renames it.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .and_then(|_| std::fs::rename(&tmp, path))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The subject of a certificate as RFC 4514 text: the last RDN first, types by their short
/// names, special characters escaped; `None` if the DER is not a certificate.
fn subject(der: &[u8]) -> Option<String> {
    use yasna::Tag;
    let rdns = yasna::parse_ber(der, |r| {
        r.read_sequence(|r| {
            let rdns = r.next().read_sequence(|r| {
                // TBSCertificate: [0] version, serialNumber, signature, issuer, validity, subject.
                r.read_optional(|r| r.read_tagged(Tag::context(0), |r| r.read_der()))?;
                for _ in 0..4 {
                    r.next().read_der()?;
                }
                let rdns = r.next().collect_sequence_of(|r| {
                    r.collect_set_of(|r| {
                        r.read_sequence(|r| {
                            let oid = r.next().read_oid()?;
                            let value = r.next().read_tagged_der()?;
                            Ok((oid, value))
                        })
                    })
                })?;
                while r.read_optional(|r| r.read_der())?.is_some() {}
                Ok(rdns)
            })?;
            while r.read_optional(|r| r.read_der())?.is_some() {}
            Ok(rdns)
        })
    })
    .ok()?;
    let rdns: Vec<String> = rdns
        .iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|(oid, value)| format!("{}={}", attribute_name(oid), attribute_value(value)))
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    Some(rdns.join(","))
}

fn attribute_name(oid: &yasna::models::ObjectIdentifier) -> String {
    let dotted = oid.components().iter().map(u64::to_string).collect::<Vec<_>>().join(".");
    let short = match dotted.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        _ => return dotted,
    };
    short.to_string()
}

/// A string value, escaped as RFC 4514 says; any other type as `#` and the hex of its DER.
fn attribute_value(value: &yasna::models::TaggedDerValue) -> String {
    use yasna::tags::{
        TAG_BMPSTRING, TAG_IA5STRING, TAG_PRINTABLESTRING, TAG_TELETEXSTRING, TAG_UTF8STRING,
        TAG_VISIBLESTRING,
    };
    let tag = value.tag();
    let text = if tag == TAG_BMPSTRING {
        let units: Vec<u16> = value
            .value()
            .chunks(2)
            .map(|p| u16::from_be_bytes([p[0], *p.get(1).unwrap_or(&0)]))
            .collect();
        String::from_utf16_lossy(&units)
    } else if [
        TAG_UTF8STRING,
        TAG_PRINTABLESTRING,
        TAG_IA5STRING,
        TAG_VISIBLESTRING,
        TAG_TELETEXSTRING,
    ]
    .contains(&tag)
    {
        String::from_utf8_lossy(value.value()).into_owned()
    } else {
        let der = yasna::construct_der(|w| w.write_tagged_der(value));
        return format!("#{}", crate::ingest::hex(&der));
    };
    let last = text.chars().count().saturating_sub(1);
    let mut out = String::with_capacity(text.len());
    for (i, c) in text.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => out.push('\\'),
            '#' | ' ' if i == 0 => out.push('\\'),
            ' ' if i == last => out.push('\\'),
            '\0' => {
                out.push_str("\\00");
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)]) -> Result<Config, String> {
        let env = env.iter().map(|(k, v)| (format!("AUDITRAIL_{k}"), v.to_string()));
        Config::load(None, env).map_err(|e| e.to_string())
    }

    #[test]
    fn settings_that_do_not_fit_together_are_refused() {
        let c = load(&[]).unwrap();
        assert_eq!((c.tls_min_version, c.tls_client_auth), (TlsVersion::V1_3, ClientAuth::Off));
        assert!(!c.tls_enabled());
        let both = [("TLS_CERT_FILE", "c.pem"), ("TLS_KEY_FILE", "k.pem")];
        assert!(load(&both).unwrap().tls_enabled());
        for (env, expect) in [
            (&[("TLS_MIN_VERSION", "1.1")][..], "not a TLS version"),
            (&[("TLS_MIN_VERSION", "1.0")][..], "not a TLS version"),
            (&[("TLS_CLIENT_AUTH", "some")][..], "off, ingest or all"),
            (&[("TLS_CERT_FILE", "c.pem")][..], "go together"),
            (&[("TLS_KEY_FILE", "k.pem")][..], "go together"),
            (&[both[0], both[1], ("TLS_SELF_SIGNED", "true")][..], "exclude each other"),
            (&[both[0], both[1], ("TLS_CLIENT_AUTH", "all")][..], "needs tls_client_ca_file"),
            (&[both[0], both[1], ("TLS_CLIENT_CA_FILE", "ca.pem")][..], "tls_client_auth is off"),
            (&[("TLS_CLIENT_AUTH", "ingest"), ("TLS_CLIENT_CA_FILE", "ca.pem")][..], "needs TLS"),
        ] {
            let e = load(env).unwrap_err();
            assert!(e.contains(expect), "{env:?}: {e}");
        }
        let ok =
            [("TLS_SELF_SIGNED", "1"), ("TLS_CLIENT_AUTH", "ingest"), ("TLS_MIN_VERSION", "1.2")];
        let c = load(&[ok[0], ok[1], ok[2], ("TLS_CLIENT_CA_FILE", "ca.pem")]).unwrap();
        assert_eq!((c.tls_min_version, c.tls_client_auth), (TlsVersion::V1_2, ClientAuth::Ingest));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auditrail.toml");
        std::fs::write(
            &path,
            "tls_min_version = \"1.2\"\ntls_client_auth = \"all\"\n\
            tls_client_ca_file = \"/ca.pem\"\ntls_self_signed = true\n",
        )
        .unwrap();
        let c = Config::load(Some(&path), []).unwrap();
        assert_eq!((c.tls_min_version, c.tls_client_auth), (TlsVersion::V1_2, ClientAuth::All));
        std::fs::write(&path, "tls_min_version = \"1.1\"\n").unwrap();
        assert!(Config::load(Some(&path), []).is_err());
    }

    #[test]
    fn plain_http_only_on_loopback() {
        let addrs = |s: &str| vec![s.parse::<SocketAddr>().unwrap()];
        let plain = load(&[]).unwrap();
        for ok in ["127.0.0.1:8600", "[::1]:8600", "127.0.0.2:1", "[::ffff:127.0.0.1]:1"] {
            check_listen(&plain, &addrs(ok)).unwrap();
        }
        for refused in ["0.0.0.0:8600", "[::]:8600", "10.0.0.1:8600"] {
            let e = check_listen(&plain, &addrs(refused)).unwrap_err();
            assert!(e.contains("tls_cert_file") && e.contains("tls_plaintext_allowed"), "{e}");
        }
        let proxied = load(&[("TLS_PLAINTEXT_ALLOWED", "true")]).unwrap();
        check_listen(&proxied, &addrs("0.0.0.0:8600")).unwrap();
        let tls = load(&[("TLS_SELF_SIGNED", "true")]).unwrap();
        check_listen(&tls, &addrs("0.0.0.0:8600")).unwrap();
    }

    #[test]
    fn client_certificate_subject_and_fingerprint() {
        let mut params = rcgen::CertificateParams::new(vec!["ehr.example".to_string()]).unwrap();
        // In DER order; RFC 4514 writes the last first.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CountryName, "DE");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, "St. Mary, Ward +2");
        params.distinguished_name.push(rcgen::DnType::CommonName, " ehr");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = ClientCert::from_der(cert.der());
        assert_eq!(c.subject, "CN=\\ ehr,O=St. Mary\\, Ward \\+2,C=DE");
        assert_eq!(c.sha256.len(), 64);
        assert_eq!(fingerprint(cert.der()).replace(':', "").to_ascii_lowercase(), c.sha256);
        assert_eq!(subject(b"\x30\x00"), None);
    }

    #[test]
    fn security_headers_keep_a_handlers_cache_control() {
        use axum::response::IntoResponse as _;
        let plain = security_headers("x".into_response(), false);
        let h = plain.headers();
        assert_eq!(h["cache-control"], "no-store");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["referrer-policy"], "no-referrer");
        assert_eq!(h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'");
        assert!(h.get("strict-transport-security").is_none());
        let tile = ([(header::CACHE_CONTROL, "public, max-age=31536000, immutable")], "t");
        let tls = security_headers(tile.into_response(), true);
        assert_eq!(tls.headers()["cache-control"], "public, max-age=31536000, immutable");
        assert_eq!(
            tls.headers()["strict-transport-security"],
            "max-age=63072000; includeSubDomains"
        );
    }

    /// A CA, and certificates it issues, written as PEM files into `dir`.
    struct Pki {
        ca: rcgen::Certificate,
        ca_key: rcgen::KeyPair,
    }

    impl Pki {
        fn new(name: &str) -> Pki {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            let ca_key = rcgen::KeyPair::generate().unwrap();
            Pki { ca: params.self_signed(&ca_key).unwrap(), ca_key }
        }

        fn issue(&self, name: &str, client: bool) -> (rcgen::Certificate, rcgen::KeyPair) {
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params.distinguished_name = rcgen::DistinguishedName::new();
            params.distinguished_name.push(rcgen::DnType::CommonName, name);
            params.extended_key_usages = vec![if client {
                rcgen::ExtendedKeyUsagePurpose::ClientAuth
            } else {
                rcgen::ExtendedKeyUsagePurpose::ServerAuth
            }];
            let key = rcgen::KeyPair::generate().unwrap();
            (params.signed_by(&key, &self.ca, &self.ca_key).unwrap(), key)
        }
    }

    /// One request over TLS as a client trusting `ca`, optionally with a client certificate;
    /// the response body, or the error that ended it.
    async fn fetch(
        addr: SocketAddr,
        ca: &rcgen::Certificate,
        client: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
    ) -> Result<String, String> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert.der().clone()],
                    PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap(),
        };
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = connector.connect(name, tcp).await.map_err(|e| e.to_string())?;
        tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        tls.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        let raw = String::from_utf8_lossy(&raw).into_owned();
        raw.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).ok_or(raw)
    }

    /// The listener end to end: handshakes in their own tasks (a client that never finishes
    /// one does not hold up the next), the verified client certificate in `Peer`, and
    /// `ingest` letting clients without a certificate through but not ones with a foreign one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn listener_hands_handlers_the_peer() {
        use tokio::io::AsyncWriteExt as _;
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("test CA");
        let (server, server_key) = pki.issue("localhost", false);
        let client = pki.issue("ehr client", true);
        let stranger = Pki::new("other CA").issue("stranger", true);
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let config = Config {
            tls_cert_file: Some(write("server.crt", server.pem())),
            tls_key_file: Some(write("server.key", server_key.serialize_pem())),
            tls_client_ca_file: Some(write("ca.crt", pki.ca.pem())),
            tls_client_auth: ClientAuth::Ingest,
            ..Config::default()
        };
        let tls = Tls::from_config(&config).unwrap().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::get(|req: axum::extract::Request| async move {
                    match peer(req.extensions()).and_then(|p| p.client_cert.as_ref()) {
                        Some(c) => format!("{} {}", c.subject, c.sha256),
                        None => "anonymous".to_string(),
                    }
                }),
            )
            .into_make_service_with_connect_info::<Peer>();
        let serving = tokio::spawn(axum::serve(tls.listener(tcp), app).into_future());

        // Clients that stall or speak plain HTTP must not hold up or break accepting.
        let _stalled = TcpStream::connect(addr).await.unwrap();
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let deadline = Duration::from_millis(HANDSHAKE_TIMEOUT_MS / 2);
        let within = |f| async move { tokio::time::timeout(deadline, f).await.unwrap() };
        let expected = ClientCert::from_der(client.0.der());
        assert_eq!(expected.subject, "CN=ehr client");
        assert_eq!(
            within(fetch(addr, &pki.ca, Some(&client))).await.unwrap(),
            format!("CN=ehr client {}", expected.sha256)
        );
        assert_eq!(within(fetch(addr, &pki.ca, None)).await.unwrap(), "anonymous");
        assert!(within(fetch(addr, &pki.ca, Some(&stranger))).await.is_err());
        serving.abort();
    }
}
