//! What the index keeps of one stored event: its times, the values it can be grouped by, a hash
//! of its `id`, and the terms it can be found by. Patient identifiers become keyed HMAC tokens
//! here, before anything reaches memory that outlives the event or the disk.

use auditrail_core::time::parse_rfc3339;
use hmac::{KeyInit, Mac};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// A searchable field. The byte is the first byte of every term key, so it is part of the
/// on-disk format: never renumber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Field {
    /// The native dotted action (`patient.read`).
    Action = 1,
    Category = 2,
    /// `success` or `failure`.
    Outcome = 3,
    Project = 4,
    /// Lowercased words of the event's descriptive fields, for `q=`.
    Text = 5,
    /// The acting user (`actor.user_id`); shared with FHIR `agent`.
    User = 6,
    /// The actor's network address; shared with FHIR `address`.
    Address = 7,
    /// `source.system`; shared with FHIR `source`.
    Source = 8,
    /// A keyed HMAC token of the patient identifier; shared with FHIR `patient`.
    Patient = 9,
    /// Whose trail the event belongs to: `client` (sent by an application) or `repository`
    /// (auditrail's record of its own use), so searches can leave out the second by default.
    Stream = 10,
}

/// The [`Field::Stream`] value of events applications send.
pub const CLIENT_STREAM: &str = "client";

/// The first tag of the FHIR search parameters that have no native twin: `FHIR_BASE + n` for
/// the n-th parameter of `auditrail_core::fhir::SearchParam`.
pub const FHIR_BASE: u8 = 64;

/// Values an aggregate can group by; each is a column of dictionary ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Action = 0,
    User = 1,
    Outcome = 2,
    Category = 3,
}

pub const GROUP_FIELDS: usize = 4;

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "action" => GroupBy::Action,
            "user" => GroupBy::User,
            "outcome" => GroupBy::Outcome,
            "category" => GroupBy::Category,
            _ => return None,
        })
    }
}

/// Most words one event contributes to `q=`.
pub const TEXT_TERMS_MAX: usize = 24;

/// Derives patient tokens. The key derives from the index's own secret (`keys/index.key`,
/// sealed under the master key), so neither the index files nor the rest of the data directory
/// reveal a patient identifier, not even by guessing and hashing candidates.
#[derive(Clone)]
pub struct PatientTokens {
    mac: hmac::Hmac<Sha256>,
}

impl std::fmt::Debug for PatientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PatientTokens(..)")
    }
}

impl PatientTokens {
    pub fn new(key: &[u8; 32]) -> PatientTokens {
        PatientTokens { mac: hmac::Hmac::<Sha256>::new_from_slice(key).expect("any key length") }
    }

    /// The term key of a PHI value of a FHIR search parameter: blinded like a patient.
    pub fn blind(&self, tag: u8, value: &str) -> Vec<u8> {
        self.blinded(tag, value).to_vec()
    }

    /// The term key for a patient given as a bare id, `Patient/<id>` or a URL ending in it.
    pub fn term(&self, patient: &str) -> Vec<u8> {
        self.patient(patient).to_vec()
    }

    fn blinded(&self, tag: u8, value: &str) -> [u8; TOKEN_KEY_LEN] {
        let mut mac = self.mac.clone();
        mac.update(&[tag]);
        mac.update(value.as_bytes());
        token_key(tag, &mac.finalize().into_bytes())
    }

    fn patient(&self, patient: &str) -> [u8; TOKEN_KEY_LEN] {
        let bare = match patient.rfind("Patient/") {
            Some(i) => &patient[i + "Patient/".len()..],
            None => patient,
        };
        let mut mac = self.mac.clone();
        mac.update(bare.as_bytes());
        token_key(Field::Patient as u8, &mac.finalize().into_bytes())
    }
}

/// A blinded term key: the tag and 128 bits of the HMAC.
const TOKEN_KEY_LEN: usize = 17;

fn token_key(tag: u8, mac: &[u8]) -> [u8; TOKEN_KEY_LEN] {
    let mut key = [0u8; TOKEN_KEY_LEN];
    key[0] = tag;
    key[1..].copy_from_slice(&mac[..TOKEN_KEY_LEN - 1]);
    key
}

pub fn term(field: Field, value: &str) -> Vec<u8> {
    tagged(field as u8, value)
}

pub fn tagged(tag: u8, value: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + value.len());
    key.push(tag);
    key.extend_from_slice(value.as_bytes());
    key
}

