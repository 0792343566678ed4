//! The `auditrail` binary: thin glue over the core and store crates. The only place `anyhow`
//! lives.

/// The store and the validators allocate many small buffers from several threads; mimalloc
/// halves the time glibc's allocator spent on them in `bench append` (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_http;
mod generator;

use anyhow::{Context as _, Result, bail};
use auditrail_core::event::{ClientEvent, PreparedEvent};
use auditrail_store::audit::audit;
use auditrail_store::io::StdIo;
use auditrail_store::keys::Keys;
use auditrail_store::{Options, Store};
use clap::{Parser, Subcommand};
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "auditrail",
    version,
    about = "A tamper-evident audit record repository for healthcare software"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service (native API, FHIR, the log). Initialises the data directory on
    /// first start. Settings: defaults < --config file < AUDITRAIL_* variables < flags.
    Serve {
        /// Data directory [AUDITRAIL_DATA; default ./auditrail-data].
        #[arg(long)]
        data: Option<PathBuf>,
        /// Address to listen on [AUDITRAIL_LISTEN; default 127.0.0.1:8600].
        #[arg(long)]
        listen: Option<String>,
        /// A TOML file of settings (see docs/operations.md) [AUDITRAIL_CONFIG].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Development only: HTTPS with a self-signed certificate for localhost, created once
        /// in <data>/tls/ [AUDITRAIL_TLS_SELF_SIGNED].
        #[arg(long)]
        tls_self_signed: bool,
    },
    /// Delete the search index and rebuild it from the log (run while the server is stopped).
    Reindex {
        #[arg(long)]
        data: PathBuf,
    },
    /// Create a data directory and its keys (key files are mode 0600).
    Init {
        #[arg(long)]
        data: PathBuf,
        /// The log's name in checkpoints: no spaces or '+', conventionally a host/path.
        #[arg(long, default_value = "auditrail.local/log")]
        origin: String,
    },
    /// Provision API keys for systems (the server must be stopped; while it runs, use
    /// POST /api/v1/api-keys).
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Show keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Append NDJSON events durably; prints one JSON summary line.
    Import {
        #[arg(long)]
        data: PathBuf,
        /// A file of one JSON event per line, or '-' for standard input.
        file: PathBuf,
        /// Events per append (one block, one fsync, all or nothing).
        #[arg(long, default_value_t = 8192)]
        chunk_lines: usize,
        /// Print a JSON line to standard output as each chunk becomes durable.
        #[arg(long)]
        report_chunks: bool,
    },
    /// Write stored events as NDJSON (canonical JSON, one per line), oldest first.
    Export {
        #[arg(long)]
        data: PathBuf,
        /// First seq to export.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Seq to stop before (default: everything).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Audit the whole log: blocks, commitments, leaves, tiles, every checkpoint.
    Verify {
        #[arg(long)]
        data: PathBuf,
    },
    /// Print a signed checkpoint: the newest, or the one of a given tree size.
    Checkpoint {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        size: Option<u64>,
    },
    /// Back up the data directory to object storage, incrementally (never the keys). Works on a
    /// live server's directory. Credentials come from AWS_*, GOOGLE_* or AZURE_* variables.
    Backup {
        #[arg(long)]
        data: PathBuf,
        /// s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or file:///path.
        #[arg(long)]
        to: String,
    },
    /// Restore a data directory from object storage, verify it and rebuild its index. DIR must
    /// hold only keys/ (log.key, master.keys) from the separate key backup.
    Restore {
        /// The archive URL given to `backup --to`.
        #[arg(long)]
        from: String,
        #[arg(long)]
        data: PathBuf,
        /// A manifest name (default: the newest).
        #[arg(long)]
        manifest: Option<String>,
    },
    /// Benchmarks: the store against this machine's raw limits; the service over HTTP.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ApiKeyCommand {
    /// Create an API key and print it (once; it is stored only as a digest). Recorded in the
    /// log as an `api_key.create` event.
    Create {
        #[arg(long)]
        data: PathBuf,
        /// A name saying which system uses it.
        #[arg(long)]
        name: String,
        /// A permission the key holds, e.g. events:write (repeat for more).
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Limit the key to this project (repeat for more).
        #[arg(long = "project")]
        projects: Vec<String>,
        /// Limit the key to this source network, CIDR (repeat for more).
        #[arg(long = "network")]
        networks: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Print the log's public verifier key as one C2SP vkey line.
    Show {
        #[arg(long)]
        data: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Serve { data, listen, config, tls_self_signed } => {
            serve(data, listen, config, tls_self_signed)?
        }
        Command::Reindex { data } => println!("{}", reindex(&data)?),
        Command::Init { data, origin } => {
            let verifier = auditrail_store::init(&data, &origin)?;
            println!("{}", verifier.to_vkey());
            eprintln!(
                "initialised {} for log {origin}; keep keys/ private and backed up",
                data.display()
            );
        }
        Command::ApiKey {
            command: ApiKeyCommand::Create { data, name, scopes, projects, networks },
        } => println!("{}", create_api_key(&data, &name, &scopes, projects, networks)?),
        Command::Key { command: KeyCommand::Show { data } } => {
            let keys = load_keys(&data)?;
            println!("{}", keys.signer.verifier().to_vkey());
        }
        Command::Import { data, file, chunk_lines, report_chunks } => {
            return import(&data, &file, chunk_lines, report_chunks);
        }
        Command::Export { data, from, to } => export(&data, from, to)?,
        Command::Verify { data } => return verify(&data),
        Command::Checkpoint { data, size } => {
            let io = StdIo::new(&data);
            let keys = load_keys(&data)?;
            let note = auditrail_store::store::find_checkpoint(&io, &keys, size)?;
            print!("{note}");
        }
        Command::Backup { data, to } => backup(&data, &to)?,
        Command::Restore { from, data, manifest } => restore(&from, &data, manifest.as_deref())?,
        Command::Bench { command } => bench::run(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn create_api_key(
    data: &Path,
    name: &str,
    scopes: &[String],
    projects: Vec<String>,
    networks: Vec<String>,
) -> Result<String> {
    use auditrail_server::auth::{Auth, SystemClock, roles::Permission};
    let scopes = scopes
        .iter()
        .map(|s| Permission::parse(s).with_context(|| format!("--scope {s}: no such permission")))
        .collect::<Result<_>>()?;
    let store = std::sync::Arc::new(
        Store::open(data, Options::default())
            .with_context(|| format!("cannot open {} (is the server running?)", data.display()))?,
    );
    let config = auditrail_server::Config::load(None, std::env::vars())?;
    let (auth, bootstrap) =
        Auth::open(data, store.clone(), config.auth_settings(), std::sync::Arc::new(SystemClock))
            .map_err(anyhow::Error::msg)?;
    if let Some(path) = bootstrap {
        eprintln!(
            "created the first administrator 'admin'; its one-time password is in {}",
            path.display()
        );
    }
    let projects = (!projects.is_empty()).then(|| projects.into_iter().collect());
    let (_, key) = auth
        .create_api_key(&Auth::system(), name, scopes, projects, networks)
        .map_err(|e| anyhow::anyhow!("{} ({})", e.message, e.code))?;
    drop(auth);
    std::sync::Arc::try_unwrap(store)
        .map_err(|_| anyhow::anyhow!("the store is still shared"))?
        .close()?;
    Ok(key)
}

fn serve(
    data: Option<PathBuf>,
    listen: Option<String>,
    file: Option<PathBuf>,
    tls_self_signed: bool,
) -> Result<()> {
    let file = file.or_else(|| std::env::var_os("AUDITRAIL_CONFIG").map(PathBuf::from));
    // As the last variable, so the settings are checked together with it.
    let flags = tls_self_signed.then(|| ("AUDITRAIL_TLS_SELF_SIGNED".into(), "true".into()));
    let mut config =
        auditrail_server::Config::load(file.as_deref(), std::env::vars().chain(flags))?;
    if let Some(data) = data {
        config.data = data;
    }
    if let Some(listen) = listen {
        config.listen = listen;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(auditrail_server::run(config, shutdown_signal())).map_err(anyhow::Error::msg)
}

/// Resolves on SIGTERM or SIGINT: stop accepting, finish requests, flush, final checkpoint.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        eprintln!("auditrail: cannot install signal handlers; stop the server with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    eprintln!("auditrail: shutting down");
}

fn backup(data: &Path, to: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dest = auditrail_archive::Destination::open(to)?;
    let report = runtime
        .block_on(auditrail_archive::backup_once(&dest, data))
        .with_context(|| format!("backup of {} to {to} failed", data.display()))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn restore(from: &str, data: &Path, manifest: Option<&str>) -> Result<()> {
    use auditrail_archive::restore;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dest = auditrail_archive::Destination::open(from)?;
    let restored = runtime
        .block_on(restore::restore_to_staging(&dest, data, manifest))
        .with_context(|| format!("restore from {from} refused"))?;
    eprintln!(
        "restored and verified {} events ({} bytes) from {}; rebuilding the index",
        restored.events, restored.bytes, restored.manifest_name
    );
    let finish = || -> Result<()> {
        eprintln!("{}", reindex(&restored.staging)?);
        restore::move_into_place(&restored.staging, data)?;
        Ok(())
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_dir_all(&restored.staging);
        return Err(e);
    }
    println!(
        "{}",
        serde_json::json!({
            "manifest": restored.manifest_name,
            "tree_size": restored.manifest.tree_size,
            "root": restored.manifest.root,
            "events": restored.events,
        })
    );
    Ok(())
}

/// Rebuilds the index from the log; returns a one-line summary.
fn reindex(data: &Path) -> Result<String> {
    let started = std::time::Instant::now();
    let store = Store::open(data, Options::default())?;
    let rows = auditrail_server::Config::default().index_memtable_rows_max;
    let index = auditrail_server::open_index(data, rows)?;
    index.reset()?;
    let mut follower = auditrail_index::Follower::new(&index, &store);
    let n = follower.catch_up(&index, &store)?;
    index.flush(true)?;
    store.close()?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "indexed {n} events in {secs:.2}s ({:.0} events/s); index {} bytes",
        n as f64 / secs.max(1e-9),
        index.disk_bytes()
    ))
}

fn load_keys(data: &Path) -> Result<Keys> {
    Keys::load(&StdIo::new(data)).map_err(anyhow::Error::msg)
}

fn import(data: &Path, file: &Path, chunk_lines: usize, report_chunks: bool) -> Result<ExitCode> {
    anyhow::ensure!(chunk_lines > 0, "--chunk-lines must be at least 1");
    let from_stdin = file == Path::new("-");
    let open = || -> Result<Box<dyn std::io::BufRead>> {
        Ok(if from_stdin {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(
                std::fs::File::open(file)
                    .with_context(|| format!("cannot open {}", file.display()))?,
            ))
        })
    };
    // A file is checked whole before anything is appended, so one bad line leaves the log
    // untouched. Standard input cannot be read twice: each chunk is checked before it is
    // appended, and the error says how many events went in before the bad line.
    if !from_stdin {
        for (n, line) in open()?.lines().enumerate() {
            let line = line.with_context(|| format!("cannot read line {}", n + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            if let Err(e) = ClientEvent::from_json(line.as_bytes()).and_then(ClientEvent::prepare) {
                bail!("line {}: {e}; nothing was imported", n + 1);
            }
        }
    }
    let store = Store::open(data, Options::default())?;
    let mut appended = 0u64;
    let mut duplicates = 0u64;
    let (mut first_seq, mut last_seq) = (None, None);
    let mut chunk: Vec<PreparedEvent> = Vec::with_capacity(chunk_lines);
    let mut flush = |chunk: &mut Vec<PreparedEvent>| -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let receipts = store.append(std::mem::take(chunk))?;
        if report_chunks {
            let seqs: Vec<u64> = receipts.iter().map(|r| r.seq).collect();
            println!("{}", serde_json::json!({"durable": receipts.len(), "seqs": seqs}));
            std::io::stdout().flush()?;
        }
        for r in receipts {
            if r.duplicate {
                duplicates += 1;
                continue;
            }
            appended += 1;
            first_seq.get_or_insert(r.seq);
            last_seq = Some(r.seq);
        }
        Ok(())
    };
    for (n, line) in open()?.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read line {}", n + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match ClientEvent::from_json(line.as_bytes()).and_then(ClientEvent::prepare) {
            Ok(e) => chunk.push(e),
            Err(e) => {
                bail!(
                    "line {}: {e}; the {} events before this line's chunk were imported",
                    n + 1,
                    appended
                );
            }
        }
        if chunk.len() == chunk_lines {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    let stages = store.close()?;
    let mut summary = serde_json::json!({
        "appended": appended, "first_seq": first_seq, "last_seq": last_seq, "tree_size": stages.published,
    });
    if duplicates > 0 {
        summary["duplicates"] = duplicates.into();
    }
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}

fn export(data: &Path, from: u64, to: Option<u64>) -> Result<()> {
    let store = Store::open(data, Options::default())?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    store.for_each_event(from, to.unwrap_or(u64::MAX), |_, bytes| {
        out.write_all(bytes).and_then(|_| out.write_all(b"\n")).map_err(Into::into)
    })?;
    out.flush()?;
    Ok(())
}

fn verify(data: &Path) -> Result<ExitCode> {
    let keys = load_keys(data)?;
    let io = StdIo::new(data);
    let started = std::time::Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_shown = std::time::Instant::now();
    let report = audit(&io, &keys, &mut |done| {
        if tty && last_shown.elapsed().as_millis() >= 200 {
            last_shown = std::time::Instant::now();
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprint!("\rverifying: {done} events ({rate:.0}/s)   ");
            let _ = std::io::stderr().flush();
        }
    })?;
    if tty {
        eprint!("\r\x1b[K");
    }
    let secs = started.elapsed().as_secs_f64();
    for p in &report.problems {
        println!("FAIL {p}");
    }
    let summary = format!(
        "{} events in {} segments ({} blocks), {} checkpoints, published tree size {}; {:.2}s ({:.0} events/s)",
        report.events,
        report.segments,
        report.blocks,
        report.checkpoints,
        report.published,
        secs,
        report.events as f64 / secs.max(1e-9)
    );
    let summary = if report.purged_segments > 0 {
        format!(
            "{summary}; {} of the events purged by retention ({} segments), checked against their leaf entries",
            report.purged_events, report.purged_segments
        )
    } else {
        summary
    };
    if report.ok() {
        println!("ok: {summary}");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} problems: {summary}", report.problems.len());
        Ok(ExitCode::from(1))
    }
}
