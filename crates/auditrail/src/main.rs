//! The `auditrail` binary: thin glue over the core and store crates. The only place `anyhow`
//! lives.

/// The store and the validators allocate many small buffers from several threads; mimalloc
/// halves the time glibc's allocator spent on them in `bench append` (see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_http;
mod bench_lookup;
mod bench_report;
mod bench_stages;
mod generator;

use anyhow::{Context as _, Result, bail};
use auditrail_core::event::{InvalidEvent, PreparedEvent, parse_json};
use auditrail_core::privacy::Filter;
use auditrail_store::audit::audit;
use auditrail_store::io::StdIo;
use auditrail_store::keys::{Keys, MasterKeySource};
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

/// A data directory and where its master keys are.
#[derive(clap::Args)]
struct DataDir {
    /// The data directory.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    master: MasterKeyArg,
}

#[derive(clap::Args)]
struct MasterKeyArg {
    /// The master key file, when it is kept outside the data directory
    /// [AUDITRAIL_MASTER_KEY_FILE; default <data>/keys/master.keys]. AUDITRAIL_MASTER_KEYS may
    /// hold the key text instead.
    #[arg(long, value_name = "PATH")]
    master_key_file: Option<PathBuf>,
}

impl MasterKeyArg {
    fn source(&self) -> Result<MasterKeySource> {
        MasterKeySource::from_env(self.master_key_file.clone()).map_err(anyhow::Error::msg)
    }
}

impl DataDir {
    fn options(&self) -> Result<Options> {
        Ok(Options { master_keys: self.master.source()?, ..Options::default() })
    }