/// A stable 32-bit hash of an event `id`, for `GET /events/{id}`. Collisions are harmless:
/// candidates are read back from the log and compared.
pub fn id_hash(id: &str) -> u32 {
    let d = Sha256::digest(id.as_bytes());
    u32::from_le_bytes(d[..4].try_into().expect("4 bytes"))
}

/// The term keys of one event, concatenated without a copy each. A key may repeat; the
/// memtable posts a row once per term however often it repeats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Terms {
    bytes: Vec<u8>,
    ends: Vec<u32>,
}

impl Terms {
    pub fn push(&mut self, tag: u8, value: &[u8]) {
        self.bytes.push(tag);
        self.bytes.extend_from_slice(value);
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn push_key(&mut self, key: &[u8]) {
        self.bytes.extend_from_slice(key);
        self.ends.push(self.bytes.len() as u32);
    }

    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let key = &self.bytes[start..end as usize];
            start = end as usize;
            key
        })
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.iter().any(|k| k == key)
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

/// One event as the index sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Doc {
    pub seq: u64,
    pub occurred_ms: i64,
    pub recorded_ms: i64,
    pub id_hash: u32,
    pub group: [String; GROUP_FIELDS],
    pub terms: Terms,
}

/// The `occurred_ms` of a placeholder row, which no real event has (times are 1970..9999).
pub const PLACEHOLDER_OCCURRED_MS: i64 = i64::MIN;

impl Doc {
    /// The row of an event retention purged before it was indexed: no terms, no time, no id.
    pub fn placeholder(seq: u64, recorded_ms: i64) -> Doc {
        Doc {
            seq,
            occurred_ms: PLACEHOLDER_OCCURRED_MS,
            recorded_ms,
            id_hash: 0,
            group: Default::default(),
            terms: Terms::default(),
        }
    }
}

/// Emits the FHIR search terms of an event as (tag, carries PHI, value); PHI values are
/// blinded here. Wired to `auditrail_core::fhir` by [`fhir_terms`].
pub type FhirTerms = fn(&Value, &mut dyn FnMut(u8, bool, &str));

/// The tag of a FHIR search parameter's terms.
pub fn fhir_tag(param: auditrail_core::fhir::SearchParam) -> u8 {
    let n = auditrail_core::fhir::SearchParam::all()
        .position(|p| p == param)
        .expect("every parameter is in all()");
    FHIR_BASE + n as u8
}

/// The FHIR search terms of a stored event, native or FHIR-origin.
pub fn fhir_terms(stored: &Value, emit: &mut dyn FnMut(u8, bool, &str)) {
    auditrail_core::fhir::index_terms(stored, &mut |param, value| {
        emit(fhir_tag(param), param.carries_phi(), value)
    });
}

/// Builds the index's view of a stored event (canonical JSON with `seq` and `recorded_at`).
pub fn extract(
    seq: u64,
    stored: &[u8],
    patients: &PatientTokens,
    fhir_terms: Option<FhirTerms>,
) -> Result<Doc, String> {
    let v: Value =
        serde_json::from_slice(stored).map_err(|e| format!("seq {seq}: not JSON: {e}"))?;
    let s = |path: &[&str]| -> Option<&str> {
        let mut cur = &v;
        for p in path {
            cur = cur.get(p)?;
        }
        cur.as_str()
    };
    let recorded_ms = s(&["recorded_at"]).and_then(parse_rfc3339).unwrap_or(0);
    let occurred_ms = s(&["occurred_at"]).and_then(parse_rfc3339).unwrap_or(recorded_ms);
    let mut terms = Terms::default();
    let mut add = |field: Field, value: Option<&str>| {
        if let Some(value) = value {
            terms.push(field as u8, value.as_bytes());
        }
    };
    add(Field::Action, s(&["action"]));
    add(Field::Category, s(&["category"]));
    let repository = s(&["category"]) == Some(auditrail_store::retention::REPOSITORY_CATEGORY);
    add(Field::Stream, Some(if repository { "repository" } else { CLIENT_STREAM }));
    add(Field::Outcome, s(&["outcome"]));
    add(Field::Project, s(&["project"]));
    add(Field::User, s(&["actor", "user_id"]));
    add(Field::Source, s(&["source", "system"]));
    if let Some(ip) = s(&["actor", "ip"]) {
        terms.push(Field::Address as u8, ip.to_ascii_lowercase().as_bytes());
    }
    if let Some(p) = s(&["patient", "id"]) {
        terms.push_key(&patients.patient(p));
    }
    text_terms(&v, &mut terms);
    if let Some(fhir_terms) = fhir_terms {
        fhir_terms(&v, &mut |tag, phi, value| {
            if phi {
                terms.push_key(&patients.blinded(tag, value));
            } else {
                terms.push(tag, value.as_bytes());
            }
        });
    }
    let group = [
        s(&["action"]).unwrap_or("").to_string(),
        s(&["actor", "user_id"]).unwrap_or("").to_string(),
        s(&["outcome"]).unwrap_or("").to_string(),
        s(&["category"]).unwrap_or("").to_string(),
    ];
    let id_hash = id_hash(s(&["id"]).unwrap_or(""));
    Ok(Doc { seq, occurred_ms, recorded_ms, id_hash, group, terms })
}

