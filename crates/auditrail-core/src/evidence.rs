//! Evidence bundles: events together with everything needed to check them with nothing else,
//! as one tar archive (docs/api.md, "Evidence bundles", describes it for auditors).
//!
//! ```text
//! <dir>/README.md                        what is inside, how to check it by hand
//! <dir>/bundle.json                      format, origin, tree size, the search, the count
//! <dir>/log.vkey                         the log's verifier key (C2SP signed-note vkey)
//! <dir>/checkpoint                       ONE signed checkpoint; every proof leads to its root
//! <dir>/consistency/trusted-checkpoint   (optional) the signed checkpoint of an older size
//! <dir>/consistency/proof                (optional) RFC 6962 consistency proof, base64 lines
//! <dir>/events/<seq>/event.json          the event's stored bytes (RFC 8785), no newline
//! <dir>/events/<seq>/salt                its 32-byte salt, lowercase hex and a newline
//! <dir>/events/<seq>/leaf                its 41-byte leaf entry (what the tree hashes)
//! <dir>/events/<seq>/proof.tlog-proof    C2SP tlog-proof of leaf <seq> in the checkpoint
//! <dir>/SHA256SUMS                       `sha256sum -c` lines for every other file
//! ```
//!
//! Members appear in exactly this order (events by ascending seq), and the archive is exactly
//! what [`crate::ustar`] writes, so [`verify`] can insist that every byte is accounted for:
//! the events and proofs by cryptography, README and manifest by `SHA256SUMS`, the archive's
//! structure by re-encoding. `SHA256SUMS` is not a signature; what is proven is proven by the
//! checkpoint's signature and the proofs.

use crate::checkpoint::Checkpoint;
use crate::event::canonical_bytes;
use crate::leaf::{LEAF_ENTRY_BYTES, LeafEntry, Salt, commitment};
use crate::merkle::{Hash, leaf_hash, verify_consistency, verify_inclusion};
use crate::note::{self, NoteVerifier};
use crate::ustar;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// The value of `format` in `bundle.json`.
pub const FORMAT: &str = "auditrail-evidence/v1";
pub const README: &str = "README.md";
pub const MANIFEST: &str = "bundle.json";
pub const KEY: &str = "log.vkey";
pub const CHECKPOINT: &str = "checkpoint";
pub const TRUSTED_CHECKPOINT: &str = "consistency/trusted-checkpoint";
pub const CONSISTENCY_PROOF: &str = "consistency/proof";
pub const SUMS: &str = "SHA256SUMS";
/// The files of one event, in their order.
pub const EVENT_FILES: [&str; 4] = ["event.json", "salt", "leaf", "proof.tlog-proof"];
/// The first line of a C2SP tlog-proof.
pub const TLOG_PROOF_HEADER: &str = "c2sp.org/tlog-proof@v1";
/// The longest name of the one directory a bundle unpacks into.
pub const DIR_BYTES_MAX: usize = 40;

// The longest member name (an event's proof at the largest seq) fits a ustar name field.
const _: () = assert!(
    DIR_BYTES_MAX + "/events/".len() + 20 + "/proof.tlog-proof".len() <= ustar::NAME_BYTES_MAX
);

/// `bundle.json`: what the bundle holds and how it was selected. Informative, not signed
/// (SHA256SUMS guards it against damage, nothing against a forger): [`verify`] checks that it
/// agrees with the signed checkpoint and the files.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// The log's origin, as in its checkpoints.
    pub origin: String,
    /// The size of the tree of `checkpoint`.
    pub tree_size: u64,
    /// The older tree size the consistency proof starts from, if there is one.
    pub trusted_size: Option<u64>,
    /// How many events the bundle holds.
    pub events: u64,
    /// When the server wrote the bundle (RFC 3339).
    pub exported_at: String,
    /// The search parameters that selected the events.
    pub filters: BTreeMap<String, String>,
}

/// The consistency part: the checkpoint the recipient trusts and the proof from it.
#[derive(Debug, Clone)]
pub struct Consistency {
    pub trusted_checkpoint: String,
    pub proof: Vec<Hash>,
}

/// A bundle that cannot be written as asked: the data contradicts the log (an internal error
/// for the server) or the caller broke the writer's contract.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("evidence bundle: {0}")]
pub struct EvidenceError(pub String);

use crate::hex::encode as hex;

fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A directory name a bundle may unpack into: short, plain, not `.` or `..`.
pub fn valid_dir(dir: &str) -> bool {
    (1..=DIR_BYTES_MAX).contains(&dir.len())
        && dir.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && dir != "."
        && dir != ".."
}

fn event_file(seq: u64, file: &str) -> String {
    format!("events/{seq}/{file}")
}

/// Every file of a bundle holding `seqs`, in the order they appear in the archive.
pub fn layout(seqs: &BTreeSet<u64>, with_consistency: bool) -> Vec<String> {
    let mut files: Vec<String> =
        vec![README.into(), MANIFEST.into(), KEY.into(), CHECKPOINT.into()];
    if with_consistency {
        files.extend([TRUSTED_CHECKPOINT.into(), CONSISTENCY_PROOF.into()]);
    }
    for &seq in seqs {
        files.extend(EVENT_FILES.iter().map(|f| event_file(seq, f)));
    }
    files.push(SUMS.into());
    files
}

