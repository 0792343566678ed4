//! Changes single bytes of every kind of stored file and requires `verify` to fail and to name
//! the place.

use crate::*;
use std::path::Path;

fn flip(path: &Path, offset: usize) -> Vec<u8> {
    let original = std::fs::read(path).unwrap();
    let mut bytes = original.clone();
    let at = offset.min(bytes.len() - 1);
    bytes[at] ^= 0x20;
    std::fs::write(path, bytes).unwrap();
    original
}

/// Flips a byte, runs verify, restores the file; returns verify's report.
fn tampered_report(data: &Path, rel: &str, offset: usize) -> String {
    let path = data.join(rel);
    let original = flip(&path, offset);
    let o = verify(data);
    std::fs::write(&path, original).unwrap();
    assert_eq!(
        o.status.code(),
        Some(1),
        "a flip at {rel}:{offset} went unnoticed:\n{}",
        stdout(&o)
    );
    stdout(&o)
}

#[test]
fn verify_reports_every_altered_file_by_location() {
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let file = tmp.path().join("e.ndjson");
    // Two imports: two checkpoints in the history; 1000 events = 3 full tiles and .p/232.
    std::fs::write(&file, ndjson("t", 700)).unwrap();
    assert!(import_file(&data, &file).status.success());
    let first_checkpoint = std::fs::read(data.join("log/checkpoint")).unwrap();
    std::fs::write(&file, ndjson("u", 300)).unwrap();
    assert!(import_file(&data, &file).status.success());
    assert!(verify(&data).status.success());

    let segment = std::fs::read_dir(data.join("segments")).unwrap().next().unwrap().unwrap();
    let segment = format!("segments/{}", segment.file_name().to_string_lossy());
    let seg_len = std::fs::metadata(data.join(&segment)).unwrap().len() as usize;
    let cases: Vec<(String, usize, &str)> = vec![
        (segment.clone(), 20, &segment),            // segment header
        (segment.clone(), 96 + 14, &segment),       // first block header
        (segment.clone(), 96 + 52 + 100, &segment), // first block body
        (segment.clone(), seg_len - 3, &segment),   // last block body
        ("log/tile/entries/000".into(), 2 + 20, "log/tile/entries/000"),
        ("log/tile/entries/003.p/232".into(), 500, "log/tile/entries/003"),
        ("log/tile/0/001".into(), 4000, "log/tile/0/001"),
        ("log/tile/0/003.p/232".into(), 32 * 231, "log/tile/0/003.p/232"),
        ("log/tile/1/000.p/3".into(), 40, "log/tile/1/000.p/3"),
        ("log/checkpoint".into(), 30, "log/checkpoint"),
        ("log/checkpoint".into(), 200, "log/checkpoint"),
        ("checkpoints/history".into(), 40, "checkpoints/history"),
    ];
    for (rel, offset, expect) in cases {
        let report = tampered_report(&data, &rel, offset);
        assert!(
            report.contains(expect),
            "flip at {rel}:{offset}: the report does not name {expect}:\n{report}"
        );
    }
    // Removing files is tampering too, the right-edge partials of the newest checkpoint
    // included (a live store removes older ones, never those).
    for rel in [
        "log/tile/entries/001",
        "log/tile/0/002",
        "log/tile/0/003.p/232",
        "log/tile/entries/003.p/232",
    ] {
        let path = data.join(rel);
        let original = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let o = verify(&data);
        std::fs::write(&path, original).unwrap();
        assert_eq!(o.status.code(), Some(1), "{rel} removed");
        assert!(stdout(&o).contains(rel), "{}", stdout(&o));
    }
    // So is putting back an older signed checkpoint: valid, in the history, but not the newest.
    let newest_checkpoint = std::fs::read(data.join("log/checkpoint")).unwrap();
    std::fs::write(data.join("log/checkpoint"), &first_checkpoint).unwrap();
    let o = verify(&data);
    std::fs::write(data.join("log/checkpoint"), newest_checkpoint).unwrap();
    assert_eq!(o.status.code(), Some(1), "an older checkpoint file went unnoticed");
    assert!(stdout(&o).contains("log/checkpoint"), "{}", stdout(&o));
    assert!(verify(&data).status.success(), "every file was restored");

    // The first import's right-edge partials were superseded and removed by the second import.
    assert!(!data.join("log/tile/0/002.p/188").exists());
    assert!(!data.join("log/tile/entries/002.p/188").exists());
    // A partial tile is allowed next to its full tile only as an exact prefix of it, and nothing
    // else may live in the tile tree.
    let full = std::fs::read(data.join("log/tile/0/001")).unwrap();
    let stale = data.join("log/tile/0/001.p/10");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    std::fs::write(&stale, &full[..320]).unwrap();
    assert!(verify(&data).status.success(), "{}", stdout(&verify(&data)));
    let report = tampered_report(&data, "log/tile/0/001.p/10", 33);
    assert!(report.contains("log/tile/0/001.p/10"), "{report}");
    std::fs::remove_file(&stale).unwrap();
    std::fs::write(data.join("log/tile/0/junk"), b"x").unwrap();
    let o = verify(&data);
    assert!(!o.status.success() && stdout(&o).contains("log/tile/0/junk"), "{}", stdout(&o));
    std::fs::remove_file(data.join("log/tile/0/junk")).unwrap();

    // The store refuses to open on damage it can see, and says where.
    let original = flip(&data.join("log/tile/0/003.p/232"), 100);
    let o = run(&["import", "--data", data.to_str().unwrap(), file.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("corrupted at log"), "{}", stderr(&o));
    std::fs::write(data.join("log/tile/0/003.p/232"), original).unwrap();
}
