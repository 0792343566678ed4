//! What the index keeps of one stored event: its times, the values it can be grouped by, a hash
//! of its `id`, and the terms it can be found by. Patient identifiers become keyed HMAC tokens
//! here, before anything reaches memory that outlives the event or the disk.

use auditrail_core::json::Json;
use auditrail_core::time::parse_rfc3339;
use hmac::{KeyInit, Mac};
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
        token_key(tag, &self.mac(value)).to_vec()
    }

    /// The term key for a patient given as a bare id, `Patient/<id>` or a URL ending in it.
    pub fn term(&self, patient: &str) -> Vec<u8> {
        token_key(Field::Patient as u8, &self.mac(bare_patient(patient))).to_vec()
    }

    /// The keyed MAC a blinded value's term keys share. It does not cover the tag (the key
    /// starts with it), so an event's value blinded under several parameters (a patient id
    /// is a `patient`, an `entity` and an identifier) costs one HMAC; see [`Blinder`].
    fn mac(&self, value: &str) -> Mac128 {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        mac.finalize().into_bytes()[..MAC_LEN].try_into().expect("16 bytes")
    }
}

/// The patient id of a bare id, `Patient/<id>` or a URL ending in it.
fn bare_patient(patient: &str) -> &str {
    match patient.rfind("Patient/") {
        Some(i) => &patient[i + "Patient/".len()..],
        None => patient,
    }
}

/// The part of a blinded value's HMAC a term key keeps.
const MAC_LEN: usize = 16;
type Mac128 = [u8; MAC_LEN];

/// Blinds the PHI values of one event, computing each distinct value's MAC once. It lives
/// only as long as the event's extraction, so no identifier outlives the event in memory.
struct Blinder<'p> {
    tokens: &'p PatientTokens,
    values: String,
    /// Where each blinded value ends in `values`, and its MAC.
    macs: Vec<(usize, Mac128)>,
}