/// Splits into lowercase words of letters and digits, the way `q=` is split too.
pub fn words(text: &str, mut f: impl FnMut(&str)) {
    for w in text.split(|c: char| !c.is_alphanumeric()) {
        if w.len() >= 2 && w.len() <= 64 {
            if w.bytes().any(|b| b.is_ascii_uppercase()) || !w.is_ascii() {
                f(&w.to_lowercase());
            } else {
                f(w);
            }
        }
    }
}

/// Words of the descriptive fields. The patient and the request path (which often holds a
/// patient id) are deliberately not among them: they are findable only through the token.
fn text_terms(v: &Value, terms: &mut Terms) {
    let mut n = 0;
    let mut push = |text: &str| {
        words(text, |w| {
            if n < TEXT_TERMS_MAX {
                terms.push(Field::Text as u8, w.as_bytes());
                n += 1;
            }
        })
    };
    for key in ["action", "category", "outcome_desc", "project", "purpose_of_use"] {
        if let Some(t) = v.get(key).and_then(Value::as_str) {
            push(t);
        }
    }
    if let Some(actor) = v.get("actor") {
        for key in ["user_id", "name"] {
            if let Some(t) = actor.get(key).and_then(Value::as_str) {
                push(t);
            }
        }
    }
    if let Some(Value::Array(entities)) = v.get("entities") {
        for e in entities {
            for key in ["type", "id", "name"] {
                if let Some(t) = e.get(key).and_then(Value::as_str) {
                    push(t);
                }
            }
        }
    }
    if let Some(Value::Object(context)) = v.get("context") {
        for t in context.values().filter_map(Value::as_str) {
            push(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_tokens_hide_the_identifier_and_match_every_reference_form() {
        let p = PatientTokens::new(&[7; 32]);
        let t = p.term("MRN0001");
        assert_eq!(t.len(), 17);
        assert!(!t.windows(7).any(|w| w == b"MRN0001"));
        assert_eq!(p.term("Patient/MRN0001"), t);
        assert_eq!(p.term("https://ehr.example/fhir/Patient/MRN0001"), t);
        assert_ne!(PatientTokens::new(&[8; 32]).term("MRN0001"), t);
    }

    #[test]
    fn extract_reads_the_native_fields() {
        let stored = br#"{"action":"patient.read","actor":{"ip":"10.0.0.1","user_id":"dr.who"},"category":"phi_access","id":"e-1","occurred_at":"2026-11-22T10:00:00Z","outcome":"success","patient":{"id":"MRN9"},"recorded_at":"2026-11-22T10:00:01.500Z","entities":[{"type":"ImagingStudy","name":"Chest CT"}],"request":{"path":"/Patient/MRN9/chart"},"seq":4,"source":{"system":"ehr"}}"#;
        let p = PatientTokens::new(&[1; 32]);
        let d = extract(4, stored, &p, None).unwrap();
        assert_eq!(d.recorded_ms - d.occurred_ms, 1500);
        assert_eq!(d.group[0], "patient.read");
        assert_eq!(d.group[1], "dr.who");
        assert!(d.terms.contains(&term(Field::User, "dr.who")));
        assert!(d.terms.contains(&p.term("MRN9")));
        assert!(d.terms.contains(&term(Field::Text, "chest")));
        assert!(!d.terms.iter().any(|t| t.windows(4).any(|w| w == b"MRN9" || w == b"mrn9")));
        assert_eq!(d.id_hash, id_hash("e-1"));
    }
}
