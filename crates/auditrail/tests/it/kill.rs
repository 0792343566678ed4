//! Kills importing processes with SIGKILL at random moments, then checks that every event an
//! import reported durable is in the log exactly once and that the audit passes.

use crate::*;
use auditrail_store::sim::Rng;
use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::process::Stdio;
use std::time::Duration;

#[test]
fn sigkill_during_import_loses_no_acknowledged_event() {
    let seed = std::env::var("KILL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    eprintln!("kill test seed {seed} (rerun with KILL_SEED={seed})");
    let mut rng = Rng::new(seed);
    let tmp = tempfile::tempdir().unwrap();
    let data = init_dir(tmp.path());
    let mut acked: BTreeSet<String> = BTreeSet::new();
    let mut kills = 0;
    let mut round = 0;
    while kills < 100 {
        assert!(
            round < 400,
            "too few imports were still running when killed ({kills} kills in {round} rounds)"
        );
        let prefix = format!("r{round}");
        let file = tmp.path().join("round.ndjson");
        std::fs::write(&file, ndjson(&prefix, 3000)).unwrap();
        let chunk = 1 + rng.below(25);
        let mut child = bin()
            .args(["import", "--report-chunks", "--chunk-lines", &chunk.to_string(), "--data"])
            .arg(&data)
            .arg(&file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The import's progress lines arrive on a channel so the kill can be timed against them.
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        let mut child_stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let reader = std::thread::spawn(move || {
            let mut line = String::new();
            while child_stdout.read_line(&mut line).unwrap_or(0) > 0 {
                let _ = lines_tx.send(std::mem::take(&mut line));
            }
        });
        // The kill moment is the random variable: after 0..3 acknowledged chunks (so a slow,
        // loaded machine still kills mid-import rather than before the first ack), plus a
        // random delay of up to 20 ms.
        let mut out = Vec::new();
        for _ in 0..rng.below(4) {
            match lines.recv_timeout(Duration::from_secs(20)) {
                Ok(line) => out.push(line),
                Err(_) => break,
            }
        }
        std::thread::sleep(Duration::from_micros(rng.below(20_000)));
        let finished = child.try_wait().unwrap().is_some();
        child.kill().unwrap();
        let status = child.wait().unwrap();
        if !finished && !status.success() {
            kills += 1;
        }
        reader.join().unwrap();
        out.extend(lines.try_iter());
        let mut line_no = 0;
        for line in &out {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if let Some(n) = v["durable"].as_u64() {
                for i in line_no..line_no + n as usize {
                    acked.insert(format!("{prefix}-{i}"));
                }
                line_no += n as usize;
            }
        }
        round += 1;
    }
    let o = verify(&data);
    assert!(o.status.success(), "after {kills} kills: {}", stdout(&o));
    let o = run(&["export", "--data", data.to_str().unwrap()]);
    let mut seen = BTreeSet::new();
    for line in stdout(&o).lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let id = v["id"].as_str().unwrap().to_string();
        assert!(seen.insert(id.clone()), "{id} is in the log twice");
    }
    let missing: Vec<_> = acked.difference(&seen).collect();
    assert!(missing.is_empty(), "acknowledged but missing after {kills} kills: {missing:?}");
    assert!(!acked.is_empty());
    eprintln!("{kills} kills in {round} rounds; {} acknowledged events all present", acked.len());
}
