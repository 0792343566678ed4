//! C2SP `signed-note` with Ed25519 signatures (type `0x01`), and the key encodings that Go's
//! `golang.org/x/mod/sumdb/note` uses: verifier keys (`name+hash+base64`) and signer keys
//! (`PRIVATE+KEY+name+hash+base64`).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signer as _, Verifier as _};
use sha2::{Digest, Sha256};

const ALG_ED25519: u8 = 0x01;
/// The signature line prefix: U+2014 EM DASH and a space.
const SIG_PREFIX: &str = "\u{2014} ";
/// Notes larger than this are refused before parsing (a checkpoint is a few hundred bytes).
pub const NOTE_BYTES_MAX: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    MalformedKey(&'static str),
    #[error("malformed note: {0}")]
    Malformed(&'static str),
    #[error("signature by {name} does not verify")]
    BadSignature { name: String },
    #[error("no signature by a known key")]
    Unverified,
}

/// First 4 bytes of `SHA-256(name ‖ '\n' ‖ type ‖ public key)`.
pub fn key_id(name: &str, public_key: &[u8; 32]) -> u32 {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public_key);
    let d = h.finalize();
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// A key name must be non-empty and contain no whitespace or `+`.
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.chars().any(|c| c.is_whitespace() || c == '+')
}

/// The log's signing key.
#[derive(Clone)]
pub struct NoteSigner {
    name: String,
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for NoteSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NoteSigner").field("name", &self.name).finish_non_exhaustive()
    }
}

impl NoteSigner {
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<NoteSigner, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::MalformedKey(
                "key name must be non-empty, without spaces or '+'",
            ));
        }
        Ok(NoteSigner { name: name.to_string(), key: ed25519_dalek::SigningKey::from_bytes(&seed) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> NoteVerifier {
        NoteVerifier { name: self.name.clone(), key: self.key.verifying_key() }
    }

    /// The Go `note` private key encoding: `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>`.
    pub fn to_private_key_string(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("PRIVATE+KEY+{}+{:08x}+{}", self.name, self.verifier().key_id(), B64.encode(raw))
    }

    pub fn from_private_key_string(s: &str) -> Result<NoteSigner, NoteError> {
        let rest = s
            .trim_end()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::MalformedKey("missing PRIVATE+KEY+ prefix"))?;
        // Names hold no '+', but base64 may: split from the left.
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::MalformedKey("expected name+hash+key"));
        };
        let raw = B64.decode(b64).map_err(|_| NoteError::MalformedKey("bad base64"))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::MalformedKey("not an Ed25519 key"));
        }
        let signer = NoteSigner::from_seed(name, raw[1..].try_into().unwrap())?;
        if format!("{:08x}", signer.verifier().key_id()) != hex {
            return Err(NoteError::MalformedKey("key hash does not match"));
        }
        Ok(signer)
    }

    /// Signs `text` (which must end with a newline) and returns the whole note.
    pub fn sign(&self, text: &str) -> String {
        assert!(text.ends_with('\n'), "note text must end with a newline");
        let sig = self.key.sign(text.as_bytes());
        let mut raw = self.verifier().key_id().to_be_bytes().to_vec();
        raw.extend_from_slice(&sig.to_bytes());
        format!("{text}\n{SIG_PREFIX}{} {}\n", self.name, B64.encode(raw))
    }
}

/// A verifier key: the public half, as published to auditors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    key: ed25519_dalek::VerifyingKey,
}

impl NoteVerifier {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> u32 {
        key_id(&self.name, self.key.as_bytes())
    }

    /// `<name>+<8 hex digits of key id>+<base64(0x01 ‖ public key)>`.
    pub fn to_vkey(&self) -> String {
        let mut raw = vec![ALG_ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.key_id(), B64.encode(raw))
    }