    fn keys(&self) -> Result<Keys> {
        Keys::load_with(&StdIo::new(&self.data), &self.master.source()?).map_err(anyhow::Error::msg)
    }
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
        /// The master key file [AUDITRAIL_MASTER_KEY_FILE; setting master_key_file].
        #[arg(long, value_name = "PATH")]
        master_key_file: Option<PathBuf>,
    },
    /// Delete the search index and rebuild it from the log (run while the server is stopped).
    Reindex {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Create a data directory and its keys (key files are mode 0600). With --master-key-file
    /// the master key is written there (or an existing key file there is used) instead of
    /// into the data directory.
    Init {
        #[command(flatten)]
        dir: DataDir,
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
    /// Show and rotate keys.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Append NDJSON events durably; prints one JSON summary line. Events pass the same
    /// privacy filter as under `serve` (the `[privacy]` settings of --config and
    /// AUDITRAIL_PRIVACY_* variables).
    Import {
        #[command(flatten)]
        dir: DataDir,
        /// A file of one JSON event per line, or '-' for standard input.
        file: PathBuf,
        /// The server's TOML settings file, for its `[privacy]` section [AUDITRAIL_CONFIG].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Events per append (one block, one fsync, all or nothing).
        #[arg(long, default_value_t = 8192)]
        chunk_lines: usize,
        /// Print a JSON line to standard output as each chunk becomes durable.
        #[arg(long)]
        report_chunks: bool,
    },
    /// Write stored events as NDJSON (canonical JSON, one per line), oldest first.
    Export {
        #[command(flatten)]
        dir: DataDir,
        /// First seq to export.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Seq to stop before (default: everything).
        #[arg(long)]
        to: Option<u64>,
    },
    /// Audit the whole log: blocks, commitments, leaves, tiles, every checkpoint.
    Verify {
        #[command(flatten)]
        dir: DataDir,
    },
    /// Check an evidence bundle (GET /api/v1/events/evidence) with nothing but the file: the
    /// checkpoint's signature, each event's leaf recomputed from its bytes, each inclusion
    /// proof, the consistency proof, and that the archive holds nothing else. Exit status 0
    /// when everything verifies, 1 when anything fails (each failure is named).
    VerifyBundle {
        /// The bundle (a .tar file), or '-' for standard input.
        file: PathBuf,
        /// The log's public key as you obtained it from its operator: a vkey line
        /// (`name+hash+base64`) or a file holding one. Without it the key inside the bundle is
        /// used, which proves only that the bundle is consistent with itself.
        #[arg(long, value_name = "VKEY")]
        key: Option<String>,
        /// A signed checkpoint of this log that you kept earlier: the bundle must prove that
        /// its tree is that one or extends it (ask for the bundle with trusted_size=<its size>).
        #[arg(long, value_name = "FILE")]
        trusted_checkpoint: Option<PathBuf>,
    },
    /// Print a signed checkpoint: the newest, or the one of a given tree size.
    Checkpoint {
        #[command(flatten)]
        dir: DataDir,
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
    /// hold only keys/ (log.key, and master.keys unless the master keys are elsewhere) from the
    /// separate key backup.
    Restore {
        /// The archive URL given to `backup --to`.
        #[arg(long)]
        from: String,
        #[command(flatten)]
        dir: DataDir,
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
        #[command(flatten)]
        dir: DataDir,
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
    /// Add a new master key version (random) to the master key file. New segments are
    /// wrapped with it from the next segment on, once the server has restarted; existing ones
    /// stay under their version until `key rewrap`.
    Rotate {
        /// The data directory whose keys/master.keys to rotate (not needed with
        /// --master-key-file).
        #[arg(long)]
        data: Option<PathBuf>,
        #[command(flatten)]
        master: MasterKeyArg,
    },
    /// Re-wrap every segment's key and re-seal every sealed file under the newest master key
    /// version (run while the server is stopped; crash-safe), and print what uses which
    /// version.
    Rewrap {
        #[command(flatten)]
        dir: DataDir,
        /// Then remove from the master key file the versions nothing uses any more, after
        /// checking that everything opens without them.
        #[arg(long)]
        retire_old: bool,
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
        Command::Serve { data, listen, config, tls_self_signed, master_key_file } => {
            serve(data, listen, config, tls_self_signed, master_key_file)?
        }
        Command::Reindex { dir } => println!("{}", reindex(&dir.data, dir.options()?)?),
        Command::Init { dir, origin } => init(&dir, &origin)?,
        Command::ApiKey {
            command: ApiKeyCommand::Create { dir, name, scopes, projects, networks },
        } => println!(
            "{}",
            create_api_key(&dir.data, dir.options()?, &name, &scopes, projects, networks)?
        ),
        Command::Key { command: KeyCommand::Show { data } } => {
            let signer = auditrail_store::keys::load_signer(&StdIo::new(&data))
                .map_err(anyhow::Error::msg)?;
            println!("{}", signer.verifier().to_vkey());
        }
        Command::Key { command: KeyCommand::Rotate { data, master } } => rotate(data, &master)?,
        Command::Key { command: KeyCommand::Rewrap { dir, retire_old } } => {
            rewrap(&dir, retire_old)?
        }
        Command::Import { dir, file, config, chunk_lines, report_chunks } => {
            let config = config.or_else(|| std::env::var_os("AUDITRAIL_CONFIG").map(PathBuf::from));
            let settings = auditrail_server::Config::load(config.as_deref(), std::env::vars())?;
            let privacy = Filter::new(&settings.privacy)?;
            return import(&dir, &file, &privacy, chunk_lines, report_chunks);
        }
        Command::Export { dir, from, to } => export(&dir, from, to)?,
        Command::Verify { dir } => return verify(&dir),
        Command::VerifyBundle { file, key, trusted_checkpoint } => {
            return verify_bundle(&file, key.as_deref(), trusted_checkpoint.as_deref());
        }
        Command::Checkpoint { dir, size } => {
            let io = StdIo::new(&dir.data);
            let note = auditrail_store::store::find_checkpoint(&io, &dir.keys()?, size)?;
            print!("{note}");
        }
        Command::Backup { data, to } => backup(&data, &to)?,
        Command::Restore { from, dir, manifest } => restore(&from, &dir, manifest.as_deref())?,
        Command::Bench { command } => bench::run(command)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn create_api_key(
    data: &Path,
    options: Options,
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
        Store::open(data, options)
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
    master_key_file: Option<PathBuf>,
) -> Result<()> {
    let file = file.or_else(|| std::env::var_os("AUDITRAIL_CONFIG").map(PathBuf::from));
    // As the last variable, so the settings are checked together with it.
    let flags = tls_self_signed.then(|| ("AUDITRAIL_TLS_SELF_SIGNED".into(), "true".into()));
    let mut config =
        auditrail_server::Config::load(file.as_deref(), std::env::vars().chain(flags))?;
    if let Some(data) = data {
        config.data = data;
    }
    if let Some(path) = master_key_file {
        config.master_key_file = Some(path);
        config.check().map_err(anyhow::Error::msg)?;
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

fn restore(from: &str, dir: &DataDir, manifest: Option<&str>) -> Result<()> {
    use auditrail_archive::restore;
    let (data, master) = (dir.data.as_path(), dir.master.source()?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let dest = auditrail_archive::Destination::open(from)?;
    let restored = runtime
        .block_on(restore::restore_to_staging(&dest, data, manifest, &master))
        .with_context(|| format!("restore from {from} refused"))?;
    eprintln!(
        "restored and verified {} events ({} bytes) from {}; rebuilding the index",
        restored.events, restored.bytes, restored.manifest_name
    );
    let finish = || -> Result<()> {
        eprintln!("{}", reindex(&restored.staging, dir.options()?)?);
        restore::move_into_place(&restored.staging, data, &master)?;
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
fn reindex(data: &Path, options: Options) -> Result<String> {
    let started = std::time::Instant::now();
    let store = Store::open(data, options)?;
    let rows = auditrail_server::Config::default().index_memtable_rows_max;
    let index = auditrail_server::open_index(data, store.master_keys(), rows)?;
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

fn init(dir: &DataDir, origin: &str) -> Result<()> {
    let source = dir.master.source()?;
    let (verifier, how) = auditrail_store::init_with(&dir.data, origin, &source)?;
    println!("{}", verifier.to_vkey());
    let master = match how {
        auditrail_store::keys::MasterInit::Created => {
            format!("wrote a new master key to {}", source.describe())
        }
        auditrail_store::keys::MasterInit::Existing => {
            format!("using the existing master keys from {}", source.describe())
        }
    };
    eprintln!(
        "initialised {} for log {origin}; {master}. Keep the keys private and backed up \
         apart from the data: without the master keys the data directory is unreadable",
        dir.data.display()
    );
    Ok(())
}

/// `key rotate`: one more master key version in the key file.
fn rotate(data: Option<PathBuf>, master: &MasterKeyArg) -> Result<()> {
    let source = master.source()?;
    let root = match (&source, data) {
        (_, Some(data)) => data,
        (MasterKeySource::DataDir, None) => {
            bail!("say which keys to rotate: --data DIR, or --master-key-file PATH")
        }
        (_, None) => PathBuf::from("."),
    };
    let (version, text) =
        auditrail_store::rekey::rotate(&StdIo::new(&root), &source).map_err(anyhow::Error::msg)?;
    if let Some(text) = text {
        print!("{text}");
        eprintln!(
            "the master keys come from AUDITRAIL_MASTER_KEYS: store the text above (it adds \
             version {version}) in its place, then restart the server"
        );
        return Ok(());
    }
    eprintln!(
        "added master key version {version} to {}. Back the key file up now. A running server \
         keeps using the version it started with: restart it, and new segments are wrapped with \
         version {version} from the next segment on. Existing segments stay under their \
         version until `auditrail key rewrap` (server stopped).",
        source.describe()
    );
    Ok(())
}

/// `key rewrap [--retire-old]`: everything under the newest master key, and what uses which.
fn rewrap(dir: &DataDir, retire_old: bool) -> Result<()> {
    let store = Store::open(&dir.data, dir.options()?)?;
    let report = store.rewrap()?;
    let already = report.segments - report.segments_rewrapped;
    println!(
        "rewrapped {} of {} segments under master key version {} ({already} already were)",
        report.segments_rewrapped, report.segments, report.version
    );
    if !report.files_resealed.is_empty() {
        println!("resealed {}", report.files_resealed.join(", "));
    }
    if report.segments_rewrapped > 0 {
        // A trusted backup state would upload only appended bytes, never the new headers.
        let forgotten = auditrail_archive::backup::forget_progress(&dir.data)?;
        if forgotten > 0 {
            println!(
                "the next backup checks every archived piece and uploads the rewrapped segments \
                 again; archives written before now still need the old master key versions"
            );
        }
    }
    let usage = &report.usage;
    let described: Vec<String> = usage
        .versions()
        .iter()
        .map(|v| {
            let segments = usage.segments.get(v).copied().unwrap_or(0);
            let mut files: Vec<&str> = usage
                .sealed
                .iter()
                .chain(&usage.unknown)
                .filter(|(_, fv)| *fv == v)
                .map(|(p, _)| p.as_str())
                .collect();
            files.sort_unstable();
            let files =
                if files.is_empty() { String::new() } else { format!(", {}", files.join(", ")) };
            format!("version {v} ({segments} segments{files})")
        })
        .collect();
    println!(
        "in use: {}",
        if described.is_empty() { "nothing yet".into() } else { described.join("; ") }
    );
    for (path, v) in &usage.unknown {
        println!(
            "note: {path} is sealed under version {v} but unknown to this version of auditrail, \
             so it was not resealed and version {v} stays"
        );
    }
    if retire_old {
        let retired = store.retire_unused_master_keys()?;
        let kept: Vec<String> = retired.kept.iter().map(u32::to_string).collect();
        if retired.retired.is_empty() {
            println!(
                "retired nothing: every version left is in use or the newest ({})",
                kept.join(", ")
            );
        } else {
            let gone: Vec<String> = retired.retired.iter().map(u32::to_string).collect();
            match &retired.new_text {
                Some(text) => {
                    print!("{text}");
                    eprintln!(
                        "the master keys come from AUDITRAIL_MASTER_KEYS: store the text above \
                         (versions {}) in its place",
                        kept.join(", ")
                    );
                }
                None => println!(
                    "retired master key versions {} from {}; kept {}",
                    gone.join(", "),
                    dir.master.source()?.describe(),
                    kept.join(", ")
                ),
            }
        }
    }
    store.close()?;
    Ok(())
}

fn import(
    dir: &DataDir,
    file: &Path,
    privacy: &Filter,
    chunk_lines: usize,
    report_chunks: bool,
) -> Result<ExitCode> {
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
            if let Err(e) = prepare(privacy, &line) {
                bail!("line {}: {e}; nothing was imported", n + 1);
            }
        }
    }
    let store = Store::open(&dir.data, dir.options()?)?;
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
        match prepare(privacy, &line) {
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

/// One line of an import: parsed, masked, validated and prepared, as the server would.
fn prepare(privacy: &Filter, line: &str) -> Result<PreparedEvent, InvalidEvent> {
    privacy.validate(parse_json(line.as_bytes())?)?.prepare()
}

fn export(dir: &DataDir, from: u64, to: Option<u64>) -> Result<()> {
    let store = Store::open(&dir.data, dir.options()?)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    store.for_each_event(from, to.unwrap_or(u64::MAX), |_, bytes| {
        out.write_all(bytes).and_then(|_| out.write_all(b"\n")).map_err(Into::into)
    })?;
    out.flush()?;
    Ok(())
}

fn verify(dir: &DataDir) -> Result<ExitCode> {
    let keys = dir.keys()?;
    let io = StdIo::new(&dir.data);
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

/// How many failures `verify-bundle` prints before it only counts them.
const BUNDLE_PROBLEMS_SHOWN_MAX: usize = 50;

fn verify_bundle(file: &Path, key: Option<&str>, trusted: Option<&Path>) -> Result<ExitCode> {
    use auditrail_core::evidence::{VerifyOptions, verify};
    use auditrail_core::note::NoteVerifier;
    let bytes = if file == Path::new("-") {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut b)?;
        b
    } else {
        std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
    };
    // A key given inline, or the path of a file holding one.
    let key = key
        .map(|k| match NoteVerifier::from_vkey(k) {
            Ok(v) => Ok(v),
            Err(inline) => {
                let text = std::fs::read_to_string(k).map_err(|_| {
                    anyhow::anyhow!("--key: not a verifier key ({inline}) nor a readable file")
                })?;
                NoteVerifier::from_vkey(text.trim())
                    .with_context(|| format!("--key: {k} does not hold a verifier key"))
            }
        })
        .transpose()?;
    let trusted = trusted
        .map(|p| {
            std::fs::read_to_string(p)
                .with_context(|| format!("--trusted-checkpoint: cannot read {}", p.display()))
        })
        .transpose()?;
    let report = verify(
        &bytes,
        &VerifyOptions { key: key.as_ref(), trusted_checkpoint: trusted.as_deref() },
    );
    if report.bundled_key_only {
        eprintln!(
            "WARNING: checked against the key INSIDE the bundle (log.vkey). That proves only \
             that the bundle is consistent with itself: anyone can make a key and sign a \
             bundle with it. Pass --key with the log's public key as you obtained it from its \
             operator."
        );
    }
    for p in report.problems.iter().take(BUNDLE_PROBLEMS_SHOWN_MAX) {
        println!("FAIL {p}");
    }
    if report.problems.len() > BUNDLE_PROBLEMS_SHOWN_MAX {
        println!("... and {} more", report.problems.len() - BUNDLE_PROBLEMS_SHOWN_MAX);
    }
    if !report.ok() {
        let n = report.problems.len();
        let problems = if n == 1 { "1 problem".to_string() } else { format!("{n} problems") };
        println!("{problems}: {} is NOT verified evidence", file.display());
        return Ok(ExitCode::from(1));
    }
    use base64::Engine as _;
    let root = report.root.map(|r| base64::engine::general_purpose::STANDARD.encode(r));
    let mut summary = format!(
        "ok: {} event(s) of {}, each in the signed checkpoint of tree size {} (root {})",
        report.events_verified,
        report.origin.unwrap_or_default(),
        report.tree_size.unwrap_or(0),
        root.unwrap_or_default(),
    );
    if let Some(old) = report.consistent_from {
        summary += &format!(", which extends tree size {old}");
    }
    if report.trusted_checkpoint_holds {
        summary += "; your trusted checkpoint holds";
    }
    if report.bundled_key_only {
        summary += "; key: the bundle's own (see the warning)";
    }
    println!("{summary}");
    Ok(ExitCode::SUCCESS)
}
