//! Black-box tests of the `auditrail` binary: what a user and an auditor do, through the CLI.

mod alerts;
mod archive;
mod at_rest;
mod auth;
mod cli;
mod evidence;
mod export;
mod fhir;
mod forward;
mod http;
mod integrity;
mod interop;
mod kill;
mod privacy;
mod reports;
mod retention;
mod serve;
mod tamper;
mod tls;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_auditrail"))
}

pub fn run(args: &[&str]) -> Output {
    run_env(args, &[])
}

/// `auditrail <args>` with these environment variables too.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    bin().args(args).envs(env.iter().copied()).output().expect("the auditrail binary runs")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `n` events as NDJSON, with client ids `"{prefix}-{i}"`.
pub fn ndjson(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            let failure = i % 17 == 0;
            serde_json::json!({
                "id": format!("{prefix}-{i}"),
                "occurred_at": "2026-11-22T10:15:00Z",
                "category": if failure { "authentication" } else { "phi_access" },
                "action": if failure { "login.failure" } else { "patient.read" },
                "outcome": if failure { "failure" } else { "success" },
                "actor": {"user_id": format!("u{}", i % 97), "ip": "10.1.2.3", "roles": ["physician"]},
                "source": {"system": "ehr", "site": "main-campus"},
                "patient": {"id": format!("MRN{:08}", i % 1013), "system": "urn:oid:2.16.840.1.113883.3.0"},
                "request": {"method": "GET", "path": "/api/patients/123", "status": if failure { 401 } else { 200 }},
                "context": {"reason": "chart review"}
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A fresh, initialised data directory.
pub fn init_dir(tmp: &Path) -> PathBuf {
    let data = tmp.join("data");
    let o =
        run(&["init", "--data", data.to_str().unwrap(), "--origin", "test.auditrail.local/log"]);
    assert!(o.status.success(), "init: {}", stderr(&o));
    data
}

pub fn import_file(data: &Path, file: &Path) -> Output {
    run(&["import", "--data", data.to_str().unwrap(), file.to_str().unwrap()])
}

pub fn verify(data: &Path) -> Output {
    run(&["verify", "--data", data.to_str().unwrap()])
}

pub fn vkey(data: &Path) -> String {
    stdout(&run(&["key", "show", "--data", data.to_str().unwrap()])).trim().to_string()
}
