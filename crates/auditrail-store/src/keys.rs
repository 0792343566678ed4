//! Key files: the log's Ed25519 signing key (Go `note` private key format) and the versioned
//! master keys that wrap segment secrets. Both are created by [`init`] with mode 0600.

use crate::crypto::{self, KEY_BYTES, Sealer};
use crate::io::Io;
use auditrail_core::note::NoteSigner;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use std::collections::BTreeMap;
use std::path::Path;

pub const SIGNING_KEY_PATH: &str = "keys/log.key";
pub const MASTER_KEYS_PATH: &str = "keys/master.keys";

/// The master keys by version; new segments are wrapped with the highest version.
#[derive(Clone)]
pub struct MasterKeys {
    keys: BTreeMap<u32, Sealer>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl MasterKeys {
    /// Parses lines of `<version> <base64 32-byte key>`; `#` starts a comment.
    pub fn parse(text: &str) -> Result<MasterKeys, String> {
        let mut keys = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad =
                || format!("{MASTER_KEYS_PATH} line {}: expected '<version> <base64 key>'", i + 1);
            let (v, k) = line.split_once(' ').ok_or_else(bad)?;
            let version: u32 = v.parse().map_err(|_| bad())?;
            let raw: [u8; KEY_BYTES] =
                B64.decode(k.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(bad)?;
            keys.insert(version, Sealer::new(&raw));
        }
        if keys.is_empty() {
            return Err(format!("{MASTER_KEYS_PATH} holds no key"));
        }
        Ok(MasterKeys { keys })
    }

    pub fn current(&self) -> (u32, &Sealer) {
        let (v, k) = self.keys.last_key_value().expect("at least one key");
        (*v, k)
    }

    pub fn get(&self, version: u32) -> Option<&Sealer> {
        self.keys.get(&version)
    }
}

#[derive(Debug, Clone)]
pub struct Keys {
    pub signer: NoteSigner,
    pub master: MasterKeys,
}

impl Keys {
    pub fn load(io: &dyn Io) -> Result<Keys, String> {
        let read = |p: &str| {
            io.read(p)
                .map_err(|e| format!("cannot read {p}: {e} (run `auditrail init` first)"))
                .and_then(|b| String::from_utf8(b).map_err(|_| format!("{p} is not text")))
        };
        let signer = NoteSigner::from_private_key_string(&read(SIGNING_KEY_PATH)?)
            .map_err(|e| format!("{SIGNING_KEY_PATH}: {e}"))?;
        let master = MasterKeys::parse(&read(MASTER_KEYS_PATH)?)?;
        Ok(Keys { signer, master })
    }

    /// Writes fresh keys through an [`Io`] (for simulated disks; real directories use [`init`]).
    pub fn install(io: &dyn Io, origin: &str) -> Result<Keys, String> {
        let signer = NoteSigner::from_seed(origin, crypto::random()).map_err(|e| e.to_string())?;
        let master_text = format!("1 {}\n", B64.encode(crypto::random::<KEY_BYTES>()));
        let write = |p: &str, t: &str| {
            io.create_dir_all("keys")
                .and_then(|_| io.write_file(p, t.as_bytes()))
                .and_then(|_| io.sync_file(p))
        };
        write(SIGNING_KEY_PATH, &format!("{}\n", signer.to_private_key_string()))
            .map_err(|e| e.to_string())?;
        write(MASTER_KEYS_PATH, &master_text).map_err(|e| e.to_string())?;
        io.sync_dir("keys").map_err(|e| e.to_string())?;
        Ok(Keys { signer, master: MasterKeys::parse(&master_text)? })
    }
}

/// Writes new key files into `dir/keys/` with mode 0600; refuses to overwrite existing keys.
pub fn init(dir: &Path, origin: &str) -> Result<Keys, String> {
    use std::io::Write as _;
    let keys_dir = dir.join("keys");
    std::fs::create_dir_all(&keys_dir)
        .map_err(|e| format!("cannot create {}: {e}", keys_dir.display()))?;
    let signer = NoteSigner::from_seed(origin, crypto::random()).map_err(|e| e.to_string())?;
    let master_text = format!(
        "# auditrail master keys: '<version> <base64 key>'. Keep a copy offline: without it the\n\
         # events cannot be read. Add a higher version to rotate; keep old versions to read old segments.\n\
         1 {}\n",
        B64.encode(crypto::random::<KEY_BYTES>())
    );
    for (path, contents) in [
        (SIGNING_KEY_PATH, format!("{}\n", signer.to_private_key_string())),
        (MASTER_KEYS_PATH, master_text.clone()),
    ] {
        let full = dir.join(path);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        let mut f = opts.open(&full).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{} already exists: this directory is already initialised", full.display())
            }
            _ => format!("cannot create {}: {e}", full.display()),
        })?;
        f.write_all(contents.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("cannot write {}: {e}", full.display()))?;
    }
    std::fs::File::open(&keys_dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())?;
    Ok(Keys { signer, master: MasterKeys::parse(&master_text)? })
}
