//! HTTPS as clients see it: real `openssl s_client` and `curl` against `auditrail serve` with
//! certificates made here by a test CA (rcgen).

use crate::http::{Server, unsafe_kill};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A test CA, and certificates it issues, as PEM files in `dir`.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.key_usages =
            vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = params.self_signed(&ca_key).unwrap();
        let pki = Pki { dir: dir.to_path_buf(), ca, ca_key };
        std::fs::write(pki.ca_file(), pki.ca.pem()).unwrap();
        pki
    }

    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// A certificate for the server (127.0.0.1, localhost) or a client, as `<name>.crt` and
    /// `<name>.key`.
    fn issue(&self, name: &str, client: bool) -> (PathBuf, PathBuf) {
        let names = if client { vec![] } else { vec!["127.0.0.1".into(), "localhost".into()] };
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        let (cert_file, key_file) =
            (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }
}

/// curl arguments trusting `ca`, for readiness checks.
fn trusting(ca: &Path) -> [&str; 2] {
    ["--cacert", ca.to_str().unwrap()]
}

fn env_for<'a>(cert: &'a Path, key: &'a Path) -> Vec<(&'static str, &'a str)> {
    vec![
        ("AUDITRAIL_TLS_CERT_FILE", cert.to_str().unwrap()),
        ("AUDITRAIL_TLS_KEY_FILE", key.to_str().unwrap()),
        ("AUDITRAIL_PUBLISH_INTERVAL_MS", "20"),
    ]
}

/// `openssl s_client` to the server with `args`, standard input closed; stdout and stderr.
fn s_client(server: &Server, args: &[&str]) -> String {
    let o = Command::new("openssl")
        .args(["s_client", "-connect", &server.addr])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs");
    crate::stdout(&o) + &crate::stderr(&o)
}

/// The server answered the client's hello with an alert and nothing was negotiated: a refusal
/// by the server, not the client declining to connect.
fn refused(s_client_output: &str) -> bool {
    s_client_output.contains("SSL alert number") && s_client_output.contains("Cipher is (NONE)")
}

/// The SHA-256 fingerprint of the certificate the server presents to a new connection, as
/// `openssl x509 -fingerprint` prints it.
fn served_fingerprint(server: &Server) -> String {
    let script =
        format!("openssl s_client -connect {} </dev/null 2>/dev/null | {FINGERPRINT}", server.addr);
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert!(o.status.success(), "{}", crate::stderr(&o));
    crate::stdout(&o).trim().to_string()
}

fn file_fingerprint(cert: &Path) -> String {
    let o = Command::new("sh")
        .args(["-c", &format!("{FINGERPRINT} -in {}", cert.display())])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", crate::stderr(&o));
    crate::stdout(&o).trim().to_string()
}

const FINGERPRINT: &str = "openssl x509 -noout -fingerprint -sha256";

/// `curl` of `path` trusting `ca`, with `args`; -i, so headers come first.
fn curl(server: &Server, ca: &Path, path: &str, args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "-i", "--cacert"])
        .arg(ca)
        .args(args)
        .arg(format!("https://{}{path}", server.addr))
        .output()
        .expect("curl runs")
}

fn assert_ok(o: &Output) {
    let out = crate::stdout(o);
    assert!(
        o.status.success() && out.starts_with("HTTP/1.1 200") && out.ends_with("ok\n"),
        "curl: {out}{}",
        crate::stderr(o)
    );
}

