//! C2SP `tlog-checkpoint`: the note text that commits to a tree size and root.

use crate::merkle::Hash;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Optional extension lines after the root (non-empty, no newline).
    pub extensions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed checkpoint: {0}")]
pub struct CheckpointError(pub &'static str);

/// An origin is a non-empty line without spaces or `+` (it doubles as the key name).
pub fn valid_origin(origin: &str) -> bool {
    !origin.is_empty() && !origin.chars().any(|c| c.is_whitespace() || c == '+')
}

impl Checkpoint {
    /// The note text: origin, decimal size, base64 root, extensions, each ending with `\n`.
    pub fn to_text(&self) -> String {
        assert!(valid_origin(&self.origin));
        let mut s = format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root));
        for e in &self.extensions {
            assert!(!e.is_empty() && !e.contains('\n'));
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    /// Parses note text (as returned by [`crate::note::open`]) strictly.
    pub fn parse(text: &str) -> Result<Checkpoint, CheckpointError> {
        let body =
            text.strip_suffix('\n').ok_or(CheckpointError("text must end with a newline"))?;
        let mut lines = body.split('\n');
        let origin =
            lines.next().filter(|o| valid_origin(o)).ok_or(CheckpointError("bad origin"))?;
        let size_str = lines.next().ok_or(CheckpointError("missing size"))?;
        if size_str.is_empty()
            || !size_str.bytes().all(|b| b.is_ascii_digit())
            || (size_str.len() > 1 && size_str.starts_with('0'))
        {
            return Err(CheckpointError("size must be decimal without leading zeros"));
        }
        let size = size_str.parse().map_err(|_| CheckpointError("size out of range"))?;
        let root_str = lines.next().ok_or(CheckpointError("missing root hash"))?;
        let root_bytes = B64.decode(root_str).map_err(|_| CheckpointError("bad root base64"))?;
        let root: Hash =
            root_bytes.try_into().map_err(|_| CheckpointError("root is not 32 bytes"))?;
        if B64.encode(root) != root_str {
            return Err(CheckpointError("root base64 is not canonical"));
        }
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(String::is_empty) {
            return Err(CheckpointError("empty extension line"));
        }
        Ok(Checkpoint { origin: origin.to_string(), size, root, extensions })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_noncanonical() {
        let c = Checkpoint {
            origin: "example.com/log".into(),
            size: 70000,
            root: [9; 32],
            extensions: vec![],
        };
        assert_eq!(Checkpoint::parse(&c.to_text()), Ok(c.clone()));
        let text = c.to_text();
        assert!(Checkpoint::parse(&text.replace("70000", "070000")).is_err());
        assert!(Checkpoint::parse(&text.replace("example.com/log", "ex ample")).is_err());
        assert!(Checkpoint::parse(text.trim_end()).is_err());
    }
}
