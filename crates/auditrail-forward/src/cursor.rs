//! A forwarder's cursor: the next seq to send, at `<data>/forward/<name>.cursor`.
//!
//! 20 bytes, big-endian: magic `ATFC`, version 1, three zero bytes, the seq (u64), CRC-32C of
//! bytes 0..16. Written to a temporary file, fsynced, renamed over the old one and the
//! directory fsynced, so a crash leaves either the old or the new cursor, never a torn one.

use crate::ForwardError;
use std::io::Write as _;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"ATFC";
const VERSION: u8 = 1;
pub const CURSOR_BYTES: usize = 20;

#[derive(Debug)]
pub struct Cursor {
    path: PathBuf,
    next_seq: u64,
}

pub fn encode(next_seq: u64) -> [u8; CURSOR_BYTES] {
    let mut b = [0u8; CURSOR_BYTES];
    b[..4].copy_from_slice(MAGIC);
    b[4] = VERSION;
    b[8..16].copy_from_slice(&next_seq.to_be_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..].copy_from_slice(&crc.to_be_bytes());
    b
}

pub fn decode(b: &[u8]) -> Result<u64, String> {
    if b.len() != CURSOR_BYTES {
        return Err(format!("{} bytes, expected {CURSOR_BYTES}", b.len()));
    }
    if &b[..4] != MAGIC || b[4] != VERSION || b[5..8] != [0, 0, 0] {
        return Err("bad magic or version".into());
    }
    let crc = u32::from_be_bytes(b[16..20].try_into().expect("4 bytes"));
    if crc != crc32c::crc32c(&b[..16]) {
        return Err("checksum mismatch".into());
    }
    Ok(u64::from_be_bytes(b[8..16].try_into().expect("8 bytes")))
}

impl Cursor {
    /// The cursor of forwarder `name` under `data`: 0 when it has never been written.
    pub fn open(data: &Path, name: &str) -> Result<Cursor, ForwardError> {
        let dir = data.join("forward");
        let path = dir.join(format!("{name}.cursor"));
        let err = |source| ForwardError::Cursor { path: path.display().to_string(), source };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let next_seq = match std::fs::read(&path) {
            Ok(bytes) => decode(&bytes).map_err(|message| ForwardError::CursorCorrupted {
                path: path.display().to_string(),
                message,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(err(e)),
        };
        Ok(Cursor { path, next_seq })
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Durably records that every event before `next_seq` has been delivered.
    pub fn store(&mut self, next_seq: u64) -> Result<(), ForwardError> {
        let err = |source| ForwardError::Cursor { path: self.path.display().to_string(), source };
        let tmp = self.path.with_extension("cursor.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&encode(next_seq)).map_err(err)?;
        f.sync_all().map_err(err)?;
        drop(f);
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
        }
        self.next_seq = next_seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detected() {
        for seq in [0, 1, 255, u64::MAX] {
            assert_eq!(decode(&encode(seq)), Ok(seq));
        }
        let good = encode(42);
        for i in 0..CURSOR_BYTES {
            let mut bad = good;
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip in byte {i} undetected");
        }
        assert!(decode(&good[..19]).is_err());
    }

    #[test]
    fn persists_across_opens() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cursor::open(dir.path(), "es").unwrap();
        assert_eq!(c.next_seq(), 0);
        c.store(17).unwrap();
        assert_eq!(Cursor::open(dir.path(), "es").unwrap().next_seq(), 17);
        std::fs::write(c.path(), b"junk").unwrap();
        let e = Cursor::open(dir.path(), "es").unwrap_err().to_string();
        assert!(e.contains("damaged"), "{e}");
    }
}