/// The leaf entry the log holds for a stored event: `0x01 ‖ recorded_at (u64 BE ms) ‖
/// SHA-256("auditrail/commitment/v1\0" ‖ salt ‖ stored bytes)`, with `recorded_at` read from
/// the event itself. Also returns the event's `seq`.
pub fn leaf_entry_of(stored: &[u8], salt: &Salt) -> Result<(u64, [u8; LEAF_ENTRY_BYTES]), String> {
    let event: serde_json::Value =
        serde_json::from_slice(stored).map_err(|e| format!("is not JSON: {e}"))?;
    let seq = event.get("seq").and_then(serde_json::Value::as_u64).ok_or("has no seq")?;
    let recorded_at = event
        .get("recorded_at")
        .and_then(serde_json::Value::as_str)
        .and_then(crate::time::parse_rfc3339)
        .ok_or("has no recorded_at date-time")?;
    let entry =
        LeafEntry { recorded_at_ms: recorded_at as u64, commitment: commitment(salt, stored) };
    Ok((seq, entry.encode()))
}

/// A C2SP tlog-proof: the header, the index, the hashes, an empty line, the checkpoint.
pub fn tlog_proof(index: u64, proof: &[Hash], checkpoint_note: &str) -> String {
    let mut s = format!("{TLOG_PROOF_HEADER}\nindex {index}\n");
    for h in proof {
        s.push_str(&B64.encode(h));
        s.push('\n');
    }
    s.push('\n');
    s.push_str(checkpoint_note);
    s
}

fn hash_lines(hashes: &[Hash]) -> String {
    hashes.iter().map(|h| B64.encode(h) + "\n").collect()
}

/// Opens a signed checkpoint with `key` and parses it.
fn open_checkpoint(note_text: &str, key: &NoteVerifier) -> Result<Checkpoint, String> {
    let text = note::open(note_text, std::slice::from_ref(key))
        .map_err(|e| format!("signature does not verify with {}: {e}", key.to_vkey()))?;
    Checkpoint::parse(text).map_err(|e| e.to_string())
}

/// Parses a signed checkpoint without checking its signature (to go on checking the proofs
/// against it once the signature has already been reported bad).
fn parse_unverified(note_text: &str) -> Option<Checkpoint> {
    let split = note_text.rfind("\n\n")?;
    Checkpoint::parse(&note_text[..split + 1]).ok()
}

/// Writes a bundle as a stream: [`BundleWriter::take`] hands over what is written so far, so
/// memory stays bounded however many events go in. Every event is checked against the
/// checkpoint before it is written: the writer never emits evidence that does not verify.
#[derive(Debug)]
pub struct BundleWriter {
    dir: String,
    mtime_s: u64,
    checkpoint_note: String,
    checkpoint: Checkpoint,
    out: Vec<u8>,
    sums: String,
    events_expected: u64,
    events_written: u64,
    last_seq: Option<u64>,
}

impl BundleWriter {
    /// Starts a bundle in directory `dir`, its files dated `mtime_s` (Unix seconds), and
    /// writes everything but the events and `SHA256SUMS`.
    pub fn new(
        dir: &str,
        mtime_s: u64,
        manifest: &Manifest,
        key: &NoteVerifier,
        checkpoint_note: &str,
        consistency: Option<&Consistency>,
    ) -> Result<BundleWriter, EvidenceError> {
        let bad = |m: String| EvidenceError(m);
        if !valid_dir(dir) {
            return Err(bad(format!("{dir:?} is not a valid directory name")));
        }
        let checkpoint = open_checkpoint(checkpoint_note, key).map_err(bad)?;
        if manifest.format != FORMAT
            || manifest.origin != checkpoint.origin
            || manifest.tree_size != checkpoint.size
            || manifest.trusted_size.is_some() != consistency.is_some()
        {
            return Err(bad("the manifest does not describe this checkpoint".into()));
        }
        let mut w = BundleWriter {
            dir: dir.to_string(),
            mtime_s,
            checkpoint_note: checkpoint_note.to_string(),
            checkpoint,
            out: Vec::new(),
            sums: String::new(),
            events_expected: manifest.events,
            events_written: 0,
            last_seq: None,
        };
        let mut manifest_json = serde_json::to_string_pretty(manifest).expect("serialises");
        manifest_json.push('\n');
        w.add(README, readme(manifest, dir, &key.to_vkey()).as_bytes());
        w.add(MANIFEST, manifest_json.as_bytes());
        w.add(KEY, format!("{}\n", key.to_vkey()).as_bytes());
        w.add(CHECKPOINT, checkpoint_note.as_bytes());
        if let Some(c) = consistency {
            let old = open_checkpoint(&c.trusted_checkpoint, key).map_err(bad)?;
            let new = &w.checkpoint;
            if Some(old.size) != manifest.trusted_size || old.origin != new.origin {
                return Err(bad("the trusted checkpoint is not of the trusted size".into()));
            }
            verify_consistency(old.size, new.size, &old.root, &new.root, &c.proof)
                .map_err(|e| bad(format!("consistency proof: {e}")))?;
            w.add(TRUSTED_CHECKPOINT, c.trusted_checkpoint.as_bytes());
            w.add(CONSISTENCY_PROOF, hash_lines(&c.proof).as_bytes());
        }
        Ok(w)
    }

    fn add(&mut self, file: &str, data: &[u8]) {
        ustar::append(&mut self.out, &format!("{}/{file}", self.dir), self.mtime_s, data);
        self.sums.push_str(&format!("{}  {file}\n", sha256_hex(data)));
    }

