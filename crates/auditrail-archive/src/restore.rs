//! Restore: download a manifest's files into a fresh directory beside the target, check
//! every blob against its name and length, run the log's full verification, and only then
//! move the directory into place. A failed restore leaves the target as it was (holding only
//! its keys) and no directory that looks like a valid log.
//!
//! A restore needs the master keys the archived segments are wrapped under (the archive never
//! holds keys): `keys/master.keys` in the target, or the same master key file or
//! `AUDITRAIL_MASTER_KEYS` the log was written with. After a `key rewrap --retire-old`, an
//! archive written before the rewrap still needs the retired versions.

use crate::ArchiveError;
use crate::destination::Destination;
use crate::manifest::{self, Manifest, blob_key};
use auditrail_store::io::StdIo;
use auditrail_store::keys::{Keys, MASTER_KEYS_PATH, MasterKeySource, SIGNING_KEY_PATH};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

/// What a restore produced (before it is moved into place).
#[derive(Debug)]
pub struct Restored {
    /// The staging directory holding the verified files and a copy of the keys.
    pub staging: PathBuf,
    pub manifest_name: String,
    pub manifest: Manifest,
    pub events: u64,
    pub bytes: u64,
}

/// Checks that `data` can receive a restore: it exists, holds the keys the log was written
/// with (the master keys there unless `master` names another source), and nothing else.
pub fn check_target(data: &Path, master: &MasterKeySource) -> Result<(), ArchiveError> {
    let in_dir = matches!(master, MasterKeySource::DataDir);
    let missing_keys = || {
        let which = if in_dir {
            format!("{SIGNING_KEY_PATH} and {MASTER_KEYS_PATH}")
        } else {
            format!("{SIGNING_KEY_PATH} (the master keys come from {})", master.describe())
        };
        ArchiveError::InvalidInput(format!(
            "{} must hold the log's keys before a restore: copy {which} \
             (and keys/index.key if you have it) from your key backup into {}/keys/; \
             keys are never stored in the archive",
            data.display(),
            data.display()
        ))
    };
    let entries = match std::fs::read_dir(data) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing_keys()),
        Err(e) => return Err(ArchiveError::io(data.display(), e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| ArchiveError::io(data.display(), e))?;
        if entry.file_name() != "keys" {
            return Err(ArchiveError::InvalidInput(format!(
                "{} is not empty (it holds {:?}); restore only into a directory that holds nothing but keys/",
                data.display(),
                entry.file_name()
            )));
        }
    }
    let needed: &[&str] =
        if in_dir { &[SIGNING_KEY_PATH, MASTER_KEYS_PATH] } else { &[SIGNING_KEY_PATH] };
    for k in needed {
        if !data.join(k).is_file() {
            return Err(missing_keys());
        }
    }
    Ok(())
}

fn staging_dir(data: &Path, tag: &str) -> Result<PathBuf, ArchiveError> {
    let name = data.file_name().ok_or_else(|| {
        ArchiveError::InvalidInput(format!("{} has no directory name", data.display()))
    })?;
    let mut staged = name.to_os_string();
    staged.push(format!(".{tag}-{}", std::process::id()));
    Ok(data.with_file_name(staged))
}

/// Copies the key files into the staging directory, keeping them private.
fn copy_keys(data: &Path, staging: &Path) -> Result<(), ArchiveError> {
    use std::os::unix::fs::PermissionsExt as _;
    let keys = staging.join("keys");
    std::fs::create_dir_all(&keys).map_err(|e| ArchiveError::io(keys.display(), e))?;
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| ArchiveError::io(keys.display(), e))?;
    let from = data.join("keys");
    for entry in std::fs::read_dir(&from).map_err(|e| ArchiveError::io(from.display(), e))? {
        let entry = entry.map_err(|e| ArchiveError::io(from.display(), e))?;
        if entry.path().is_file() {
            let to = keys.join(entry.file_name());
            std::fs::copy(entry.path(), &to).map_err(|e| ArchiveError::io(to.display(), e))?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| ArchiveError::io(to.display(), e))?;
        }
    }
    Ok(())
}

