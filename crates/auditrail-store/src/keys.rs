//! Key files: the log's Ed25519 signing key (Go `note` private key format) and the versioned
//! master keys that wrap segment secrets and seal small files ([`MasterKeys::seal_blob`]).
//!
//! The master keys come from a [`MasterKeySource`]: `keys/master.keys` in the data directory
//! (the default), a file elsewhere (`master_key_file`), or the `AUDITRAIL_MASTER_KEYS`
//! environment variable. Keeping them outside the data directory means a copy of the directory
//! alone (a stolen disk, a backup) reads as noise. A key file readable by group or others is
//! refused.

use crate::crypto::{self, KEY_BYTES, Sealer};
use crate::io::Io;
use auditrail_core::note::NoteSigner;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const SIGNING_KEY_PATH: &str = "keys/log.key";
pub const MASTER_KEYS_PATH: &str = "keys/master.keys";
/// Holds the master key text itself (for containers and secret managers).
pub const MASTER_KEYS_ENV: &str = "AUDITRAIL_MASTER_KEYS";
/// Names a master key file outside the data directory (the `master_key_file` setting).
pub const MASTER_KEY_FILE_ENV: &str = "AUDITRAIL_MASTER_KEY_FILE";

/// A file sealed with [`MasterKeys::seal_blob`]: where it lives and the purpose it is sealed
/// for (the associated data, so one sealed file cannot be passed off as another).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedFile {
    pub path: &'static str,
    pub purpose: &'static str,
}

/// The search index's secret (its file key and patient-token key derive from it).
pub const INDEX_KEY: SealedFile = SealedFile { path: "keys/index.key", purpose: "index.key" };
/// The legal holds (they name patients, as tokens, and carry free-text reasons).
pub const HOLDS: SealedFile =
    SealedFile { path: crate::retention::HOLDS_PATH, purpose: "retention.holds" };

/// The authentication layer's accounts (crates/auditrail-server/src/auth/accounts.rs).
pub const ACCOUNTS: SealedFile =
    SealedFile { path: "auth/accounts.sealed", purpose: "auth/accounts" };

/// The alert engine's state (crates/auditrail-server/src/alerts): alerts, its cursor, rules
/// changed through the API, the networks and devices first-seen rules learnt per user.
pub const ALERTS: SealedFile = SealedFile { path: "alerts/state.sealed", purpose: "alerts/state" };

/// Every sealed file in a data directory. `auditrail key rewrap` re-seals each under the newest
/// master key, and retiring a master key version first checks that each opens without it, so
/// **a new sealed file must be listed here**; rewrap refuses to retire keys while it finds a
/// sealed file it does not know.
pub const SEALED_FILES: &[SealedFile] = &[INDEX_KEY, HOLDS, ACCOUNTS, ALERTS];

/// The master keys by version; new segments are wrapped with the highest version.
#[derive(Clone)]
pub struct MasterKeys {
    keys: BTreeMap<u32, Sealer>,
    /// Where they were read from, for error messages.
    origin: Arc<str>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .field("origin", &self.origin)
            .finish()
    }
}

/// One parsed line of a master key file.
struct KeyLine {
    version: u32,
    raw: [u8; KEY_BYTES],
}

/// Parses one line: `None` for blank lines and `#` comments.
fn parse_line(line: &str, n: usize, origin: &str) -> Result<Option<KeyLine>, String> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let bad = || format!("{origin} line {n}: expected '<version> <base64 32-byte key>'");
    let (v, k) = line.split_once(' ').ok_or_else(bad)?;
    let version: u32 = v.parse().map_err(|_| bad())?;
    let raw = B64.decode(k.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
    Ok(Some(KeyLine { version, raw }))
}

impl MasterKeys {
    /// Parses lines of `<version> <base64 key>`; `#` starts a comment.
    pub fn parse(text: &str) -> Result<MasterKeys, String> {
        MasterKeys::parse_from(text, MASTER_KEYS_PATH)
    }