    /// Adds one event: its stored bytes, its salt and its inclusion proof in the checkpoint.
    /// Events must come in ascending seq order.
    pub fn add_event(
        &mut self,
        stored: &[u8],
        salt: &Salt,
        proof: &[Hash],
    ) -> Result<(), EvidenceError> {
        let (seq, entry) =
            leaf_entry_of(stored, salt).map_err(|e| EvidenceError(format!("stored event {e}")))?;
        if self.last_seq.is_some_and(|last| seq <= last) {
            return Err(EvidenceError(format!("seq {seq} comes after a later or equal seq")));
        }
        let cp = &self.checkpoint;
        verify_inclusion(&leaf_hash(&entry), seq, cp.size, proof, &cp.root).map_err(|e| {
            EvidenceError(format!("event seq {seq} does not verify against the checkpoint: {e}"))
        })?;
        if self.events_written == self.events_expected {
            return Err(EvidenceError("more events than the manifest announces".into()));
        }
        let proof_text = tlog_proof(seq, proof, &self.checkpoint_note);
        self.add(&event_file(seq, EVENT_FILES[0]), stored);
        self.add(&event_file(seq, EVENT_FILES[1]), format!("{}\n", hex(salt)).as_bytes());
        self.add(&event_file(seq, EVENT_FILES[2]), &entry);
        self.add(&event_file(seq, EVENT_FILES[3]), proof_text.as_bytes());
        self.last_seq = Some(seq);
        self.events_written += 1;
        Ok(())
    }

    /// The bytes written since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// Bytes written and not yet taken.
    pub fn pending_bytes(&self) -> usize {
        self.out.len()
    }

    /// Writes `SHA256SUMS` and the end of the archive; returns the bytes not yet taken.
    pub fn finish(mut self) -> Result<Vec<u8>, EvidenceError> {
        if self.events_written != self.events_expected {
            return Err(EvidenceError(format!(
                "the manifest announces {} events, {} were added",
                self.events_expected, self.events_written
            )));
        }
        let sums = std::mem::take(&mut self.sums);
        ustar::append(
            &mut self.out,
            &format!("{}/{SUMS}", self.dir),
            self.mtime_s,
            sums.as_bytes(),
        );
        ustar::finish(&mut self.out);
        Ok(self.out)
    }
}

