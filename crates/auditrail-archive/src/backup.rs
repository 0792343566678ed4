//! One backup run: snapshot the data directory, upload the pieces the archive lacks, write a
//! manifest when anything changed, and remember what was archived.
//!
//! Progress is kept in `<data>/archive/state-<hash of the URL>.json` (replaced atomically), so
//! a restart uploads nothing twice. Without it (first run, lost file) the run is still
//! correct: the newest manifest in the bucket is taken as a claim only, every piece it names
//! is checked against the local bytes, and every blob is looked up before it is uploaded.
//! Nothing is ever deleted or overwritten with different bytes.

use crate::ArchiveError;
use crate::destination::Destination;
use crate::manifest::{self, FileEntry, Manifest, Piece, blob_key, manifest_name};
use crate::snapshot::{self, FileKind, Snapshot, SnapshotFile};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

/// What a run did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupReport {
    /// The manifest that now describes the archive (new or unchanged).
    pub manifest: String,
    pub tree_size: u64,
    pub created_manifest: bool,
    pub blobs_uploaded: u64,
    pub bytes_uploaded: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct State {
    url: String,
    manifest_name: String,
    manifest: Manifest,
}

fn state_path(data: &Path, url: &str) -> PathBuf {
    let id = &manifest::sha256_hex(url.as_bytes())[..16];
    data.join("archive").join(format!("state-{id}.json"))
}

fn load_state(data: &Path, url: &str) -> Option<State> {
    let bytes = std::fs::read(state_path(data, url)).ok()?;
    // A state that does not parse is only a lost optimisation: start from the bucket.
    serde_json::from_slice::<State>(&bytes).ok().filter(|s| s.url == url)
}

fn save_state(data: &Path, state: &State) -> Result<(), ArchiveError> {
    let path = state_path(data, &state.url);
    let dir = data.join("archive");
    std::fs::create_dir_all(&dir).map_err(|e| ArchiveError::io(dir.display(), e))?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(state).map_err(|e| ArchiveError::InvalidInput(e.to_string()))?;
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| ArchiveError::io(path.display(), e))
}