    /// Like [`MasterKeys::parse`]; `origin` names where the text came from in errors.
    pub fn parse_from(text: &str, origin: &str) -> Result<MasterKeys, String> {
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            if let Some(k) = parse_line(line, i + 1, origin)?
                && keys.insert(k.version, Sealer::new(&k.raw)).is_some()
            {
                return Err(format!("{origin} line {}: version {} repeats", i + 1, k.version));
            }
        }
        if keys.is_empty() {
            return Err(format!("{origin} holds no master key"));
        }
        Ok(MasterKeys { keys, origin: origin.into() })
    }

    pub fn current(&self) -> (u32, &Sealer) {
        let (v, k) = self.keys.last_key_value().expect("at least one key");
        (*v, k)
    }

    pub fn get(&self, version: u32) -> Option<&Sealer> {
        self.keys.get(&version)
    }

    /// Every version held, ascending.
    pub fn versions(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Where the keys were read from: a path or the environment variable.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The same keys without `versions` (the newest always stays).
    pub fn without(&self, versions: &[u32]) -> MasterKeys {
        let (newest, _) = self.current();
        let keys = self
            .keys
            .iter()
            .filter(|(v, _)| **v == newest || !versions.contains(v))
            .map(|(v, k)| (*v, k.clone()))
            .collect();
        MasterKeys { keys, origin: self.origin.clone() }
    }

    /// Encrypts a small file (the accounts database, a wrapped secret) under the current master
    /// key: `SEALED_MAGIC`, the key version (u32 BE), a random nonce, then AES-256-GCM of
    /// `plaintext` with `purpose` as associated data, so a blob sealed for one file cannot be
    /// passed off as another. Rotation re-seals blobs under the newest version.
    pub fn seal_blob(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        let (version, sealer) = self.current();
        let nonce = crypto::random::<{ crypto::NONCE_BYTES }>();
        let mut out = Vec::with_capacity(SEALED_HEADER_BYTES + plaintext.len() + crypto::TAG_BYTES);
        out.extend_from_slice(SEALED_MAGIC);
        out.extend_from_slice(&version.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealer.seal(&nonce, purpose.as_bytes(), plaintext));
        out
    }

    /// Decrypts a blob from [`MasterKeys::seal_blob`] sealed for the same `purpose`.
    pub fn open_blob(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        let Some(rest) = sealed.strip_prefix(SEALED_MAGIC) else {
            return Err("not a sealed file".into());
        };
        if rest.len() < 4 + crypto::NONCE_BYTES {
            return Err("sealed file is truncated".into());
        }
        let version = u32::from_be_bytes(rest[..4].try_into().expect("4 bytes"));
        let nonce: [u8; crypto::NONCE_BYTES] =
            rest[4..4 + crypto::NONCE_BYTES].try_into().expect("nonce bytes");
        let sealer = self.get(version).ok_or_else(|| {
            format!("sealed under master key version {version}, which {} lacks", self.origin)
        })?;
        sealer.open(&nonce, purpose.as_bytes(), &rest[4 + crypto::NONCE_BYTES..]).map_err(|_| {
            format!(
                "cannot open sealed {purpose} with master key version {version} from {}: \
                 the wrong master key, or altered bytes",
                self.origin
            )
        })
    }

    /// Opens a file that is sealed, or that predates sealing (plaintext, returned as is so
    /// that its owner can seal it: a migration). Returns the plaintext and whether it was
    /// sealed.
    pub fn open_blob_or_legacy(
        &self,
        purpose: &str,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, bool), String> {
        if bytes.starts_with(SEALED_MAGIC) {
            Ok((self.open_blob(purpose, bytes)?, true))
        } else {
            Ok((bytes.to_vec(), false))
        }
    }
}

/// The master key version a sealed blob is under, if `bytes` is one.
pub fn sealed_version(bytes: &[u8]) -> Option<u32> {
    let rest = bytes.strip_prefix(SEALED_MAGIC)?;
    Some(u32::from_be_bytes(rest.get(..4)?.try_into().ok()?))
}

/// The first bytes of a file sealed by [`MasterKeys::seal_blob`].
pub const SEALED_MAGIC: &[u8; 8] = b"ATSEAL1\n";
const SEALED_HEADER_BYTES: usize = SEALED_MAGIC.len() + 4 + crypto::NONCE_BYTES;

/// Where the master keys come from. Settings: `master_key_file` (TOML), `AUDITRAIL_MASTER_KEY_FILE`
/// or `--master-key-file`; or `AUDITRAIL_MASTER_KEYS` holding the text itself.
#[derive(Clone, Default)]
pub enum MasterKeySource {
    /// `keys/master.keys` in the data directory.
    #[default]
    DataDir,
    /// A file anywhere, typically outside the data directory.
    File(PathBuf),
    /// The text of a key file, from `AUDITRAIL_MASTER_KEYS`.
    Env(Arc<str>),
}

impl std::fmt::Debug for MasterKeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeySource::DataDir => f.write_str("DataDir"),
            MasterKeySource::File(p) => f.debug_tuple("File").field(p).finish(),
            MasterKeySource::Env(_) => f.write_str("Env(..)"),
        }
    }
}