/// Waits (bounded) until the server's output holds `n` lines containing `needle`.
fn wait_stderr(server: &Server, needle: &str, n: usize) {
    for _ in 0..400 {
        if server.output().matches(needle).count() >= n {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    panic!("no {n} × {needle:?} in the server's output: {}", server.output());
}

/// `serve` that must refuse to start: its stderr, after it exited non-zero on its own.
fn serve_refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = crate::bin();
    cmd.arg("serve").args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            let o = child.wait_with_output().unwrap();
            assert!(!status.success(), "serve {args:?} started");
            return crate::stderr(&o);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("serve {args:?} did not refuse to start");
}

#[test]
fn tls13_by_default_tls12_only_when_asked_older_never() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "auditrail test CA");
    let (cert, key) = pki.issue("server", false);
    let data = tmp.path().join("data");
    let server = Server::start_tls(&data, &[], &env_for(&cert, &key), &trusting(&pki.ca_file()));

    let out = s_client(&server, &["-tls1_3", "-CAfile", pki.ca_file().to_str().unwrap()]);
    assert!(out.contains("New, TLSv1.3, Cipher is TLS_"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    let out = s_client(&server, &["-tls1_2"]);
    assert!(refused(&out) && out.contains("alert protocol version"), "{out}");
    // SECLEVEL=0, so that OpenSSL really offers TLS 1.1 rather than declining to try.
    let tls11 = ["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"];
    let out = s_client(&server, &tls11);
    assert!(refused(&out), "{out}");

    let o = curl(&server, &pki.ca_file(), "/healthz", &[]);
    assert_ok(&o);
    let head = crate::stdout(&o).to_ascii_lowercase();
    assert!(head.contains("strict-transport-security: max-age=63072000; includesubdomains"));
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    // No plain HTTP on the TLS port.
    let o = Command::new("curl")
        .args(["-sS", &format!("http://{}/healthz", server.addr)])
        .output()
        .unwrap();
    assert!(!o.status.success() && !crate::stdout(&o).contains("ok"), "{}", crate::stdout(&o));
    assert!(server.stop().success());

    let mut env = env_for(&cert, &key);
    env.push(("AUDITRAIL_TLS_MIN_VERSION", "1.2"));
    let server = Server::start_tls(&data, &[], &env, &trusting(&pki.ca_file()));
    let out = s_client(&server, &["-tls1_2", "-CAfile", pki.ca_file().to_str().unwrap()]);
    assert!(out.contains("New, TLSv1.2, Cipher is ECDHE-"), "{out}");
    let out = s_client(&server, &tls11);
    assert!(refused(&out), "{out}");
    assert!(server.stop().success());
}

#[test]
fn sighup_reloads_the_certificate_and_a_bad_file_keeps_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "auditrail test CA");
    let (cert, key) = pki.issue("server", false);
    let (old_cert, old_key) = (std::fs::read(&cert).unwrap(), std::fs::read(&key).unwrap());
    let old = file_fingerprint(&cert);
    let data = tmp.path().join("data");
    let server = Server::start_tls(&data, &[], &env_for(&cert, &key), &trusting(&pki.ca_file()));
    assert_eq!(served_fingerprint(&server), old);

    let hangup = || unsafe_kill(server.child.id(), libc::SIGHUP);
    std::fs::write(&cert, "not a certificate\n").unwrap();
    hangup();
    wait_stderr(&server, "SIGHUP: cannot reload TLS", 1);
    assert_eq!(served_fingerprint(&server), old);
    assert_ok(&curl(&server, &pki.ca_file(), "/healthz", &[]));

    // A new certificate whose key does not match is refused too.
    let (new_cert, new_key) = pki.issue("server-2026", false);
    std::fs::copy(&new_cert, &cert).unwrap();
    hangup();
    wait_stderr(&server, "SIGHUP: cannot reload TLS", 2);
    assert_eq!(served_fingerprint(&server), old);

    std::fs::copy(&new_key, &key).unwrap();
    hangup();
    wait_stderr(&server, "SIGHUP: reloaded the TLS certificate", 1);
    let new = file_fingerprint(&new_cert);
    assert_ne!(new, old);
    assert_eq!(served_fingerprint(&server), new);
    assert_ok(&curl(&server, &pki.ca_file(), "/healthz", &[]));

    std::fs::write(&cert, old_cert).unwrap();
    std::fs::write(&key, old_key).unwrap();
    hangup();
    wait_stderr(&server, "SIGHUP: reloaded the TLS certificate", 2);
    assert_eq!(served_fingerprint(&server), old);
    assert!(server.stop().success());
}

