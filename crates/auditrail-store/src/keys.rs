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
            format!("sealed under master key version {version}, which is missing")
        })?;
        sealer
            .open(&nonce, purpose.as_bytes(), &rest[4 + crypto::NONCE_BYTES..])
            .map_err(|e| format!("cannot open sealed {purpose}: {e}"))
    }
}

/// The first bytes of a file sealed by [`MasterKeys::seal_blob`].
pub const SEALED_MAGIC: &[u8; 8] = b"ATSEAL1\n";
const SEALED_HEADER_BYTES: usize = SEALED_MAGIC.len() + 4 + crypto::NONCE_BYTES;

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
        assert!(one.open_blob("accounts", &newer).unwrap_err().contains("version 2"));
    }
}
