//! Encryption at rest, end to end through the binary: with the master key kept outside the data
//! directory, no byte of the directory (nor of any zstd frame in it) reveals an event; without
//! the right master key nothing opens and the error names the key; rotation, rewrap and
//! retirement keep the log readable, verifiable and restorable from a backup.

use crate::http::Server;
use crate::*;
use serde_json::json;
use std::io::Read as _;

const CANARY_USER: &str = "CanaryUser7f3a";
const CANARY_PATIENT: &str = "CanaryMrn91c2";
const CANARY_TEXT: &str = "CanaryFreeTextB4e1";
const CANARY_IP: &str = "203.0.113.77";
const CANARIES: [&str; 4] = [CANARY_USER, CANARY_PATIENT, CANARY_TEXT, CANARY_IP];

fn canary_event(i: usize) -> serde_json::Value {
    json!({
        "id": format!("canary-{i}"),
        "occurred_at": "2026-11-22T10:15:00Z",
        "category": "phi_access",
        "action": "patient.read",
        "outcome": "success",
        "actor": {"user_id": CANARY_USER, "ip": CANARY_IP, "roles": ["physician"]},
        "source": {"system": "ehr", "site": "main-campus"},
        "patient": {"id": CANARY_PATIENT},
        "context": {"note": format!("{CANARY_TEXT} chart review {i}")}
    })
}

fn canary_ndjson(range: std::ops::Range<usize>) -> String {
    range.map(|i| canary_event(i).to_string() + "\n").collect()
}

/// Which canaries a byte string contains, ignoring ASCII case (the index lowercases words).
fn canaries_in(bytes: &[u8]) -> Vec<&'static str> {
    let lower = bytes.to_ascii_lowercase();
    CANARIES
        .into_iter()
        .filter(|c| {
            let c = c.to_ascii_lowercase();
            lower.windows(c.len()).any(|w| w == c.as_bytes())
        })
        .collect()
}

/// What every zstd frame starting anywhere in `bytes` decompresses to (as far as it does).
fn zstd_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    let mut out = Vec::new();
    for at in bytes.windows(4).enumerate().filter(|(_, w)| *w == MAGIC).map(|(i, _)| i) {
        let Ok(decoder) = zstd::stream::read::Decoder::new(&bytes[at..]) else { continue };
        let mut decoder = decoder.single_frame();
        let mut plain = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        while plain.len() < 256 << 20 {
            match decoder.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => plain.extend_from_slice(&buf[..n]),
            }
        }
        if !plain.is_empty() {
            out.push(plain);
        }
    }
    out
}

/// Every (file, canary) found under `dir`, in the raw bytes or in a zstd frame.
fn scan(dir: &Path) -> Vec<(String, &'static str)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            files += 1;
            let bytes = std::fs::read(&path).unwrap();
            let shown = path.strip_prefix(dir).unwrap().display().to_string();
            for c in canaries_in(&bytes) {
                found.push((shown.clone(), c));
            }
            for frame in zstd_frames(&bytes) {
                for c in canaries_in(&frame) {
                    found.push((format!("{shown} (zstd frame)"), c));
                }
            }
        }
    }
    assert!(files > 0, "{} holds files", dir.display());
    found
}

fn private_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// `auditrail <args> --data <data> --master-key-file <key>`.
fn with_key(args: &[&str], data: &Path, key: &Path) -> std::process::Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--data", data.to_str().unwrap(), "--master-key-file", key.to_str().unwrap()]);
    run(&all)
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    stdout(o)
}