/// Refuses a key file that group or others may read, naming the fix.
fn check_private(what: &str, mode: Option<u32>) -> Result<(), String> {
    match mode {
        Some(m) if m & 0o077 != 0 => Err(format!(
            "{what} is readable by group or others (mode {:04o}); a master key file must be \
             private: run `chmod 600 {what}`",
            m & 0o7777
        )),
        _ => Ok(()),
    }
}

impl MasterKeySource {
    /// The source the settings name: the text of `AUDITRAIL_MASTER_KEYS` (`env_text`), a file
    /// (`file`), or by default `keys/master.keys`. Naming both is refused: which one holds the
    /// keys would be a guess.
    pub fn new(file: Option<PathBuf>, env_text: Option<String>) -> Result<MasterKeySource, String> {
        match (file, env_text) {
            (Some(f), Some(_)) => Err(format!(
                "both {MASTER_KEYS_ENV} and a master key file ({}) are set; set only one",
                f.display()
            )),
            (Some(f), None) => Ok(MasterKeySource::File(f)),
            (None, Some(text)) => Ok(MasterKeySource::Env(text.into())),
            (None, None) => Ok(MasterKeySource::DataDir),
        }
    }

    /// From a `--master-key-file` flag, else `AUDITRAIL_MASTER_KEY_FILE`, and
    /// `AUDITRAIL_MASTER_KEYS`, read from this process's environment.
    pub fn from_env(flag: Option<PathBuf>) -> Result<MasterKeySource, String> {
        let file = flag.or_else(|| {
            std::env::var_os(MASTER_KEY_FILE_ENV).filter(|v| !v.is_empty()).map(PathBuf::from)
        });
        let text = std::env::var(MASTER_KEYS_ENV).ok().filter(|t| !t.trim().is_empty());
        MasterKeySource::new(file, text)
    }

    /// Says where the keys are, for messages.
    pub fn describe(&self) -> String {
        match self {
            MasterKeySource::DataDir => MASTER_KEYS_PATH.into(),
            MasterKeySource::File(p) => p.display().to_string(),
            MasterKeySource::Env(_) => format!("${MASTER_KEYS_ENV}"),
        }
    }

    /// Whether the keys live in a file this process can rewrite.
    pub fn is_writable(&self) -> bool {
        !matches!(self, MasterKeySource::Env(_))
    }

    /// The key text (a file must not be readable by group or others).
    pub fn read_text(&self, io: &dyn Io) -> Result<String, String> {
        let what = self.describe();
        let missing = |e: std::io::Error| {
            format!(
                "cannot read the master keys from {what}: {e} (run `auditrail init` first, or \
                 set master_key_file / {MASTER_KEYS_ENV} to where the master keys are)"
            )
        };
        // The mode is checked first: a key file others can read is refused, not used.
        let bytes = match self {
            MasterKeySource::DataDir => {
                check_private(&what, io.permissions(MASTER_KEYS_PATH).map_err(missing)?)?;
                io.read(MASTER_KEYS_PATH).map_err(missing)?
            }
            MasterKeySource::File(p) => {
                let meta = std::fs::metadata(p).map_err(missing)?;
                let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
                check_private(&what, Some(mode))?;
                std::fs::read(p).map_err(missing)?
            }
            MasterKeySource::Env(text) => return Ok(text.to_string()),
        };
        String::from_utf8(bytes).map_err(|_| format!("{what} is not text"))
    }

    pub fn load(&self, io: &dyn Io) -> Result<MasterKeys, String> {
        MasterKeys::parse_from(&self.read_text(io)?, &self.describe())
    }

    /// Replaces the key file atomically and durably (a temporary file with mode 0600, fsync,
    /// rename, fsync of the directory): a crash leaves the old keys or the new ones, never a
    /// mix. The text must parse.
    pub fn replace_text(&self, io: &dyn Io, text: &str) -> Result<(), String> {
        MasterKeys::parse_from(text, "the new master keys")?;
        let what = self.describe();
        let fail = |e: std::io::Error| format!("cannot write the master keys to {what}: {e}");
        match self {
            MasterKeySource::DataDir => {
                let tmp = format!("{MASTER_KEYS_PATH}.tmp");
                let _ = io.remove(&tmp);
                io.write_private_file(&tmp, text.as_bytes()).map_err(fail)?;
                io.sync_file(&tmp).map_err(fail)?;
                io.rename(&tmp, MASTER_KEYS_PATH).map_err(fail)?;
                io.sync_dir("keys").map_err(fail)
            }
            MasterKeySource::File(path) => {
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(".tmp");
                let tmp = PathBuf::from(tmp);
                let _ = std::fs::remove_file(&tmp);
                write_new_private(&tmp, text.as_bytes()).map_err(fail)?;
                std::fs::rename(&tmp, path).map_err(fail)?;
                sync_parent(path).map_err(fail)
            }
            MasterKeySource::Env(_) => Err(format!(
                "the master keys come from {MASTER_KEYS_ENV}, which auditrail cannot change"
            )),
        }
    }
}