    pub fn from_vkey(vkey: &str) -> Result<NoteVerifier, NoteError> {
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(hex), Some(b64)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(NoteError::MalformedKey("expected name+hash+key"));
        };
        if !valid_name(name) {
            return Err(NoteError::MalformedKey("bad key name"));
        }
        let raw = B64.decode(b64).map_err(|_| NoteError::MalformedKey("bad base64"))?;
        if raw.len() != 33 || raw[0] != ALG_ED25519 {
            return Err(NoteError::MalformedKey("not an Ed25519 key"));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw[1..].try_into().unwrap())
            .map_err(|_| NoteError::MalformedKey("invalid Ed25519 public key"))?;
        let v = NoteVerifier { name: name.to_string(), key };
        if hex.len() != 8 || format!("{:08x}", v.key_id()) != hex {
            return Err(NoteError::MalformedKey("key hash does not match"));
        }
        Ok(v)
    }
}

/// Splits a note into its text and verifies it: signatures from unknown keys are ignored, a bad
/// signature from a known key is an error, and at least one known key must have signed.
/// Returns the text (ending with its newline).
pub fn open<'a>(note: &'a str, verifiers: &[NoteVerifier]) -> Result<&'a str, NoteError> {
    if note.len() > NOTE_BYTES_MAX {
        return Err(NoteError::Malformed("note too large"));
    }
    let split =
        note.rfind("\n\n").ok_or(NoteError::Malformed("no blank line before signatures"))?;
    let text = &note[..split + 1];
    let sigs = &note[split + 2..];
    if !sigs.ends_with('\n') || sigs.is_empty() {
        return Err(NoteError::Malformed("signature block must end with a newline"));
    }
    let mut verified = false;
    for line in sigs.lines() {
        let line = line
            .strip_prefix(SIG_PREFIX)
            .ok_or(NoteError::Malformed("signature line without dash"))?;
        let (name, b64) = line.split_once(' ').ok_or(NoteError::Malformed("bad signature line"))?;
        let raw = B64.decode(b64).map_err(|_| NoteError::Malformed("bad signature base64"))?;
        if raw.len() < 5 {
            return Err(NoteError::Malformed("signature too short"));
        }
        let id = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        for v in verifiers.iter().filter(|v| v.name == name && v.key_id() == id) {
            let sig = <[u8; 64]>::try_from(&raw[4..])
                .map(|b| ed25519_dalek::Signature::from_bytes(&b))
                .map_err(|_| NoteError::BadSignature { name: name.to_string() })?;
            v.key
                .verify(text.as_bytes(), &sig)
                .map_err(|_| NoteError::BadSignature { name: name.to_string() })?;
            verified = true;
        }
    }
    if verified { Ok(text) } else { Err(NoteError::Unverified) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c2sp_example_verifies() {
        let vkey = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k";
        let note = "This is an example message.\n\n\u{2014} example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n";
        let v = NoteVerifier::from_vkey(vkey).unwrap();
        assert_eq!(v.to_vkey(), vkey);
        let text = open(note, std::slice::from_ref(&v)).unwrap();
        assert_eq!(text, "This is an example message.\n");
        let tampered = note.replace("example message", "example massage");
        assert_eq!(
            open(&tampered, &[v]),
            Err(NoteError::BadSignature { name: "example.com/foo".into() })
        );
    }

    #[test]
    fn sign_then_open_and_key_strings_round_trip() {
        let s = NoteSigner::from_seed("auditrail.test/log", [7; 32]).unwrap();
        let note = s.sign("hello\n");
        assert_eq!(open(&note, &[s.verifier()]).unwrap(), "hello\n");
        for seed in 0..64u8 {
            // Some of these keys' base64 contains '+', which must not confuse the parsers.
            let s = NoteSigner::from_seed("auditrail.test/log", [seed; 32]).unwrap();
            let back = NoteSigner::from_private_key_string(&s.to_private_key_string()).unwrap();
            assert_eq!(back.verifier(), s.verifier());
            assert_eq!(NoteVerifier::from_vkey(&s.verifier().to_vkey()).unwrap(), s.verifier());
        }
        let other = NoteSigner::from_seed("auditrail.test/log", [8; 32]).unwrap();
        assert_eq!(open(&note, &[other.verifier()]), Err(NoteError::Unverified));
    }
}