/// Forgets the progress of every destination (`archive/state-*.json`), so that the next run
/// checks the newest manifest's pieces against the local files instead of trusting them.
/// Needed after `auditrail key rewrap`: it rewrites segment headers in place, and a trusted
/// state would only upload what was appended, leaving the archive with the old headers (whose
/// master key version may then be retired). Returns how many it removed.
pub fn forget_progress(data: &Path) -> Result<usize, ArchiveError> {
    let dir = data.join("archive");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ArchiveError::io(dir.display(), e)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|e| ArchiveError::io(dir.display(), e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("state-") && name.ends_with(".json") {
            std::fs::remove_file(entry.path())
                .map_err(|e| ArchiveError::io(entry.path().display(), e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The newest manifest in the archive, by name, if any.
pub async fn newest_manifest(
    dest: &Destination,
) -> Result<Option<(String, Manifest)>, ArchiveError> {
    let names = dest.list(manifest::MANIFESTS_DIR).await?;
    let Some(name) = names.into_iter().rfind(|n| n.ends_with(".json")) else {
        return Ok(None);
    };
    let key = format!("{}/{name}", manifest::MANIFESTS_DIR);
    let bytes =
        dest.get(&key).await?.ok_or_else(|| ArchiveError::corrupted(&key, "listed but missing"))?;
    Ok(Some((name, Manifest::parse(&key, &bytes)?)))
}

/// A piece to upload unless the archive has it: where its bytes are.
#[derive(Debug, Clone)]
struct NewPiece {
    piece: Piece,
    path: String,
    offset: u64,
    /// In memory for replaced files, read from `path` otherwise.
    bytes: Option<Vec<u8>>,
}

fn read_range(data: &Path, path: &str, offset: u64, len: u64) -> Result<Vec<u8>, ArchiveError> {
    let full = data.join(path);
    let f = std::fs::File::open(&full).map_err(|e| ArchiveError::io(full.display(), e))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).map_err(|e| ArchiveError::io(full.display(), e))?;
    Ok(buf)
}

/// SHA-256 of `len` bytes of a file from `offset`, read in 1 MiB steps.
fn hash_range(data: &Path, path: &str, offset: u64, len: u64) -> Result<String, ArchiveError> {
    let full = data.join(path);
    let f = std::fs::File::open(&full).map_err(|e| ArchiveError::io(full.display(), e))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        f.read_exact_at(&mut buf[..n], offset + done)
            .map_err(|e| ArchiveError::io(full.display(), e))?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(manifest::hex(&hasher.finalize()))
}

/// The pieces of one snapshot file, reusing the previous manifest's where they still hold.
/// `trusted` says the previous entry was written by this archiver for this directory.
fn plan_file(
    data: &Path,
    file: &SnapshotFile,
    previous: Option<&FileEntry>,
    trusted: bool,
    new: &mut Vec<NewPiece>,
) -> Result<FileEntry, ArchiveError> {
    let whole = |new: &mut Vec<NewPiece>| -> Result<FileEntry, ArchiveError> {
        if file.len == 0 {
            return Ok(FileEntry { path: file.path.clone(), len: 0, pieces: Vec::new() });
        }
        let sha256 = match &file.contents {
            Some(b) => manifest::sha256_hex(b),
            None => hash_range(data, &file.path, 0, file.len)?,
        };
        let piece = Piece { sha256, len: file.len };
        new.push(NewPiece {
            piece: piece.clone(),
            path: file.path.clone(),
            offset: 0,
            bytes: file.contents.clone(),
        });
        Ok(FileEntry { path: file.path.clone(), len: file.len, pieces: vec![piece] })
    };
    let Some(prev) = previous else { return whole(new) };
    let extendable = match file.kind {
        FileKind::AppendOnly => prev.len <= file.len,
        FileKind::Immutable => prev.len == file.len,
        FileKind::Replaced => false,
    };
    if !extendable {
        return whole(new);
    }
    if !trusted {
        let mut offset = 0;
        for p in &prev.pieces {
            if hash_range(data, &file.path, offset, p.len)? != p.sha256 {
                return whole(new);
            }
            offset += p.len;
        }
    }
    let mut entry = prev.clone();
    if file.len > prev.len {
        let len = file.len - prev.len;
        let sha256 = hash_range(data, &file.path, prev.len, len)?;
        let piece = Piece { sha256, len };
        new.push(NewPiece {
            piece: piece.clone(),
            path: file.path.clone(),
            offset: prev.len,
            bytes: None,
        });
        entry.pieces.push(piece);
        entry.len = file.len;
    }
    // Pieces claimed by an untrusted manifest are checked in the bucket like new ones.
    if !trusted {
        for (i, p) in prev.pieces.iter().enumerate() {
            let offset = prev.pieces[..i].iter().map(|p| p.len).sum();
            new.push(NewPiece { piece: p.clone(), path: file.path.clone(), offset, bytes: None });
        }
    }
    Ok(entry)
}

/// Uploads to run at once.
const UPLOADS_IN_FLIGHT_MAX: usize = 8;

/// Runs one backup of `data` to `dest`.
pub async fn backup_once(dest: &Destination, data: &Path) -> Result<BackupReport, ArchiveError> {
    let (previous, trusted) = match load_state(data, &dest.url) {
        Some(s) => (Some((s.manifest_name, s.manifest)), true),
        None => (newest_manifest(dest).await?, false),
    };
    let known_lengths: BTreeMap<String, u64> = match (&previous, trusted) {
        (Some((_, m)), true) => m.files.iter().map(|f| (f.path.clone(), f.len)).collect(),
        _ => BTreeMap::new(),
    };
    let data_owned = data.to_path_buf();
    let prev_files: HashMap<String, FileEntry> = previous
        .as_ref()
        .map(|(_, m)| m.files.iter().map(|f| (f.path.clone(), f.clone())).collect())
        .unwrap_or_default();
    // Reading and hashing files is blocking work.
    let (snap, files, new) = tokio::task::spawn_blocking(move || {
        let snap: Snapshot = snapshot::take(&data_owned, &known_lengths)?;
        let mut new = Vec::new();
        let mut files = Vec::with_capacity(snap.files.len());
        for f in &snap.files {
            files.push(plan_file(&data_owned, f, prev_files.get(&f.path), trusted, &mut new)?);
        }
        Ok::<_, ArchiveError>((snap, files, new))
    })
    .await
    .map_err(|e| ArchiveError::InvalidInput(format!("backup task failed: {e}")))??;

    if let Some((name, prev)) = &previous
        && prev.files == files
        && prev.checkpoint == snap.checkpoint_note
        && trusted
    {
        return Ok(BackupReport {
            manifest: name.clone(),
            tree_size: prev.tree_size,
            created_manifest: false,
            blobs_uploaded: 0,
            bytes_uploaded: 0,
        });
    }

    let already: HashSet<String> = match (&previous, trusted) {
        (Some((_, m)), true) => {
            m.files.iter().flat_map(|f| f.pieces.iter().map(|p| p.sha256.clone())).collect()
        }
        _ => HashSet::new(),
    };
    let mut seen = HashSet::new();
    let todo: Vec<NewPiece> = new
        .into_iter()
        .filter(|n| !already.contains(&n.piece.sha256) && seen.insert(n.piece.sha256.clone()))
        .collect();
    let (mut blobs_uploaded, mut bytes_uploaded) = (0u64, 0u64);
    let mut tasks = tokio::task::JoinSet::new();
    let mut queue = todo.into_iter();
    loop {
        while tasks.len() < UPLOADS_IN_FLIGHT_MAX {
            let Some(n) = queue.next() else { break };
            let dest = dest.clone();
            let data = data.to_path_buf();
            tasks.spawn(async move { upload_piece(&dest, &data, n).await });
        }
        let Some(done) = tasks.join_next().await else { break };
        let uploaded =
            done.map_err(|e| ArchiveError::InvalidInput(format!("upload task failed: {e}")))??;
        if let Some(bytes) = uploaded {
            blobs_uploaded += 1;
            bytes_uploaded += bytes;
        }
    }

    let unchanged = previous
        .as_ref()
        .is_some_and(|(_, m)| m.files == files && m.checkpoint == snap.checkpoint_note);
    let (name, manifest) = if let (true, Some((name, m))) = (unchanged, previous) {
        (name, m)
    } else {
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let m = Manifest {
            format: manifest::FORMAT.into(),
            created_ms,
            origin: snap.checkpoint.origin.clone(),
            tree_size: snap.checkpoint.size,
            root: base64_root(&snap.checkpoint.root),
            checkpoint: snap.checkpoint_note.clone(),
            files,
        };
        let name = manifest_name(m.tree_size, created_ms);
        let bytes =
            serde_json::to_vec_pretty(&m).map_err(|e| ArchiveError::InvalidInput(e.to_string()))?;
        // Blobs first, manifest last: a manifest never names a blob that is not stored.
        dest.put(&format!("{}/{name}", manifest::MANIFESTS_DIR), bytes).await?;
        (name, m)
    };
    let report = BackupReport {
        manifest: name.clone(),
        tree_size: manifest.tree_size,
        created_manifest: !unchanged,
        blobs_uploaded,
        bytes_uploaded,
    };
    save_state(data, &State { url: dest.url.clone(), manifest_name: name, manifest })?;
    Ok(report)
}

fn base64_root(root: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(root)
}

/// Uploads one piece unless the archive has it; returns the bytes uploaded.
async fn upload_piece(
    dest: &Destination,
    data: &Path,
    n: NewPiece,
) -> Result<Option<u64>, ArchiveError> {
    let key = blob_key(&n.piece.sha256);
    match dest.size(&key).await? {
        Some(size) if size == n.piece.len => return Ok(None),
        Some(size) => {
            return Err(ArchiveError::corrupted(
                dest.path(&key),
                format!(
                    "holds {size} bytes, but its content is {} bytes long; it was altered",
                    n.piece.len
                ),
            ));
        }
        None => {}
    }
    let bytes = match n.bytes {
        Some(b) => b,
        None => {
            let (data, path, piece) = (data.to_path_buf(), n.path.clone(), n.piece.clone());
            tokio::task::spawn_blocking(move || read_range(&data, &path, n.offset, piece.len))
                .await
                .map_err(|e| ArchiveError::InvalidInput(format!("read task failed: {e}")))??
        }
    };
    // The bytes were hashed when planned; a difference now means the file changed under us.
    if manifest::sha256_hex(&bytes) != n.piece.sha256 {
        return Err(ArchiveError::Moving(format!("{} changed while it was archived", n.path)));
    }
    let len = bytes.len() as u64;
    dest.put(&key, bytes).await?;
    Ok(Some(len))
}
