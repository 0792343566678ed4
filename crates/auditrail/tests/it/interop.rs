//! An independent verifier (`tlogverify`, Go, built on golang.org/x/mod/sumdb) accepts the log
//! we write and rejects a tampered one. The test command builds it and sets `TLOGVERIFY`.

use crate::*;
use std::process::Command;

pub(crate) fn tlogverify() -> Command {
    let path = std::env::var("TLOGVERIFY").expect(
        "set TLOGVERIFY to a built ../shared/tools/tlogverify binary; scripts/test builds it",
    );
    Command::new(path)
}

fn check(args: &[&str], want_ok: bool) {
    let o = tlogverify().args(args).output().unwrap();
    assert_eq!(o.status.success(), want_ok, "tlogverify {args:?}:\n{}{}", stdout(&o), stderr(&o));
}

#[test]
fn tlogverify_accepts_our_log_and_rejects_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let file = tmp.path().join("e.ndjson");
    std::fs::write(&file, ndjson("a", 1000)).unwrap();
    assert!(import_file(&data, &file).status.success());
    std::fs::write(&file, ndjson("b", 69_000)).unwrap();
    assert!(import_file(&data, &file).status.success());

    let v = vkey(&data);
    let log = data.join("log");
    let (log, cp) = (log.to_str().unwrap(), data.join("log/checkpoint"));
    let cp = cp.to_str().unwrap();
    let old = tmp.path().join("checkpoint.1000");
    let o = run(&["checkpoint", "--data", data.to_str().unwrap(), "--size", "1000"]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(&old, &o.stdout).unwrap();
    let old = old.to_str().unwrap();

    check(&["checkpoint", "-vkey", &v, cp], true);
    check(&["audit", "-vkey", &v, "-tiles", log], true);
    check(&["root", "-vkey", &v, "-tiles", log], true);
    check(&["checkpoint", "-vkey", &v, old], true);
    check(&["consistency", "-vkey", &v, "-tiles", log, "-old", old], true);
    for i in ["0", "255", "256", "999", "65535", "65536", "69999"] {
        check(&["inclusion", "-vkey", &v, "-tiles", log, "-index", i, "-from-bundle"], true);
    }
    // Another log's key is refused.
    let other = tmp.path().join("other");
    let o =
        run(&["init", "--data", other.to_str().unwrap(), "--origin", "test.auditrail.local/log"]);
    assert!(o.status.success());
    check(&["checkpoint", "-vkey", &vkey(&other), cp], false);

    // A changed entry is caught by the audit, a changed checkpoint by its signature.
    let bundle = data.join("log/tile/entries/100");
    let original = std::fs::read(&bundle).unwrap();
    let mut bad = original.clone();
    bad[10] ^= 1;
    std::fs::write(&bundle, &bad).unwrap();
    check(&["audit", "-vkey", &v, "-tiles", log], false);
    std::fs::write(&bundle, &original).unwrap();
    let text = std::fs::read_to_string(cp).unwrap().replacen("\n70000\n", "\n70001\n", 1);
    let bad_cp = tmp.path().join("bad-checkpoint");
    std::fs::write(&bad_cp, text).unwrap();
    check(&["checkpoint", "-vkey", &v, bad_cp.to_str().unwrap()], false);
    check(&["audit", "-vkey", &v, "-tiles", log], true);
}
