use crate::*;

#[test]
fn init_import_verify_export() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["keys/log.key", "keys/master.keys"] {
            let mode = std::fs::metadata(data.join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
    }
    let v = vkey(&data);
    assert!(v.starts_with("test.auditrail.local/log+"), "{v}");

    let file = tmp.path().join("events.ndjson");
    std::fs::write(&file, ndjson("a", 600)).unwrap();
    let o = import_file(&data, &file);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(
        summary,
        serde_json::json!({"appended": 600, "first_seq": 0, "last_seq": 599, "tree_size": 600})
    );

    // Importing the same file again appends nothing: every id is already there.
    let o = import_file(&data, &file);
    let summary: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(summary["appended"], 0);
    assert_eq!(summary["duplicates"], 600);
    assert_eq!(summary["tree_size"], 600);

    let o = verify(&data);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).starts_with("ok: 600 events"), "{}", stdout(&o));

    let o = run(&["export", "--data", data.to_str().unwrap(), "--from", "598"]);
    let lines: Vec<serde_json::Value> =
        stdout(&o).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["seq"], 599);
    assert_eq!(lines[1]["id"], "a-599");
    assert!(lines[1]["recorded_at"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn a_bad_line_is_reported_by_number_and_nothing_is_imported() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let file = tmp.path().join("events.ndjson");
    for (bad, expect) in [
        ("{\"action\": \"patient.read\"", "invalid_json"),
        ("{\"action\": \"patient.read\", \"outcome\": \"maybe\"}", "outcome"),
        ("[1,2]", "JSON object"),
        ("{\"action\": \"patient.read\", \"outcome\": \"success\", \"seq\": 3}", "seq"),
    ] {
        let mut text = ndjson("b", 5);
        text.push_str(bad);
        text.push('\n');
        text.push_str(&ndjson("c", 5));
        std::fs::write(&file, text).unwrap();
        let o = import_file(&data, &file);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains("line 6") && err.contains(expect), "{err}");
    }
    let o = run(&["export", "--data", data.to_str().unwrap()]);
    assert_eq!(stdout(&o), "", "nothing was imported");
}

#[test]
fn clear_errors_for_misuse() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nope");
    let o = run(&["import", "--data", missing.to_str().unwrap(), "-"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("auditrail init"), "{}", stderr(&o));
    let data = init_dir(tmp.path());
    let o = run(&["init", "--data", data.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("already initialised"), "{}", stderr(&o));
    let o =
        run(&["init", "--data", tmp.path().join("x").to_str().unwrap(), "--origin", "has space"]);
    assert!(!o.status.success());
    // An empty log verifies.
    let o = verify(&data);
    assert!(o.status.success(), "{}", stdout(&o));
}

#[test]
fn import_from_stdin() {
    use std::io::Write as _;
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let mut child = bin()
        .args(["import", "--data", data.to_str().unwrap(), "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(ndjson("s", 10).as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success());
    assert!(stdout(&o).contains("\"appended\":10"), "{}", stdout(&o));
}