impl<'p> Blinder<'p> {
    fn new(tokens: &'p PatientTokens) -> Blinder<'p> {
        Blinder { tokens, values: String::new(), macs: Vec::new() }
    }

    fn key(&mut self, tag: u8, value: &str) -> [u8; TOKEN_KEY_LEN] {
        let mut start = 0;
        for &(end, mac) in &self.macs {
            if &self.values[start..end] == value {
                return token_key(tag, &mac);
            }
            start = end;
        }
        let mac = self.tokens.mac(value);
        self.values.push_str(value);
        self.macs.push((self.values.len(), mac));
        token_key(tag, &mac)
    }
}

/// A blinded term key: the tag and 128 bits of the HMAC.
const TOKEN_KEY_LEN: usize = 1 + MAC_LEN;

fn token_key(tag: u8, mac: &Mac128) -> [u8; TOKEN_KEY_LEN] {
    let mut key = [0u8; TOKEN_KEY_LEN];
    key[0] = tag;
    key[1..].copy_from_slice(mac);
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
pub type FhirTerms = fn(&Json<'_>, &mut dyn FnMut(u8, bool, &str));

/// The tag of a FHIR search parameter's terms.
pub fn fhir_tag(param: auditrail_core::fhir::SearchParam) -> u8 {
    let n = auditrail_core::fhir::SearchParam::all()
        .position(|p| p == param)
        .expect("every parameter is in all()");
    FHIR_BASE + n as u8
}

/// The FHIR search terms of a stored event, native or FHIR-origin.
pub fn fhir_terms(stored: &Json<'_>, emit: &mut dyn FnMut(u8, bool, &str)) {
    auditrail_core::fhir::index_terms(stored, &mut |param, value| {
        emit(fhir_tag(param), param.carries_phi(), value)
    });
}

/// Room for the terms of a typical event, so building them does not reallocate.
const TERM_BYTES_TYPICAL: usize = 2048;
const TERMS_TYPICAL: usize = 96;

/// Builds the index's view of a stored event (canonical JSON with `seq` and `recorded_at`).
pub fn extract(
    seq: u64,
    stored: &[u8],
    patients: &PatientTokens,
    fhir_terms: Option<FhirTerms>,
) -> Result<Doc, String> {
    let v = Json::parse(stored).map_err(|e| format!("seq {seq}: not JSON: {e}"))?;
    let (action, category, outcome) = (v.at("action"), v.at("category"), v.at("outcome"));
    let (actor, user_id) = (v.at("actor"), v.at("actor").at("user_id"));
    let recorded_ms = v.at("recorded_at").as_str().and_then(parse_rfc3339).unwrap_or(0);
    let occurred_ms = v.at("occurred_at").as_str().and_then(parse_rfc3339).unwrap_or(recorded_ms);
    let mut terms = Terms {
        bytes: Vec::with_capacity(TERM_BYTES_TYPICAL),
        ends: Vec::with_capacity(TERMS_TYPICAL),
    };
    let mut add = |field: Field, value: &Json<'_>| {
        if let Some(value) = value.as_str() {
            terms.push(field as u8, value.as_bytes());
        }
    };
    add(Field::Action, action);
    add(Field::Category, category);
    add(Field::Outcome, outcome);
    add(Field::Project, v.at("project"));
    add(Field::User, user_id);
    add(Field::Source, v.at("source").at("system"));
    let repository = category.as_str() == Some(auditrail_store::retention::REPOSITORY_CATEGORY);
    terms.push(
        Field::Stream as u8,
        if repository { b"repository" } else { CLIENT_STREAM.as_bytes() },
    );
    if let Some(ip) = actor.at("ip").as_str() {
        terms.push(Field::Address as u8, ip.to_ascii_lowercase().as_bytes());
    }
    let mut blinder = Blinder::new(patients);
    if let Some(p) = v.at("patient").at("id").as_str() {
        terms.push_key(&blinder.key(Field::Patient as u8, bare_patient(p)));
    }
    text_terms(&v, &mut terms);
    if let Some(fhir_terms) = fhir_terms {
        fhir_terms(&v, &mut |tag, phi, value| {
            if phi {
                terms.push_key(&blinder.key(tag, value));
            } else {
                terms.push(tag, value.as_bytes());
            }
        });
    }
    let group = [action, user_id, outcome, category].map(|g| g.as_str().unwrap_or("").to_string());
    let id_hash = id_hash(v.at("id").as_str().unwrap_or(""));
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
fn text_terms(v: &Json<'_>, terms: &mut Terms) {
    let mut n = 0;
    let mut push = |text: &Json<'_>| {
        let Some(text) = text.as_str() else { return };
        words(text, |w| {
            if n < TEXT_TERMS_MAX {
                terms.push(Field::Text as u8, w.as_bytes());
                n += 1;
            }
        })
    };
    for key in ["action", "category", "outcome_desc", "project", "purpose_of_use"] {
        push(v.at(key));
    }
    let actor = v.at("actor");
    for key in ["user_id", "name"] {
        push(actor.at(key));
    }
    for e in v.at("entities").elements() {
        for key in ["type", "id", "name"] {
            push(e.at(key));
        }
    }
    for (_, t) in v.at("context").members() {
        push(t);
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

    /// The index blinds an event's PHI values with one MAC per distinct value; the keys must
    /// be exactly those the query side builds for each parameter, and distinct values
    /// (including one that is a prefix of another) must never share a MAC.
    #[test]
    fn blinded_terms_match_the_query_side_keys() {
        use auditrail_core::fhir::SearchParam;
        let stored = br#"{"action":"patient.read","category":"phi_access","entities":[{"id":"MRN9x","type":"Observation"}],"id":"e-2","outcome":"success","patient":{"id":"MRN9","system":"urn:mrn"},"recorded_at":"2026-11-22T10:00:01Z","seq":5,"source":{"system":"ehr"}}"#;
        let p = PatientTokens::new(&[3; 32]);
        let d = extract(5, stored, &p, Some(fhir_terms)).unwrap();
        let patient = fhir_tag(SearchParam::Patient);
        let identifier = fhir_tag(SearchParam::PatientIdentifier);
        let entity = fhir_tag(SearchParam::Entity);
        for key in [
            p.term("MRN9"),
            p.blind(patient, "MRN9"),
            p.blind(patient, "Patient/MRN9"),
            p.blind(identifier, "urn:mrn|MRN9"),
            p.blind(entity, "MRN9"),
            p.blind(entity, "Observation/MRN9x"),
            p.blind(entity, "MRN9x"),
        ] {
            assert!(d.terms.contains(&key), "{key:?} missing");
        }
        // Same value under two parameters: same MAC, told apart by the tag.
        assert_eq!(p.blind(patient, "MRN9")[1..], p.blind(entity, "MRN9")[1..]);
        assert_ne!(p.blind(entity, "MRN9"), p.blind(entity, "MRN9x"));
        assert!(!d.terms.contains(&p.blind(patient, "MRN9x")));
    }
}