#[test]
fn client_certificates_required_with_tls_client_auth_all() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = Pki::new(tmp.path(), "auditrail test CA");
    let (cert, key) = pki.issue("server", false);
    let (client_cert, client_key) = pki.issue("ehr", true);
    let other_dir = tmp.path().join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let (stranger_cert, stranger_key) = Pki::new(&other_dir, "other CA").issue("stranger", true);
    let ca = pki.ca_file();
    let with = |cert: &Path, key: &Path| {
        ["--cert", cert.to_str().unwrap(), "--key", key.to_str().unwrap()].map(String::from)
    };
    let client = with(&client_cert, &client_key);
    let stranger = with(&stranger_cert, &stranger_key);
    fn args(a: &[String; 4]) -> Vec<&str> {
        a.iter().map(String::as_str).collect()
    }

    let mut env = env_for(&cert, &key);
    env.extend([
        ("AUDITRAIL_TLS_CLIENT_AUTH", "all"),
        ("AUDITRAIL_TLS_CLIENT_CA_FILE", ca.to_str().unwrap()),
    ]);
    let data = tmp.path().join("data");
    // Readiness needs a client certificate too.
    let ready = [&trusting(&ca)[..], &args(&client)].concat();
    let server = Server::start_tls(&data, &[], &env, &ready);

    let o = curl(&server, &ca, "/healthz", &["-q"]);
    assert!(!o.status.success() && !crate::stdout(&o).contains("200"), "{}", crate::stdout(&o));
    let o = curl(&server, &ca, "/healthz", &args(&stranger));
    assert!(!o.status.success() && !crate::stdout(&o).contains("200"), "{}", crate::stdout(&o));
    assert_ok(&curl(&server, &ca, "/healthz", &args(&client)));
    assert!(server.stop().success());

    // `ingest`: the handshake lets clients without a certificate through, not strangers.
    env.retain(|(k, _)| *k != "AUDITRAIL_TLS_CLIENT_AUTH");
    env.push(("AUDITRAIL_TLS_CLIENT_AUTH", "ingest"));
    let server = Server::start_tls(&data, &[], &env, &trusting(&ca));
    assert_ok(&curl(&server, &ca, "/healthz", &[]));
    assert_ok(&curl(&server, &ca, "/healthz", &args(&client)));
    let o = curl(&server, &ca, "/healthz", &args(&stranger));
    assert!(!o.status.success(), "{}", crate::stdout(&o));
    // Sending events needs the certificate on top of the API key; reading does not.
    let bearer = format!("authorization: Bearer {}", server.token);
    let send = |extra: &[&str]| {
        let mut a = vec!["-H", bearer.as_str(), "-H", "content-type: application/json"];
        a.extend(["-d", r#"{"action":"patient.read","outcome":"success"}"#]);
        a.extend(extra);
        crate::stdout(&curl(&server, &ca, "/api/v1/events", &a))
    };
    let without = send(&[]);
    assert!(
        without.starts_with("HTTP/1.1 401") && without.contains("client_certificate_required"),
        "{without}"
    );
    let with = send(&args(&client));
    assert!(with.starts_with("HTTP/1.1 201"), "{with}");
    let read = curl(&server, &ca, "/api/v1/events", &["-H", bearer.as_str()]);
    assert!(crate::stdout(&read).starts_with("HTTP/1.1 200"), "{}", crate::stdout(&read));
    assert!(server.stop().success());
}

#[test]
fn self_signed_development_certificate_works_with_curl() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let crt = data.join("tls/self-signed.crt");
    let server = Server::start_tls(&data, &["--tls-self-signed"], &[], &trusting(&crt));
    let fingerprint = file_fingerprint(&crt);
    let printed = fingerprint.strip_prefix("sha256 Fingerprint=").unwrap();
    let log = server.output();
    assert!(log.contains(&format!("{} (SHA-256 {printed})", crt.display())), "{log}");
    assert!(log.contains(&format!("curl --cacert {}", crt.display())), "{log}");
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.join("tls/self-signed.key")).unwrap().permissions();
        assert_eq!(mode.mode() & 0o777, 0o600);
    }
    assert_ok(&curl(&server, &crt, "/healthz", &[]));
    let port = server.addr.rsplit(':').next().unwrap().to_string();
    let localhost = format!("https://localhost:{port}/healthz");
    let o = Command::new("curl")
        .args(["-sS", "--cacert", crt.to_str().unwrap(), "--resolve"])
        .arg(format!("localhost:{port}:127.0.0.1"))
        .arg(&localhost)
        .output()
        .unwrap();
    assert_eq!(crate::stdout(&o), "ok\n", "{}", crate::stderr(&o));
    assert_eq!(served_fingerprint(&server), fingerprint);
    assert!(server.stop().success());

    // Kept across restarts, so a client trusting it keeps working.
    let server =
        Server::start_tls(&data, &[], &[("AUDITRAIL_TLS_SELF_SIGNED", "true")], &trusting(&crt));
    assert_eq!(file_fingerprint(&crt), fingerprint);
    assert_eq!(served_fingerprint(&server), fingerprint);
    assert!(server.stop().success());

    let other = tmp.path().join("other.crt");
    let env =
        [("AUDITRAIL_TLS_CERT_FILE", other.to_str().unwrap()), ("AUDITRAIL_TLS_KEY_FILE", "k")];
    let e = serve_refused(&["--data", data.to_str().unwrap(), "--tls-self-signed"], &env);
    assert!(e.contains("tls_self_signed and tls_cert_file exclude each other"), "{e}");
}

#[test]
fn plain_http_on_a_non_loopback_address_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let e = serve_refused(&["--data", data.to_str().unwrap(), "--listen", "0.0.0.0:0"], &[]);
    assert!(e.contains("refusing plain HTTP on 0.0.0.0:0"), "{e}");
    for fix in ["tls_cert_file", "--tls-self-signed", "tls_plaintext_allowed = true"] {
        assert!(e.contains(fix), "{fix}: {e}");
    }
    assert!(!data.exists(), "nothing is created before the refusal");
    let e =
        serve_refused(&["--data", data.to_str().unwrap()], &[("AUDITRAIL_TLS_MIN_VERSION", "1.1")]);
    assert!(e.contains("not a TLS version"), "{e}");

    // Loopback plain HTTP still works, with the security headers and without HSTS.
    let server = Server::start(&data);
    let r = server.get("/healthz");
    assert_eq!((r.status, r.header("x-frame-options")), (200, Some("DENY")));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("strict-transport-security"), None);
    assert!(server.stop().success());
}