/// Picks the manifest (`name`, or the newest) and restores it into a staging directory
/// beside `data`, verified. The caller rebuilds the index there and then calls
/// [`move_into_place`]. On any error the staging directory is removed.
pub async fn restore_to_staging(
    dest: &Destination,
    data: &Path,
    name: Option<&str>,
    master: &MasterKeySource,
) -> Result<Restored, ArchiveError> {
    check_target(data, master)?;
    let keys = Keys::load_with(&StdIo::new(data), master).map_err(|e| {
        ArchiveError::InvalidInput(format!("cannot load the keys in {}: {e}", data.display()))
    })?;
    let (manifest_name, manifest) = match name {
        Some(n) => {
            let n = n.trim_start_matches("manifests/").to_string();
            let key = format!("{}/{n}", manifest::MANIFESTS_DIR);
            let bytes = dest.get(&key).await?.ok_or_else(|| {
                ArchiveError::corrupted(dest.path(&key), "missing: no such manifest")
            })?;
            let m = Manifest::parse(&key, &bytes)?;
            (n, m)
        }
        None => crate::backup::newest_manifest(dest).await?.ok_or_else(|| {
            ArchiveError::InvalidInput(format!("{} holds no manifest to restore", dest.url))
        })?,
    };
    let staging = staging_dir(data, "restoring")?;
    if staging.exists() {
        return Err(ArchiveError::InvalidInput(format!(
            "{} exists; remove it first",
            staging.display()
        )));
    }
    let result = fill(dest, data, &staging, &manifest, &keys).await;
    match result {
        Ok((events, bytes)) => Ok(Restored { staging, manifest_name, manifest, events, bytes }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

async fn fill(
    dest: &Destination,
    data: &Path,
    staging: &Path,
    manifest: &Manifest,
    keys: &Keys,
) -> Result<(u64, u64), ArchiveError> {
    std::fs::create_dir_all(staging).map_err(|e| ArchiveError::io(staging.display(), e))?;
    copy_keys(data, staging)?;
    let mut total = 0u64;
    for file in &manifest.files {
        let path = staging.join(&file.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| ArchiveError::io(parent.display(), e))?;
        }
        // Private, as the server writes them (the directory holds health data).
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| ArchiveError::io(path.display(), e))?;
        for piece in &file.pieces {
            let key = blob_key(&piece.sha256);
            let object = dest.path(&key);
            let bytes = dest.get(&key).await?.ok_or_else(|| {
                ArchiveError::corrupted(&object, format!("missing (a piece of {})", file.path))
            })?;
            if (bytes.len() as u64) < piece.len {
                return Err(ArchiveError::corrupted(
                    &object,
                    format!(
                        "truncated: {} of {} bytes (a piece of {})",
                        bytes.len(),
                        piece.len,
                        file.path
                    ),
                ));
            }
            let actual = manifest::sha256_hex(&bytes);
            if bytes.len() as u64 != piece.len || actual != piece.sha256 {
                return Err(ArchiveError::corrupted(
                    &object,
                    format!(
                        "altered: {} bytes with SHA-256 {actual}, expected {} bytes matching its name (a piece of {})",
                        bytes.len(),
                        piece.len,
                        file.path
                    ),
                ));
            }
            out.write_all(&bytes).map_err(|e| ArchiveError::io(path.display(), e))?;
            total += piece.len;
        }
        out.sync_all().map_err(|e| ArchiveError::io(path.display(), e))?;
    }
    for dir in ["segments", "log", "checkpoints"] {
        let d = staging.join(dir);
        std::fs::create_dir_all(&d).map_err(|e| ArchiveError::io(d.display(), e))?;
    }

    // The restored checkpoint must be the manifest's, signed by this log's key.
    let io = StdIo::new(staging);
    let restored_cp = std::fs::read(staging.join(auditrail_store::store::CHECKPOINT_PATH))
        .map_err(|e| ArchiveError::Verification(format!("no checkpoint was restored: {e}")))?;
    if restored_cp != manifest.checkpoint.as_bytes() {
        return Err(ArchiveError::Verification(
            "the restored log/checkpoint is not the one the manifest names".into(),
        ));
    }
    let verifier = keys.signer.verifier();
    auditrail_core::note::open(&manifest.checkpoint, std::slice::from_ref(&verifier)).map_err(|e| {
        ArchiveError::Verification(format!(
            "the manifest's checkpoint is not signed by the key in keys/log.key ({e}); are these the right keys?"
        ))
    })?;
    // The same full audit as `auditrail verify`.
    let report = auditrail_store::audit::audit(&io, keys, &mut |_| {})
        .map_err(|e| ArchiveError::Verification(e.to_string()))?;
    if !report.ok() {
        let shown: Vec<String> = report.problems.iter().take(5).map(|p| p.to_string()).collect();
        return Err(ArchiveError::Verification(format!(
            "{} problems, first: {}",
            report.problems.len(),
            shown.join("; ")
        )));
    }
    if report.published != manifest.tree_size || report.events != manifest.tree_size {
        return Err(ArchiveError::Verification(format!(
            "the manifest covers {} events, the restored log has {} events and tree size {}",
            manifest.tree_size, report.events, report.published
        )));
    }
    Ok((report.events, total))
}

/// Moves a verified staging directory to `data`, which holds only keys: `data` is moved
/// aside, the staging directory takes its name, then the old one is removed. Each step is
/// a rename, so `data` is never a half-restored log.
pub fn move_into_place(
    staging: &Path,
    data: &Path,
    master: &MasterKeySource,
) -> Result<(), ArchiveError> {
    check_target(data, master)?;
    let aside = staging_dir(data, "keys-only")?;
    std::fs::rename(data, &aside).map_err(|e| ArchiveError::io(data.display(), e))?;
    if let Err(e) = std::fs::rename(staging, data) {
        let _ = std::fs::rename(&aside, data);
        return Err(ArchiveError::io(staging.display(), e));
    }
    std::fs::remove_dir_all(&aside).map_err(|e| ArchiveError::io(aside.display(), e))
}