/// A data directory whose master key file lives outside it, holding canary events written by
/// `import` and by a server (with a search and a legal hold), and a flushed index.
fn canary_log(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = tmp.join("data");
    let key = tmp.join("secrets").join("master.keys");
    std::fs::create_dir_all(key.parent().unwrap()).unwrap();
    let o = with_key(&["init", "--origin", "rest.test/log"], &data, &key);
    ok(&o);
    assert_eq!(mode(&key), 0o600);
    assert!(!data.join("keys/master.keys").exists(), "the master key is not in the directory");

    let file = tmp.join("canaries.ndjson");
    std::fs::write(&file, canary_ndjson(0..300)).unwrap();
    let summary = ok(&with_key(&["import", file.to_str().unwrap()], &data, &key));
    assert!(summary.contains("\"appended\":300"), "{summary}");

    let server = Server::start_with(&data, &[("AUDITRAIL_MASTER_KEY_FILE", key.to_str().unwrap())]);
    let events: Vec<serde_json::Value> = (300..320).map(canary_event).collect();
    assert_eq!(server.post_json("/api/v1/events", &json!(events)).status, 201);
    server.wait_indexed();
    let r = server.get(&format!("/api/v1/events?user={CANARY_USER}&limit=1000"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(320), "{}", r.text());
    let r = server.post_json(
        "/api/v1/retention/holds",
        &json!({"reason": format!("litigation about {CANARY_PATIENT}"), "patient": CANARY_PATIENT}),
    );
    assert!(r.status < 300, "{}", r.text());
    assert!(server.stop().success());
    // The index is flushed at shutdown; a rebuild writes it again from the log.
    ok(&with_key(&["reindex"], &data, &key));
    assert!(std::fs::read_dir(data.join("index")).unwrap().count() > 0, "index files exist");
    (data, key)
}

#[test]
fn no_canary_is_readable_anywhere_in_the_data_directory() {
    // The scanner finds a canary in the clear and inside a zstd frame amid other bytes.
    let probe = tempfile::tempdir().unwrap();
    let mut framed = b"junk".to_vec();
    framed.extend(zstd::encode_all(format!("x {CANARY_TEXT} y").as_bytes(), 3).unwrap());
    framed.extend(b"trailing");
    std::fs::write(probe.path().join("framed"), framed).unwrap();
    std::fs::write(probe.path().join("plain"), CANARY_IP).unwrap();
    // Compressed text whose frame holds the canary only as a back-reference.
    let near = &CANARY_TEXT[..CANARY_TEXT.len() - 1];
    let text = format!("{near}0 and {CANARY_TEXT}");
    std::fs::write(probe.path().join("matched"), zstd::encode_all(text.as_bytes(), 3).unwrap())
        .unwrap();
    let found = scan(probe.path());
    for expected in [("framed (zstd frame)", CANARY_TEXT), ("plain", CANARY_IP)] {
        assert!(found.contains(&(expected.0.to_string(), expected.1)), "{found:?}");
    }
    assert!(found.contains(&("matched (zstd frame)".to_string(), CANARY_TEXT)), "{found:?}");

    let tmp = tempfile::tempdir().unwrap();
    let (data, key) = canary_log(tmp.path());
    // The events are there, for whoever holds the key...
    let exported = ok(&with_key(&["export"], &data, &key));
    assert_eq!(canaries_in(exported.as_bytes()).len(), CANARIES.len());
    // ...and nowhere in the directory: segments, tiles, history, index, holds, index key.
    let found = scan(&data);
    assert!(found.is_empty(), "readable without the master key: {found:?}");
    let index_key = std::fs::read(data.join("keys/index.key")).unwrap();
    assert!(index_key.starts_with(b"ATSEAL1\n"), "the index key is sealed");
    let holds = std::fs::read(data.join("retention/holds.json")).unwrap();
    assert!(holds.starts_with(b"ATSEAL1\n"), "the legal holds are sealed");
}

#[test]
fn without_the_right_master_key_nothing_opens_and_the_error_names_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = tmp.path().join("master.keys");
    ok(&with_key(&["init"], &data, &key));
    let file = tmp.path().join("events.ndjson");
    std::fs::write(&file, canary_ndjson(0..50)).unwrap();
    ok(&with_key(&["import", file.to_str().unwrap()], &data, &key));
    let d = data.to_str().unwrap();

    // Absent: no flag, and nothing in the directory.
    for args in [vec!["verify", "--data", d], vec!["export", "--data", d]] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("master keys") && e.contains("keys/master.keys"), "{e}");
        assert!(e.contains("master_key_file"), "the error says how to point at the key: {e}");
    }
    let o = bin().args(["serve", "--listen", "127.0.0.1:0", "--data", d]).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("master keys"), "{}", stderr(&o));

    // Wrong: a key file of the right shape with another key.
    let wrong = tmp.path().join("wrong.keys");
    private_file(&wrong, "1 AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n");
    let w = wrong.to_str().unwrap();
    let o = with_key(&["export"], &data, &wrong);
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("master key version 1") && e.contains(w), "{e}");
    assert_eq!(stdout(&o), "", "nothing is exported");
    let o = with_key(&["verify"], &data, &wrong);
    assert!(!o.status.success());
    let out = stdout(&o);
    assert!(
        out.contains("FAIL") && out.contains("master key version 1") && out.contains(w),
        "{out}"
    );
    let o = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--data", d, "--master-key-file", w])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("master key version 1") && stderr(&o).contains(w));

    // A key file others may read is refused, naming the fix.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = stderr(&with_key(&["verify"], &data, &key));
    assert!(e.contains("readable by group or others") && e.contains("chmod 600"), "{e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(ok(&with_key(&["verify"], &data, &key)).starts_with("ok: 50 events"));
}