/// Creates `path` (it must not exist) with mode 0600 and `bytes`, and fsyncs it.
fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::File::open(parent)?.sync_all()
}

/// A fresh master key file's text, version 1.
fn new_master_text() -> String {
    format!(
        "# auditrail master keys: '<version> <base64 key>'. Keep a copy offline: without it the\n\
         # events cannot be read. `auditrail key rotate` adds a version; keep old versions until\n\
         # `auditrail key rewrap --retire-old` says nothing uses them.\n\
         1 {}\n",
        B64.encode(crypto::random::<KEY_BYTES>())
    )
}

/// `text` with one more line: the next version and a random key. Returns the text and the
/// new version. Comments and existing lines are kept as they are.
pub fn with_new_version(text: &str, origin: &str) -> Result<(String, u32), String> {
    let keys = MasterKeys::parse_from(text, origin)?;
    let (newest, _) = keys.current();
    let next = newest.checked_add(1).ok_or("no master key version left")?;
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!("{next} {}\n", B64.encode(crypto::random::<KEY_BYTES>())));
    Ok((out, next))
}

/// `text` without the lines of `versions` (comments and other lines kept as they are).
pub fn without_versions(text: &str, versions: &[u32], origin: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.lines().enumerate() {
        if parse_line(line, i + 1, origin)?.is_some_and(|k| versions.contains(&k.version)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    MasterKeys::parse_from(&out, origin)?;
    Ok(out)
}

#[derive(Debug, Clone)]
pub struct Keys {
    pub signer: NoteSigner,
    pub master: MasterKeys,
}

impl Keys {
    /// Loads the signing key and the master keys from `keys/master.keys`.
    pub fn load(io: &dyn Io) -> Result<Keys, String> {
        Keys::load_with(io, &MasterKeySource::DataDir)
    }

    /// Loads the signing key and the master keys from `source`.
    pub fn load_with(io: &dyn Io, source: &MasterKeySource) -> Result<Keys, String> {
        let signer = load_signer(io)?;
        let master = source.load(io)?;
        Ok(Keys { signer, master })
    }

    /// Writes fresh keys through an [`Io`] (for simulated disks; real directories use [`init`]).
    pub fn install(io: &dyn Io, origin: &str) -> Result<Keys, String> {
        let signer = NoteSigner::from_seed(origin, crypto::random()).map_err(|e| e.to_string())?;
        let master_text = format!("1 {}\n", B64.encode(crypto::random::<KEY_BYTES>()));
        let write = |p: &str, t: &str| {
            io.create_dir_all("keys")
                .and_then(|_| io.write_private_file(p, t.as_bytes()))
                .and_then(|_| io.sync_file(p))
        };
        write(SIGNING_KEY_PATH, &format!("{}\n", signer.to_private_key_string()))
            .map_err(|e| e.to_string())?;
        write(MASTER_KEYS_PATH, &master_text).map_err(|e| e.to_string())?;
        io.sync_dir("keys").map_err(|e| e.to_string())?;
        Ok(Keys { signer, master: MasterKeys::parse(&master_text)? })
    }
}

/// The log's signing key alone (for what needs no master key: printing the public key).
pub fn load_signer(io: &dyn Io) -> Result<NoteSigner, String> {
    let text = io
        .read(SIGNING_KEY_PATH)
        .map_err(|e| format!("cannot read {SIGNING_KEY_PATH}: {e} (run `auditrail init` first)"))
        .and_then(|b| {
            String::from_utf8(b).map_err(|_| format!("{SIGNING_KEY_PATH} is not text"))
        })?;
    NoteSigner::from_private_key_string(&text).map_err(|e| format!("{SIGNING_KEY_PATH}: {e}"))
}

/// What [`init`] did with the master keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterInit {
    /// A new key file was written.
    Created,
    /// The source already held keys (a file provisioned beforehand, or the environment).
    Existing,
}

/// Writes new key files into `dir/keys/` with mode 0600; refuses to overwrite existing keys.
/// The master keys go where `source` says: a new `keys/master.keys`, a new file elsewhere (an
/// existing one is used as it is, so several directories can share provisioned keys), or
/// nothing at all when they come from the environment.
pub fn init(
    dir: &Path,
    origin: &str,
    source: &MasterKeySource,
) -> Result<(Keys, MasterInit), String> {
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir)
        .map_err(|e| format!("cannot create {}: {e}", keys_dir.display()))?;
    let signing = dir.join(SIGNING_KEY_PATH);
    if signing.exists() {
        return Err(format!(
            "{} already exists: this directory is already initialised",
            signing.display()
        ));
    }
    let (master, how) = match source {
        MasterKeySource::DataDir | MasterKeySource::File(_) => {
            let path = match source {
                MasterKeySource::File(p) => p.clone(),
                _ => dir.join(MASTER_KEYS_PATH),
            };
            match std::fs::symlink_metadata(&path) {
                Ok(_) if matches!(source, MasterKeySource::File(_)) => {
                    (source.load(&crate::io::StdIo::new(dir))?, MasterInit::Existing)
                }
                Ok(_) => {
                    return Err(format!(
                        "{} already exists: this directory is already initialised",
                        path.display()
                    ));
                }
                Err(_) => {
                    let text = new_master_text();
                    write_new_private(&path, text.as_bytes())
                        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                    sync_parent(&path).map_err(|e| e.to_string())?;
                    (MasterKeys::parse_from(&text, &source.describe())?, MasterInit::Created)
                }
            }
        }
        MasterKeySource::Env(_) => {
            (source.load(&crate::io::StdIo::new(dir))?, MasterInit::Existing)
        }
    };
    let signer = NoteSigner::from_seed(origin, crypto::random()).map_err(|e| e.to_string())?;
    write_new_private(&signing, format!("{}\n", signer.to_private_key_string()).as_bytes())
        .map_err(|e| format!("cannot create {}: {e}", signing.display()))?;
    std::fs::File::open(&keys_dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
    Ok((Keys { signer, master }, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_blobs_open_only_for_their_purpose_and_key() {
        let one = MasterKeys::parse(&format!("1 {}\n", B64.encode([7u8; 32]))).unwrap();
        let sealed = one.seal_blob("accounts", b"secret");
        assert_eq!(one.open_blob("accounts", &sealed).unwrap(), b"secret");
        assert!(one.open_blob("holds", &sealed).is_err());
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(one.open_blob("accounts", &altered).is_err());
        let two = MasterKeys::parse(&format!(
            "1 {}\n2 {}\n",
            B64.encode([7u8; 32]),
            B64.encode([9u8; 32])
        ))
        .unwrap();
        assert_eq!(two.open_blob("accounts", &sealed).unwrap(), b"secret");
        let newer = two.seal_blob("accounts", b"secret");
        assert_eq!(sealed_version(&newer), Some(2));
        assert!(one.open_blob("accounts", &newer).unwrap_err().contains("version 2"));
        assert_eq!(
            one.open_blob_or_legacy("accounts", b"plain").unwrap(),
            (b"plain".to_vec(), false)
        );
    }

    #[test]
    fn key_text_gains_and_loses_versions_keeping_comments() {
        let text = format!("# keep me\n1 {}\n", B64.encode([7u8; 32]));
        let (two, v) = with_new_version(&text, "t").unwrap();
        assert_eq!(v, 2);
        assert!(two.starts_with(&text));
        assert_eq!(MasterKeys::parse(&two).unwrap().versions(), [1, 2]);
        let (three, _) = with_new_version(&two, "t").unwrap();
        let retired = without_versions(&three, &[1, 2], "t").unwrap();
        assert!(retired.starts_with("# keep me\n3 "), "{retired}");
        assert_eq!(MasterKeys::parse(&retired).unwrap().versions(), [3]);
        assert!(without_versions(&text, &[1], "t").unwrap_err().contains("no master key"));
        let twice = format!("{text}1 {}\n", B64.encode([8u8; 32]));
        assert!(MasterKeys::parse(&twice).unwrap_err().contains("repeats"));
    }

    #[test]
    fn sources_refuse_shared_files_and_ambiguity() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.keys");
        std::fs::write(&path, format!("1 {}\n", B64.encode([7u8; 32]))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let source = MasterKeySource::File(path.clone());
        let io = crate::io::StdIo::new(dir.path());
        let e = source.load(&io).unwrap_err();
        assert!(e.contains("readable by group or others") && e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(source.load(&io).unwrap().versions(), [1]);

        let text = format!("1 {}\n", B64.encode([7u8; 32]));
        let env = MasterKeySource::new(None, Some(text.clone())).unwrap();
        assert_eq!(env.load(&io).unwrap().origin(), "$AUDITRAIL_MASTER_KEYS");
        assert!(!format!("{env:?}").contains(&text[2..]), "the key text is never printed");
        assert!(MasterKeySource::new(Some(path), Some(text)).unwrap_err().contains("only one"));
    }
}