/// The README of a bundle: what is inside and how to check it, by hand and with tools.
pub fn readme(m: &Manifest, dir: &str, vkey: &str) -> String {
    let filters = if m.filters.is_empty() {
        "every event the exporter could see".to_string()
    } else {
        m.filters.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    };
    let consistency = match m.trusted_size {
        Some(t) => format!(
            "\n| `consistency/trusted-checkpoint` | the log's signed checkpoint of size {t}, the \
             size you said you trust |\n| `consistency/proof` | RFC 6962 consistency proof from \
             size {t} to size {}: base64 hashes, one per line |",
            m.tree_size
        ),
        None => String::new(),
    };
    let consistency_step = match m.trusted_size {
        Some(_) => "\n5. That the log only grew since the checkpoint you trust (the one you kept, \
             not the copy in this bundle):\n\n       tlogverify consistency -vkey \"$VKEY\" \
             -old YOUR-TRUSTED-CHECKPOINT -checkpoint checkpoint -proof consistency/proof\n"
            .to_string(),
        None => String::new(),
    };
    format!(
        "# auditrail evidence bundle

{events} from the log `{origin}`, with what it takes to check, without the \
server, that each of them is in the log exactly as written here and that the log signed a \
checkpoint covering them. Written {exported_at}; selected by: {filters}.

## Files (all in `{dir}/`)

| file | what it is |
|---|---|
| `README.md` | this text |
| `bundle.json` | format `{FORMAT}`, origin, tree size, count and search |
| `log.vkey` | the log's public key, as a C2SP signed-note verifier key |
| `checkpoint` | the log's signed checkpoint (C2SP tlog-checkpoint) of tree size {size}; every proof leads to its root |{consistency}
| `events/<seq>/event.json` | the event exactly as stored: RFC 8785 canonical JSON, no trailing newline |
| `events/<seq>/salt` | the event's 32-byte salt, hex |
| `events/<seq>/leaf` | the event's 41-byte leaf entry in the log's Merkle tree (binary) |
| `events/<seq>/proof.tlog-proof` | C2SP tlog-proof: inclusion of leaf `<seq>` in `checkpoint` |
| `SHA256SUMS` | SHA-256 of every other file |

## What ties an event to the log

    leaf      = 0x01 || recorded_at (milliseconds since 1970, 8 bytes big-endian)
                     || SHA-256(\"auditrail/commitment/v1\" || 0x00 || salt || event.json)
    leaf hash = SHA-256(0x00 || leaf)           (RFC 6962; the leaf's index is the event's seq)

The tree holds only these commitments, never events. The salt stops anyone holding the public \
tree from confirming a guess about an event; it tells nothing about other events.

## Check it with auditrail

    auditrail verify-bundle {dir}.tar --key \"$VKEY\"

where `$VKEY` is the log's public key as you obtained it from its operator, not from this \
bundle: `log.vkey` here is\n\n    {vkey}\n\nand checking the bundle against its own key only \
shows that it is consistent with itself. Add `--trusted-checkpoint FILE` to check it against \
a checkpoint you kept earlier.

## Check it by hand

`tlogverify` is any C2SP tlog verifier (the Go one in auditrail's repository uses \
golang.org/x/mod/sumdb); `xxd` and `sha256sum` are the usual tools.

1. `sha256sum -c SHA256SUMS`: the copy is undamaged (this is not a signature).
2. The checkpoint is signed by the log: `tlogverify checkpoint -vkey \"$VKEY\" checkpoint`.
3. For each `events/SEQ`: the leaf commits to the event. The commitment

       {{ printf 'auditrail/commitment/v1\\0'; xxd -r -p events/SEQ/salt; cat events/SEQ/event.json; }} | sha256sum

   equals the leaf's last 32 bytes (`xxd -p -s 9 -c 32 events/SEQ/leaf`); its first byte is \
`01`; bytes 1 to 8 (`xxd -p -s 1 -l 8 events/SEQ/leaf`) are the event's `recorded_at` in \
milliseconds; and the event's `seq` is SEQ.
4. The leaf is in the signed tree:

       tlogverify proof -vkey \"$VKEY\" -leaf events/SEQ/leaf events/SEQ/proof.tlog-proof

   Its `index` line is SEQ and the checkpoint it carries is `checkpoint`, byte for byte.
{consistency_step}",
        events = plural(m.events, "audit event"),
        origin = m.origin,
        exported_at = m.exported_at,
        size = m.tree_size,
    )
}

fn plural(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

/// What [`verify`] checks a bundle against.
#[derive(Debug, Clone, Copy, Default)]
pub struct VerifyOptions<'a> {
    /// The log's key as the user knows it; without it the bundle's own `log.vkey` is used,
    /// which proves only that the bundle is consistent with itself.
    pub key: Option<&'a NoteVerifier>,
    /// A signed checkpoint the user already trusts: the bundle must prove that its tree
    /// extends that one.
    pub trusted_checkpoint: Option<&'a str>,
}

/// One thing that failed, and where: a file of the bundle (relative to its directory),
/// `archive`, or a command-line input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// The outcome of [`verify`]: it passed when `problems` is empty.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub origin: Option<String>,
    pub tree_size: Option<u64>,
    pub root: Option<Hash>,
    /// The events whose leaf and inclusion proof verified.
    pub events_verified: u64,
    /// The older tree size a verified consistency proof starts from.
    pub consistent_from: Option<u64>,
    /// The checkpoint was checked only against the key inside the bundle.
    pub bundled_key_only: bool,
    /// The user's trusted checkpoint was checked and holds.
    pub trusted_checkpoint_holds: bool,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    fn problem(&mut self, at: &str, message: impl Into<String>) {
        self.problems.push(Problem { at: at.to_string(), message: message.into() });
    }
}

/// A decimal number as auditrail writes it (no sign, no leading zeros).
fn canonical_u64(s: &str) -> Option<u64> {
    let n: u64 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

/// Checks a bundle with nothing but its bytes (and what the user trusts): the archive's
/// structure and file list, `SHA256SUMS`, the checkpoint's signature, each event's leaf
/// recomputed from its bytes and salt, each inclusion proof, the consistency proof and the
/// user's trusted checkpoint. Reports every problem found, each naming where it is.
pub fn verify(bytes: &[u8], options: &VerifyOptions<'_>) -> Report {
    let mut r = Report::default();
    let members = match ustar::parse(bytes) {
        Ok((members, _)) => members,
        Err(e) => {
            r.problem("archive", format!("not a bundle as auditrail writes it: {e}"));
            return r;
        }
    };
    let Some(dir) = members.first().and_then(|m| m.name.split_once('/')).map(|(d, _)| d) else {
        r.problem("archive", "holds no directory of files");
        return r;
    };
    if !valid_dir(dir) {
        r.problem("archive", format!("directory {dir:?} is not a name auditrail writes"));
    }
    let mut files: BTreeMap<&str, &[u8]> = BTreeMap::new();
    let mut order: Vec<&str> = Vec::new();
    for m in &members {
        let Some(file) = m.name.strip_prefix(dir).and_then(|n| n.strip_prefix('/')) else {
            r.problem(m.name, format!("is outside the bundle's directory {dir}/"));
            continue;
        };
        if files.insert(file, m.data).is_some() {
            r.problem(file, "appears twice");
        }
        order.push(file);
    }
    check_file_list(&mut r, &files, &order);
    if let Some(sums) = files.get(SUMS) {
        check_sums(&mut r, sums, &files, &order);
    }
    let Some(key) = check_key(&mut r, files.get(KEY).copied(), options.key) else {
        return r;
    };
    let Some(checkpoint) = check_checkpoint(&mut r, files.get(CHECKPOINT).copied(), &key) else {
        return r;
    };
    let checkpoint_note = files.get(CHECKPOINT).copied().unwrap_or_default();
    let manifest = check_manifest(&mut r, files.get(MANIFEST).copied(), &checkpoint);
    let seqs = event_seqs(&order);
    if manifest.as_ref().is_some_and(|m| m.events != seqs.len() as u64) {
        r.problem(MANIFEST, format!("announces a count of events other than the {}", seqs.len()));
    }
    for &seq in &seqs {
        if check_event(&mut r, seq, &files, &checkpoint, checkpoint_note) {
            r.events_verified += 1;
        }
    }
    let trusted_size = manifest.as_ref().and_then(|m| m.trusted_size);
    if trusted_size.is_some() && !files.contains_key(TRUSTED_CHECKPOINT) {
        r.problem(MANIFEST, "names a trusted size, and the consistency files are missing");
    }
    let bundled_old = check_consistency(&mut r, &files, &key, &checkpoint, trusted_size);
    if let Some(text) = options.trusted_checkpoint {
        check_trusted(&mut r, text, &key, &checkpoint, bundled_old.as_ref());
    }
    r.origin = Some(checkpoint.origin.clone());
    r.tree_size = Some(checkpoint.size);
    r.root = Some(checkpoint.root);
    r
}

fn event_seqs(order: &[&str]) -> BTreeSet<u64> {
    order
        .iter()
        .filter_map(|f| f.strip_prefix("events/")?.split_once('/'))
        .filter_map(|(seq, _)| canonical_u64(seq))
        .collect()
}

/// Exactly the files of the layout, in its order.
fn check_file_list(r: &mut Report, files: &BTreeMap<&str, &[u8]>, order: &[&str]) {
    let with_consistency =
        files.contains_key(TRUSTED_CHECKPOINT) || files.contains_key(CONSISTENCY_PROOF);
    let expected = layout(&event_seqs(order), with_consistency);
    let before = r.problems.len();
    for file in order {
        if !expected.iter().any(|e| e == file) {
            r.problem(file, "is not a file an evidence bundle holds");
        }
    }
    for file in &expected {
        if !files.contains_key(file.as_str()) {
            r.problem(file, "is missing");
        }
    }
    if r.problems.len() == before && !order.iter().eq(expected.iter()) {
        r.problem("archive", "its files are not in the order auditrail writes them");
    }
}

/// `SHA256SUMS` lists every other file, in order, with its digest.
fn check_sums(r: &mut Report, sums: &[u8], files: &BTreeMap<&str, &[u8]>, order: &[&str]) {
    let Ok(text) = std::str::from_utf8(sums) else {
        r.problem(SUMS, "is not UTF-8");
        return;
    };
    let expected: String = order
        .iter()
        .filter(|f| **f != SUMS)
        .map(|f| format!("{}  {f}\n", sha256_hex(files[f])))
        .collect();
    if text == expected {
        return;
    }
    let before = r.problems.len();
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let listed = line
            .strip_suffix('\n')
            .and_then(|l| l.split_once("  "))
            .filter(|(h, _)| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let Some((digest, file)) = listed else {
            r.problem(SUMS, format!("line {} is not `<sha-256 hex>  <file>`", n + 1));
            continue;
        };
        match files.get(file) {
            Some(data) if sha256_hex(data) != digest => {
                r.problem(file, "its SHA-256 does not match SHA256SUMS (one of them is damaged)")
            }
            Some(_) => {}
            None => r.problem(SUMS, format!("line {} names {file:?}, which is not here", n + 1)),
        }
    }
    if r.problems.len() == before {
        r.problem(SUMS, "does not list exactly the other files, in order, as auditrail writes it");
    }
}

/// The key to check the checkpoint with: the user's, else the bundled one.
fn check_key(
    r: &mut Report,
    bundled: Option<&[u8]>,
    given: Option<&NoteVerifier>,
) -> Option<NoteVerifier> {
    let bundled = bundled.map(|bytes| {
        std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| t.strip_suffix('\n'))
            .filter(|t| !t.contains('\n'))
            .ok_or_else(|| "is not one line of text".to_string())
            .and_then(|t| {
                let key = NoteVerifier::from_vkey(t).map_err(|e| e.to_string())?;
                // Only the form auditrail writes: the parser is lenient about whitespace.
                if key.to_vkey() != t {
                    return Err("is not a verifier key as auditrail writes it".into());
                }
                Ok(key)
            })
    });
    if let Some(Err(e)) = &bundled {
        r.problem(KEY, e.clone());
    }
    let bundled = bundled.and_then(Result::ok);
    match given {
        Some(key) => {
            if bundled.as_ref().is_some_and(|b| b != key) {
                r.problem(KEY, format!("is not the key you gave ({})", key.to_vkey()));
            }
            Some(key.clone())
        }
        None => {
            r.bundled_key_only = true;
            bundled
        }
    }
}

/// The checkpoint, signed by `key`. When the signature fails the problem is reported and the
/// checkpoint is still parsed, so that the proofs can be checked against it too.
fn check_checkpoint(
    r: &mut Report,
    note_bytes: Option<&[u8]>,
    key: &NoteVerifier,
) -> Option<Checkpoint> {
    let text = std::str::from_utf8(note_bytes?).ok().or_else(|| {
        r.problem(CHECKPOINT, "is not UTF-8");
        None
    })?;
    let checkpoint = match open_checkpoint(text, key) {
        Ok(c) => c,
        Err(e) => {
            r.problem(CHECKPOINT, e);
            parse_unverified(text)?
        }
    };
    if checkpoint.origin != key.name() {
        r.problem(
            CHECKPOINT,
            format!("its origin {} is not the key's name {}", checkpoint.origin, key.name()),
        );
    }
    Some(checkpoint)
}

fn check_manifest(
    r: &mut Report,
    bytes: Option<&[u8]>,
    checkpoint: &Checkpoint,
) -> Option<Manifest> {
    let m: Manifest = match serde_json::from_slice(bytes?) {
        Ok(m) => m,
        Err(e) => {
            r.problem(MANIFEST, format!("is not the expected JSON: {e}"));
            return None;
        }
    };
    if m.format != FORMAT {
        r.problem(MANIFEST, format!("format {:?} is not {FORMAT}", m.format));
    }
    if m.origin != checkpoint.origin || m.tree_size != checkpoint.size {
        r.problem(MANIFEST, "names another origin or tree size than the checkpoint");
    }
    Some(m)
}

/// One event: its bytes, salt and leaf agree, and its proof leads to the checkpoint's root.
fn check_event(
    r: &mut Report,
    seq: u64,
    files: &BTreeMap<&str, &[u8]>,
    checkpoint: &Checkpoint,
    checkpoint_note: &[u8],
) -> bool {
    let name = |i: usize| event_file(seq, EVENT_FILES[i]);
    let get = |i: usize| files.get(name(i).as_str()).copied();
    let (Some(stored), Some(salt_hex), Some(leaf), Some(proof)) = (get(0), get(1), get(2), get(3))
    else {
        return false; // reported as missing
    };
    let before = r.problems.len();
    match serde_json::from_slice::<serde_json::Value>(stored) {
        Ok(v) if canonical_bytes(&v) != stored => {
            r.problem(&name(0), "is not in RFC 8785 canonical form")
        }
        _ => {}
    }
    let salt: Option<Salt> = std::str::from_utf8(salt_hex)
        .ok()
        .and_then(|t| t.strip_suffix('\n'))
        .filter(|t| {
            t.len() == 64 && t.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
        .map(|t| std::array::from_fn(|i| u8::from_str_radix(&t[2 * i..2 * i + 2], 16).unwrap()));
    let Some(salt) = salt else {
        r.problem(&name(1), "is not 64 lowercase hex digits and a newline");
        return false;
    };
    let entry = match leaf_entry_of(stored, &salt) {
        Ok((event_seq, _)) if event_seq != seq => {
            r.problem(&name(0), format!("holds seq {event_seq}, not {seq}"));
            return false;
        }
        Ok((_, entry)) => entry,
        Err(e) => {
            r.problem(&name(0), e);
            return false;
        }
    };
    if leaf != entry {
        r.problem(&name(2), "is not the leaf entry recomputed from event.json and salt");
    }
    match parse_tlog_proof(proof) {
        Err(e) => r.problem(&name(3), e),
        Ok((index, _, note)) if index != seq || note != checkpoint_note => r.problem(
            &name(3),
            if index != seq {
                format!("proves index {index}, not {seq}")
            } else {
                "carries another checkpoint than the bundle's".into()
            },
        ),
        Ok((_, hashes, _)) => {
            if let Err(e) = verify_inclusion(
                &leaf_hash(&entry),
                seq,
                checkpoint.size,
                &hashes,
                &checkpoint.root,
            ) {
                r.problem(
                    &name(3),
                    format!("the event's leaf is not proven to be in the checkpoint's tree: {e}"),
                );
            }
        }
    }
    r.problems.len() == before
}

/// A C2SP tlog-proof as auditrail writes it (no `extra` line): index, hashes, checkpoint.
pub fn parse_tlog_proof(bytes: &[u8]) -> Result<(u64, Vec<Hash>, &[u8]), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "is not UTF-8".to_string())?;
    let rest = text
        .strip_prefix(TLOG_PROOF_HEADER)
        .and_then(|t| t.strip_prefix("\nindex "))
        .ok_or("does not start with the tlog-proof header and an index line")?;
    let (index, mut rest) = rest.split_once('\n').ok_or("ends after its index")?;
    let index = canonical_u64(index).ok_or("its index is not a decimal number")?;
    let mut hashes = Vec::new();
    loop {
        let (line, after) =
            rest.split_once('\n').ok_or("has no empty line before its checkpoint")?;
        rest = after;
        if line.is_empty() {
            break;
        }
        hashes.push(parse_hash(line).ok_or_else(|| format!("{line:?} is not a base64 hash"))?);
    }
    Ok((index, hashes, rest.as_bytes()))
}

/// A 32-byte hash in canonical standard base64.
fn parse_hash(line: &str) -> Option<Hash> {
    let h: Hash = B64.decode(line).ok()?.try_into().ok()?;
    (B64.encode(h) == line).then_some(h)
}

/// The consistency files: the older checkpoint, signed, of the manifest's trusted size, and a
/// proof from it to the bundle's checkpoint. Returns the older checkpoint when it is sound.
fn check_consistency(
    r: &mut Report,
    files: &BTreeMap<&str, &[u8]>,
    key: &NoteVerifier,
    checkpoint: &Checkpoint,
    trusted_size: Option<u64>,
) -> Option<Checkpoint> {
    let (old, proof) = (files.get(TRUSTED_CHECKPOINT)?, files.get(CONSISTENCY_PROOF)?);
    let before = r.problems.len();
    let old = match std::str::from_utf8(old).map_err(|_| "is not UTF-8".to_string()) {
        Ok(text) => open_checkpoint(text, key),
        Err(e) => Err(e),
    };
    let old = match old {
        Ok(old) => old,
        Err(e) => {
            r.problem(TRUSTED_CHECKPOINT, e);
            return None;
        }
    };
    if old.origin != checkpoint.origin {
        r.problem(TRUSTED_CHECKPOINT, format!("is of another log ({})", old.origin));
    }
    if Some(old.size) != trusted_size {
        r.problem(TRUSTED_CHECKPOINT, "is not of the trusted size bundle.json names");
    }
    let hashes: Option<Vec<Hash>> = std::str::from_utf8(proof).ok().and_then(|t| {
        t.split_inclusive('\n').map(|l| l.strip_suffix('\n').and_then(parse_hash)).collect()
    });
    match hashes {
        None => r.problem(CONSISTENCY_PROOF, "is not base64 hashes, one per line"),
        Some(hashes) => {
            if let Err(e) =
                verify_consistency(old.size, checkpoint.size, &old.root, &checkpoint.root, &hashes)
            {
                r.problem(
                    CONSISTENCY_PROOF,
                    format!(
                        "does not prove that tree {} extends tree {}: {e}",
                        checkpoint.size, old.size
                    ),
                );
            }
        }
    }
    if r.problems.len() > before {
        return None;
    }
    r.consistent_from = Some(old.size);
    Some(old)
}

/// The user's trusted checkpoint: the bundle's tree is it, or provably extends it.
fn check_trusted(
    r: &mut Report,
    text: &str,
    key: &NoteVerifier,
    checkpoint: &Checkpoint,
    bundled_old: Option<&Checkpoint>,
) {
    const AT: &str = "trusted checkpoint";
    let trusted = match open_checkpoint(text, key) {
        Ok(c) => c,
        Err(e) => return r.problem(AT, e),
    };
    if trusted.origin != checkpoint.origin {
        return r.problem(AT, format!("is of another log ({})", trusted.origin));
    }
    if trusted.size == checkpoint.size {
        if trusted.root != checkpoint.root {
            return r.problem(
                AT,
                format!(
                    "has another root than the bundle's checkpoint of the same size {}: the log \
                     showed two different trees",
                    trusted.size
                ),
            );
        }
    } else if trusted.size > checkpoint.size {
        return r.problem(
            AT,
            format!(
                "is newer (size {}) than the bundle's checkpoint (size {}): ask for a newer bundle",
                trusted.size, checkpoint.size
            ),
        );
    } else {
        match bundled_old {
            Some(old) if old.size == trusted.size && old.root == trusted.root => {}
            Some(old) if old.size == trusted.size => {
                return r.problem(
                    AT,
                    format!(
                        "has another root than the bundle's checkpoint of the same size {}: the \
                         log showed two different trees",
                        trusted.size
                    ),
                );
            }
            _ => {
                return r.problem(
                    AT,
                    format!(
                        "is of size {}, and the bundle proves no consistency from that size: ask \
                         for a bundle with trusted_size={}",
                        trusted.size, trusted.size
                    ),
                );
            }
        }
    }
    r.trusted_checkpoint_holds = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merkle::{MemoryTree, consistency_proof, inclusion_proof, tree_root};
    use crate::note::NoteSigner;

    const ORIGIN: &str = "test.auditrail.local/log";

    /// A log of `n` events in memory, as the store would write them.
    struct Log {
        signer: NoteSigner,
        events: Vec<(Vec<u8>, Salt)>,
        tree: MemoryTree,
    }

    impl Log {
        fn new(n: u64) -> Log {
            let signer = NoteSigner::from_seed(ORIGIN, [3; 32]).unwrap();
            let mut log = Log { signer, events: Vec::new(), tree: MemoryTree::default() };
            for seq in 0..n {
                let recorded = crate::time::format_millis(1_790_000_000_000 + seq as i64);
                let stored = format!(
                    r#"{{"action":"patient.read","id":"e{seq}","outcome":"success","patient":{{"id":"MRN{seq}"}},"recorded_at":"{recorded}","seq":{seq}}}"#
                )
                .into_bytes();
                let salt: Salt = [seq as u8 ^ 0x5a; 32];
                let (_, entry) = leaf_entry_of(&stored, &salt).unwrap();
                log.tree.leaf_hashes.push(leaf_hash(&entry));
                log.events.push((stored, salt));
            }
            log
        }

        fn checkpoint(&self, size: u64) -> String {
            let root = tree_root(&self.tree, size).unwrap();
            let cp = Checkpoint { origin: ORIGIN.into(), size, root, extensions: vec![] };
            self.signer.sign(&cp.to_text())
        }

        /// A bundle of `seqs` against the checkpoint of `size`, consistent from `trusted`.
        fn bundle(&self, seqs: &[u64], size: u64, trusted: Option<u64>) -> Vec<u8> {
            let manifest = Manifest {
                format: FORMAT.into(),
                origin: ORIGIN.into(),
                tree_size: size,
                trusted_size: trusted,
                events: seqs.len() as u64,
                exported_at: "2026-11-22T10:15:00.000Z".into(),
                filters: BTreeMap::from([("patient".into(), "MRN1".into())]),
            };
            let consistency = trusted.map(|t| Consistency {
                trusted_checkpoint: self.checkpoint(t),
                proof: consistency_proof(&self.tree, t, size).unwrap(),
            });
            let mut w = BundleWriter::new(
                "auditrail-evidence-test",
                1_790_000_000,
                &manifest,
                &self.signer.verifier(),
                &self.checkpoint(size),
                consistency.as_ref(),
            )
            .unwrap();
            let mut out = Vec::new();
            for &seq in seqs {
                let (stored, salt) = &self.events[seq as usize];
                let proof = inclusion_proof(&self.tree, seq, size).unwrap();
                w.add_event(stored, salt, &proof).unwrap();
                out.extend(w.take());
            }
            out.extend(w.finish().unwrap());
            out
        }
    }

    #[test]
    fn a_bundle_verifies_and_every_byte_of_it_matters() {
        let log = Log::new(7);
        let bundle = log.bundle(&[1, 4], 7, Some(3));
        let key = log.signer.verifier();
        let with_key = VerifyOptions { key: Some(&key), trusted_checkpoint: None };
        let report = verify(&bundle, &with_key);
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(
            (report.events_verified, report.tree_size, report.consistent_from),
            (2, Some(7), Some(3))
        );
        assert!(!report.bundled_key_only);
        assert!(verify(&bundle, &VerifyOptions::default()).bundled_key_only);
        for i in 0..bundle.len() {
            let mut damaged = bundle.clone();
            damaged[i] ^= 0x20;
            let report = verify(&damaged, &with_key);
            assert!(!report.ok(), "byte {i} changed unnoticed");
        }
    }

    #[test]
    fn names_what_failed() {
        let log = Log::new(5);
        let key = log.signer.verifier();
        let options = VerifyOptions { key: Some(&key), trusted_checkpoint: None };
        let bundle = log.bundle(&[2], 5, None);
        let (members, _) = ustar::parse(&bundle).unwrap();
        let data_at = |file: &str| {
            let m = members.iter().find(|m| m.name.ends_with(file)).unwrap();
            m.offset + ustar::BLOCK_BYTES
        };
        let problems = |at: usize| {
            let mut damaged = bundle.clone();
            damaged[at] ^= 0x01;
            verify(&damaged, &options).problems.iter().map(|p| p.at.clone()).collect::<Vec<_>>()
        };
        // The event's bytes: its leaf no longer matches, nor its proof.
        let event_at = data_at("events/2/event.json") + 12;
        assert!(
            problems(event_at).contains(&"events/2/leaf".to_string()),
            "{:?}",
            problems(event_at)
        );
        assert!(
            problems(data_at("events/2/proof.tlog-proof") + 30)
                .contains(&"events/2/proof.tlog-proof".into())
        );
        assert!(problems(data_at("checkpoint") + 2).contains(&"checkpoint".into()));
        assert!(problems(data_at("README.md") + 2).contains(&"README.md".into()));
        assert!(problems(0).contains(&"archive".into()));
        assert!(problems(bundle.len() - 1).contains(&"archive".into()));
        // The wrong key.
        let other = NoteSigner::from_seed(ORIGIN, [4; 32]).unwrap().verifier();
        let report =
            verify(&bundle, &VerifyOptions { key: Some(&other), trusted_checkpoint: None });
        let at: Vec<&str> = report.problems.iter().map(|p| p.at.as_str()).collect();
        assert!(at.contains(&"log.vkey") && at.contains(&"checkpoint"), "{at:?}");
    }

    #[test]
    fn trusted_checkpoints_hold_only_when_proven() {
        let log = Log::new(9);
        let key = log.signer.verifier();
        let check = |bundle: &[u8], trusted: &str| {
            verify(bundle, &VerifyOptions { key: Some(&key), trusted_checkpoint: Some(trusted) })
        };
        let with_proof = log.bundle(&[0, 8], 9, Some(4));
        let report = check(&with_proof, &log.checkpoint(4));
        assert!(report.ok() && report.trusted_checkpoint_holds, "{:?}", report.problems);
        // The same size as the bundle's checkpoint needs no proof.
        assert!(check(&log.bundle(&[0], 9, None), &log.checkpoint(9)).ok());
        // Another size than the proof's, a newer tree, a forked tree, another key: refused.
        for trusted in [log.checkpoint(5), Log::new(12).checkpoint(10)] {
            assert!(!check(&with_proof, &trusted).ok());
        }
        let mut forked = Log::new(9);
        forked.tree.leaf_hashes[1] = [0; 32];
        let problems = check(&with_proof, &forked.checkpoint(4)).problems;
        assert!(problems.iter().any(|p| p.message.contains("two different trees")), "{problems:?}");
        let stranger = NoteSigner::from_seed(ORIGIN, [9; 32]).unwrap();
        let cp = Checkpoint {
            origin: ORIGIN.into(),
            size: 4,
            root: tree_root(&log.tree, 4).unwrap(),
            extensions: vec![],
        };
        assert!(!check(&with_proof, &stranger.sign(&cp.to_text())).ok());
    }

    #[test]
    fn the_writer_refuses_evidence_that_does_not_verify() {
        let log = Log::new(4);
        let manifest = Manifest {
            format: FORMAT.into(),
            origin: ORIGIN.into(),
            tree_size: 4,
            trusted_size: None,
            events: 1,
            exported_at: String::new(),
            filters: BTreeMap::new(),
        };
        let mut w =
            BundleWriter::new("d", 0, &manifest, &log.signer.verifier(), &log.checkpoint(4), None)
                .unwrap();
        let (stored, salt) = &log.events[1];
        let proof = inclusion_proof(&log.tree, 1, 4).unwrap();
        assert!(w.add_event(stored, &[0; 32], &proof).is_err(), "a wrong salt");
        assert!(
            w.add_event(&log.events[2].0, &log.events[2].1, &proof).is_err(),
            "another leaf's proof"
        );
        w.add_event(stored, salt, &proof).unwrap();
        assert!(w.add_event(stored, salt, &proof).is_err(), "the same seq again");
    }
}