#[test]
fn master_keys_from_the_environment_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let key = tmp.path().join("master.keys");
    ok(&with_key(&["init"], &data, &key));
    let text = std::fs::read_to_string(&key).unwrap();
    let file = tmp.path().join("events.ndjson");
    std::fs::write(&file, canary_ndjson(0..20)).unwrap();
    let d = data.to_str().unwrap();
    let env_run =
        |args: &[&str]| bin().args(args).env("AUDITRAIL_MASTER_KEYS", &text).output().unwrap();
    ok(&env_run(&["import", "--data", d, file.to_str().unwrap()]));
    assert!(ok(&env_run(&["verify", "--data", d])).starts_with("ok: 20 events"));
    assert_eq!(ok(&env_run(&["export", "--data", d])).lines().count(), 20);
    // The server too, and `init` of a new directory takes the keys from it, writing none.
    let server = Server::start_with(&data, &[("AUDITRAIL_MASTER_KEYS", text.as_str())]);
    assert_eq!(
        server.get("/api/v1/events?limit=100").json()["events"].as_array().unwrap().len(),
        20
    );
    drop(server);
    let other = tmp.path().join("other");
    ok(&env_run(&["init", "--data", other.to_str().unwrap()]));
    assert!(!other.join("keys/master.keys").exists());
    // Naming both is refused.
    let o = bin()
        .args(["verify", "--data", d, "--master-key-file", key.to_str().unwrap()])
        .env("AUDITRAIL_MASTER_KEYS", &text)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("AUDITRAIL_MASTER_KEYS") && stderr(&o).contains("only one"));
    // Rotation cannot write the variable: it prints the new text to store in its place.
    let o = env_run(&["key", "rotate", "--data", d]);
    let rotated = ok(&o);
    assert!(rotated.starts_with(&text) && rotated.lines().last().unwrap().starts_with("2 "));
    assert!(stderr(&o).contains("AUDITRAIL_MASTER_KEYS"), "{}", stderr(&o));
}

#[test]
fn rotate_rewrap_and_retire_keep_the_log_readable_and_restorable() {
    let tmp = tempfile::tempdir().unwrap();
    let (data, key) = canary_log(tmp.path());
    let bucket = tmp.path().join("bucket");
    std::fs::create_dir_all(&bucket).unwrap();
    let url = format!("file://{}", bucket.display());
    let d = data.to_str().unwrap();
    ok(&run(&["backup", "--data", d, "--to", &url]));
    let before = ok(&with_key(&["export"], &data, &key));
    let old_text = std::fs::read_to_string(&key).unwrap();

    let o = run(&["key", "rotate", "--master-key-file", key.to_str().unwrap()]);
    ok(&o);
    assert!(stderr(&o).contains("version 2") && stderr(&o).contains("restart"), "{}", stderr(&o));
    assert_eq!(mode(&key), 0o600);
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.starts_with(&old_text) && text.lines().last().unwrap().starts_with("2 "));

    let out = ok(&with_key(&["key", "rewrap", "--retire-old"], &data, &key));
    assert!(out.contains("under master key version 2"), "{out}");
    assert!(out.contains("resealed keys/index.key, retention/holds.json"), "{out}");
    assert!(out.contains("in use: version 2 ("), "{out}");
    assert!(out.contains("retired master key versions 1"), "{out}");
    let text = std::fs::read_to_string(&key).unwrap();
    assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 1, "{text}");
    assert!(text.lines().last().unwrap().starts_with("2 "));
    // Again: nothing left to do.
    let again = ok(&with_key(&["key", "rewrap", "--retire-old"], &data, &key));
    assert!(again.contains("rewrapped 0 of") && again.contains("retired nothing"), "{again}");

    // Everything reads back with version 2 alone, and nothing opens with version 1 alone.
    assert!(ok(&with_key(&["verify"], &data, &key)).starts_with("ok: "));
    assert_eq!(ok(&with_key(&["export"], &data, &key)), before);
    let old = tmp.path().join("old.keys");
    private_file(&old, &old_text);
    assert!(!with_key(&["export"], &data, &old).status.success());
    let server = Server::start_with(&data, &[("AUDITRAIL_MASTER_KEY_FILE", key.to_str().unwrap())]);
    let r = server.get(&format!("/api/v1/events?patient={CANARY_PATIENT}&limit=1000"));
    assert_eq!(r.json()["events"].as_array().map(Vec::len), Some(320), "{}", r.text());
    assert_eq!(server.get("/api/v1/retention").json()["holds"].as_array().map(Vec::len), Some(1));
    assert!(server.stop().success());

    // The next backup uploads the rewrapped headers, so a restore needs version 2 only.
    ok(&run(&["backup", "--data", d, "--to", &url]));
    let restored = tmp.path().join("restored");
    std::fs::create_dir_all(restored.join("keys")).unwrap();
    std::fs::copy(data.join("keys/log.key"), restored.join("keys/log.key")).unwrap();
    let o = with_key(&["restore", "--from", &url], &restored, &key);
    ok(&o);
    assert!(ok(&with_key(&["verify"], &restored, &key)).starts_with("ok: "));
    assert_eq!(
        ok(&with_key(&["export"], &restored, &key)),
        ok(&with_key(&["export"], &data, &key))
    );
}
