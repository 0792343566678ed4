//! FHIR R4 AuditEvent: the mapping between received resources and native events (both ways),
//! the terms an event is indexed by for FHIR search, the parser for `GET /fhir/AuditEvent`,
//! OperationOutcome and the CapabilityStatement.
//!
//! Architecture invariant: like the rest of the core, this module does no I/O and reads no
//! clock. `docs/fhir.md` documents the mapping and the search semantics; keep both in step.
//!
//! IHE BALP asks a repository never to reject an AuditEvent for being non-conformant, so
//! [`to_canonical`] turns profile and terminology problems into warnings and stores the
//! resource anyway. It refuses only what is not FHIR JSON at all: not an AuditEvent, or a known
//! element with the wrong JSON type.

use crate::json::Json;
use crate::limits::{ENTITIES_MAX, FIELD_BYTES_MAX, ROLES_MAX};
use crate::time::{UnixMillis, format_millis, parse_rfc3339};
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::net::IpAddr;

// Code systems. The `urn:auditrail:` ones name native vocabularies in the FHIR view.
pub const CATEGORY_SYSTEM: &str = "urn:auditrail:category";
pub const ACTION_SYSTEM: &str = "urn:auditrail:action";
pub const ROLE_SYSTEM: &str = "urn:auditrail:role";
pub const ENTITY_TYPE_SYSTEM: &str = "urn:auditrail:entity-type";
pub const ENTITY_ROLE_SYSTEM: &str = "urn:auditrail:entity-role";
pub const SOURCE_TYPE_SYSTEM: &str = "urn:auditrail:source-type";
pub const PURPOSE_SYSTEM: &str = "urn:auditrail:purpose-of-use";
/// The implied systems of the two `code` elements that are searched as tokens.
pub const R4_ACTION_SYSTEM: &str = "http://hl7.org/fhir/audit-event-action";
pub const R4_OUTCOME_SYSTEM: &str = "http://hl7.org/fhir/audit-event-outcome";
const ENTITY_TYPE_R4: &str = "http://terminology.hl7.org/CodeSystem/audit-entity-type";
const OBJECT_ROLE_R4: &str = "http://terminology.hl7.org/CodeSystem/object-role";
const DICOM: &str = "http://dicom.nema.org/resources/ontology/DCM";
/// The type of an agent that is the system where a request came from (BALP's client).
const SOURCE_ROLE_ID: &str = "110153";
/// The IHE BALP ATNA Audit Record Repository this server's CapabilityStatement instantiates.
pub const BALP_ARR_CAPABILITY: &str =
    "https://profiles.ihe.net/ITI/BALP/CapabilityStatement/IHE.BALP.ATNA.AuditRecordRepository";

// ---------------------------------------------------------------------------------------------
// Issues and OperationOutcome

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn code(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

/// One OperationOutcome issue. `code` is a FHIR IssueType code (`invalid`, `structure`,
/// `required`, `value`, `not-supported`, `processing`, `not-found`, `too-costly`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub severity: Severity,
    pub code: &'static str,
    pub diagnostics: String,
    /// A FHIRPath into the resource (`AuditEvent.agent[0].who`) or a search parameter name.
    pub expression: Option<String>,
}

impl Issue {
    pub fn error(code: &'static str, diagnostics: impl Into<String>, at: &str) -> Issue {
        Issue::new(Severity::Error, code, diagnostics, at)
    }

    pub fn warning(code: &'static str, diagnostics: impl Into<String>, at: &str) -> Issue {
        Issue::new(Severity::Warning, code, diagnostics, at)
    }

    pub fn new_information(diagnostics: impl Into<String>) -> Issue {
        Issue::new(Severity::Information, "informational", diagnostics, "")
    }

    fn new(
        severity: Severity,
        code: &'static str,
        diagnostics: impl Into<String>,
        at: &str,
    ) -> Issue {
        let expression = (!at.is_empty()).then(|| at.to_string());
        Issue { severity, code, diagnostics: diagnostics.into(), expression }
    }

    pub fn is_error(&self) -> bool {
        self.severity <= Severity::Error
    }
}

/// An R4 OperationOutcome. R4 requires at least one issue, so an empty list becomes one
/// `information` issue saying all is well.
pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = if issues.is_empty() {
        vec![json!({"severity": "information", "code": "informational", "diagnostics": "ok"})]
    } else {
        issues.iter().map(issue_json).collect()
    };
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

fn issue_json(i: &Issue) -> Value {
    let mut m = Map::new();
    m.insert("severity".into(), i.severity.code().into());
    m.insert("code".into(), i.code.into());
    if !i.diagnostics.is_empty() {
        m.insert("diagnostics".into(), i.diagnostics.clone().into());
    }
    if let Some(e) = &i.expression {
        m.insert("expression".into(), json!([e]));
    }
    Value::Object(m)
}

// ---------------------------------------------------------------------------------------------
// Lenient accessors, shared by the mapping and the indexer. Wrong JSON types read as absent:
// the structure check in `to_canonical` has already refused them on the way in.

/// A string member with at least one non-whitespace character (FHIR allows no other; a native
/// string of spaces would make an invalid FHIR code).
fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.trim().is_empty())
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// The codings of a CodeableConcept.
fn codings(cc: &Value) -> &[Value] {
    list(cc, "coding")
}

fn has_code(coding: &Value, system: &str, code: &str) -> bool {
    text(coding, "code") == Some(code) && text(coding, "system").is_none_or(|s| s == system)
}

/// `(resource type, id)` of a literal reference `Type/id`, `Type/id/_history/v` or
/// `http://base/Type/id`; `None` for `#contained`, `urn:uuid:` and other forms.
fn split_reference(r: &str) -> Option<(&str, &str)> {
    let r = r.split_once("/_history/").map_or(r, |(head, _)| head);
    let mut parts = r.rsplitn(3, '/');
    let id = parts.next()?;
    let ty = parts.next()?;
    (is_resource_type(ty) && is_fhir_id(id)).then_some((ty, id))
}

fn is_resource_type(s: &str) -> bool {
    s.as_bytes().first().is_some_and(u8::is_ascii_uppercase)
        && s.bytes().all(|b| b.is_ascii_alphabetic())
}

/// FHIR `id`: 1 to 64 of `A-Z a-z 0-9 - .`.
pub fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Whether a Reference points at a Patient (by literal reference or by `type`).
fn refers_to_patient(reference: &Value) -> bool {
    text(reference, "type") == Some("Patient")
        || text(reference, "reference")
            .and_then(split_reference)
            .is_some_and(|(t, _)| t == "Patient")
}

/// BALP marks the patient entity with object-role 1 (and usually entity type 1, Person);
/// a reference to Patient says the same.
fn is_patient_entity(entity: &Value) -> bool {
    entity.get("what").is_some_and(refers_to_patient)
        || entity.get("role").is_some_and(|r| has_code(r, OBJECT_ROLE_R4, "1"))
}

/// What a masked patient identifier reads as.
pub const MASKED: &str = "***";

/// Masks every patient identifier in a stored event, for readers without the right to see
/// them: the native `patient` (id kept only as [`MASKED`], system kept), and in the received
/// FHIR resource each patient entity's and patient agent's reference, identifier, display and
/// name (its query is removed). Everything else (who acted, when, what, the outcome) stays readable.
pub fn mask_patient(stored: &mut Value) {
    if let Some(p) = stored.get_mut("patient").and_then(Value::as_object_mut) {
        p.insert("id".into(), MASKED.into());
    }
    let Some(resource) = stored.get_mut("fhir") else { return };
    let mask_reference = |r: &mut Value| {
        if let Some(m) = r.as_object_mut() {
            if m.contains_key("reference") {
                m.insert("reference".into(), format!("Patient/{MASKED}").into());
            }
            if let Some(id) = m.get_mut("identifier").and_then(Value::as_object_mut) {
                id.insert("value".into(), MASKED.into());
            }
            if m.contains_key("display") {
                m.insert("display".into(), MASKED.into());
            }
        }
    };
    if let Some(entities) = resource.get_mut("entity").and_then(Value::as_array_mut) {
        for e in entities.iter_mut().filter(|e| is_patient_entity(e)) {
            if let Some(what) = e.get_mut("what") {
                mask_reference(what);
            }
            let Some(m) = e.as_object_mut() else { continue };
            for field in ["name", "description"] {
                if m.contains_key(field) {
                    m.insert(field.into(), MASKED.into());
                }
            }
            // base64Binary: no masked text would be valid FHIR, so it goes.
            m.remove("query");
        }
    }
    if let Some(agents) = resource.get_mut("agent").and_then(Value::as_array_mut) {
        for a in agents {
            if a.get("who").is_some_and(refers_to_patient)
                && let Some(who) = a.get_mut("who")
            {
                mask_reference(who);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Structure check: the JSON types of the R4 elements, so that nothing read later is
// misinterpreted and the resource we serve back is FHIR JSON.

#[derive(Clone, Copy)]
enum Shape {
    Str,
    Bool,
    Obj(&'static [Field]),
}

struct Field {
    name: &'static str,
    many: bool,
    shape: Shape,
}

const fn one(name: &'static str, shape: Shape) -> Field {
    Field { name, many: false, shape }
}

const fn many(name: &'static str, shape: Shape) -> Field {
    Field { name, many: true, shape }
}

use Shape::{Bool, Obj, Str};

const CODING: &[Field] = &[
    one("system", Str),
    one("version", Str),
    one("code", Str),
    one("display", Str),
    one("userSelected", Bool),
];
const CODEABLE: &[Field] = &[many("coding", Obj(CODING)), one("text", Str)];
const IDENTIFIER: &[Field] =
    &[one("use", Str), one("type", Obj(CODEABLE)), one("system", Str), one("value", Str)];
const REFERENCE: &[Field] = &[
    one("reference", Str),
    one("type", Str),
    one("identifier", Obj(IDENTIFIER)),
    one("display", Str),
];
const NETWORK: &[Field] = &[one("address", Str), one("type", Str)];
const AGENT: &[Field] = &[
    one("type", Obj(CODEABLE)),
    many("role", Obj(CODEABLE)),
    one("who", Obj(REFERENCE)),
    one("altId", Str),
    one("name", Str),
    one("requestor", Bool),
    one("location", Obj(REFERENCE)),
    many("policy", Str),
    one("media", Obj(CODING)),
    one("network", Obj(NETWORK)),
    many("purposeOfUse", Obj(CODEABLE)),
];
const SOURCE: &[Field] =
    &[one("site", Str), one("observer", Obj(REFERENCE)), many("type", Obj(CODING))];
const DETAIL: &[Field] =
    &[one("type", Str), one("valueString", Str), one("valueBase64Binary", Str)];
const ENTITY: &[Field] = &[
    one("what", Obj(REFERENCE)),
    one("type", Obj(CODING)),
    one("role", Obj(CODING)),
    one("lifecycle", Obj(CODING)),
    many("securityLabel", Obj(CODING)),
    one("name", Str),
    one("description", Str),
    one("query", Str),
    many("detail", Obj(DETAIL)),
];
const PERIOD: &[Field] = &[one("start", Str), one("end", Str)];
const META: &[Field] = &[
    one("versionId", Str),
    one("lastUpdated", Str),
    one("source", Str),
    many("profile", Str),
    many("security", Obj(CODING)),
    many("tag", Obj(CODING)),
];
const AUDIT_EVENT: &[Field] = &[
    one("resourceType", Str),
    one("meta", Obj(META)),
    one("implicitRules", Str),
    one("language", Str),
    one("type", Obj(CODING)),
    many("subtype", Obj(CODING)),
    one("action", Str),
    one("period", Obj(PERIOD)),
    one("recorded", Str),
    one("outcome", Str),
    one("outcomeDesc", Str),
    many("purposeOfEvent", Obj(CODEABLE)),
    many("agent", Obj(AGENT)),
    one("source", Obj(SOURCE)),
    many("entity", Obj(ENTITY)),
];

/// Members every element may carry that the check does not look into: `id`, extensions,
/// `_x` (a primitive's extensions), and on the resource its narrative and contained resources.
fn is_generic_member(name: &str) -> bool {
    matches!(name, "id" | "extension" | "modifierExtension" | "text" | "contained")
        || name.starts_with('_')
}

fn check_shape(v: &Value, shape: Shape, path: &str, issues: &mut Vec<Issue>) {
    let ok = match (shape, v) {
        (Str, Value::String(_)) | (Bool, Value::Bool(_)) => true,
        (Obj(fields), Value::Object(m)) => {
            check_members(m, fields, path, issues);
            true
        }
        _ => false,
    };
    if !ok {
        let want = match shape {
            Str => "a string",
            Bool => "true or false",
            Obj(_) => "an object",
        };
        issues.push(Issue::error("structure", format!("{path} must be {want}"), path));
    }
}

fn check_members(m: &Map<String, Value>, fields: &[Field], path: &str, issues: &mut Vec<Issue>) {
    for (name, v) in m {
        let at = format!("{path}.{name}");
        let Some(field) = fields.iter().find(|f| f.name == name) else {
            if name == "modifierExtension" {
                issues.push(Issue::warning(
                    "not-supported",
                    format!("{at} is stored but not understood"),
                    &at,
                ));
            } else if !is_generic_member(name) {
                issues.push(Issue::warning(
                    "structure",
                    format!("{at} is not an element of the R4 AuditEvent; stored as received"),
                    &at,
                ));
            }
            continue;
        };
        match (field.many, v) {
            (true, Value::Array(items)) => {
                for (i, item) in items.iter().enumerate() {
                    check_shape(item, field.shape, &format!("{at}[{i}]"), issues);
                }
            }
            (true, _) => {
                issues.push(Issue::error("structure", format!("{at} must be an array"), &at))
            }
            (false, Value::Array(_)) => {
                issues.push(Issue::error("structure", format!("{at} must not be an array"), &at))
            }
            (false, _) => check_shape(v, field.shape, &at, issues),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// FHIR AuditEvent -> native event

/// The native fields mapped from a resource (including `fhir`), and the warnings found.
pub type Mapped = (Map<String, Value>, Vec<Issue>);

/// Maps a received AuditEvent onto the native fields, with the resource itself in `fhir`.
///
/// `Err` (errors only) when the body is not an AuditEvent object or a known element has the
/// wrong JSON type. Otherwise `Ok` with warnings for whatever is missing, unknown or was cut to
/// the native limits: the event is stored either way, as BALP requires. The map never has an
/// `id`: FHIR create ignores a client's id, and the server assigns one.
pub fn to_canonical(resource: &Value) -> Result<Mapped, Vec<Issue>> {
    let Some(root) = resource.as_object() else {
        return Err(vec![Issue::error(
            "structure",
            "the body must be a JSON object: a FHIR AuditEvent",
            "",
        )]);
    };
    if root.get("resourceType").and_then(Value::as_str) != Some("AuditEvent") {
        return Err(vec![Issue::error(
            "invalid",
            "resourceType must be \"AuditEvent\"",
            "resourceType",
        )]);
    }
    let mut issues = Vec::new();
    check_members(root, AUDIT_EVENT, "AuditEvent", &mut issues);
    if issues.iter().any(Issue::is_error) {
        return Err(issues);
    }
    let mut m = Mapper { out: Map::new(), issues };
    m.occurred_at(resource);
    m.outcome(resource);
    m.actor(resource);
    m.source(resource);
    let has_patient = m.patient_and_entities(resource);
    m.category_and_action(resource, has_patient);
    m.purpose_of_use(resource);
    let mut out = m.out;
    out.insert("fhir".into(), resource.clone());
    Ok((out, m.issues))
}

struct Mapper {
    out: Map<String, Value>,
    issues: Vec<Issue>,
}

impl Mapper {
    fn warn(&mut self, code: &'static str, diagnostics: impl Into<String>, at: &str) {
        self.issues.push(Issue::warning(code, diagnostics, at));
    }

    /// `s` cut to `max` bytes (on a character boundary), with a warning when cut.
    fn fit(&mut self, s: &str, max: usize, at: &str) -> String {
        if s.len() <= max {
            return s.to_string();
        }
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.warn("too-long", format!("{at} is longer than {max} bytes; indexed truncated"), at);
        s[..end].to_string()
    }

    fn occurred_at(&mut self, r: &Value) {
        let Some(recorded) = text(r, "recorded") else {
            self.warn(
                "required",
                "AuditEvent.recorded is required; the event is dated by its arrival",
                "AuditEvent.recorded",
            );
            return;
        };
        match parse_rfc3339(recorded) {
            Some(ms) => {
                self.out.insert("occurred_at".into(), format_millis(ms).into());
            }
            None => self.warn(
                "value",
                "AuditEvent.recorded is not an instant with a time zone in 1970..9999; the event is dated by its arrival",
                "AuditEvent.recorded",
            ),
        }
    }

    fn outcome(&mut self, r: &Value) {
        let at = "AuditEvent.outcome";
        let (outcome, code) = match text(r, "outcome") {
            Some("0") => ("success", Some(0)),
            Some("4") => ("failure", Some(4)),
            Some("8") => ("failure", Some(8)),
            Some("12") => ("failure", Some(12)),
            None => {
                // R4 makes outcome optional; an event that does not say it failed is read as
                // a success, and the warning keeps the doubt visible.
                self.warn("required", "AuditEvent.outcome is missing; indexed as success", at);
                ("success", None)
            }
            Some(other) => {
                // An unknown code is treated as a failure: hiding a failure is worse than
                // flagging a success.
                self.warn(
                    "code-invalid",
                    format!(
                        "AuditEvent.outcome {other:?} is not 0, 4, 8 or 12; indexed as failure"
                    ),
                    at,
                );
                ("failure", None)
            }
        };
        self.out.insert("outcome".into(), outcome.into());
        if let Some(c) = code {
            self.out.insert("outcome_code".into(), c.into());
        }
        if let Some(desc) = text(r, "outcomeDesc") {
            let desc = self.fit(desc, FIELD_BYTES_MAX, "AuditEvent.outcomeDesc");
            self.out.insert("outcome_desc".into(), desc.into());
        }
    }

    fn actor(&mut self, r: &Value) {
        let agents = list(r, "agent");
        if agents.is_empty() {
            self.warn(
                "required",
                "AuditEvent.agent is required (at least one)",
                "AuditEvent.agent",
            );
            return;
        }
        let (i, agent) = agents
            .iter()
            .enumerate()
            .find(|(_, a)| a.get("requestor") == Some(&Value::Bool(true)))
            .unwrap_or((0, &agents[0]));
        let at = format!("AuditEvent.agent[{i}]");
        let mut actor = Map::new();
        let who = agent.get("who").unwrap_or(&Value::Null);
        let user = who
            .get("identifier")
            .and_then(|id| text(id, "value"))
            .or_else(|| text(who, "reference"));
        if let Some(u) = user {
            actor.insert(
                "user_id".into(),
                self.fit(u, FIELD_BYTES_MAX, &format!("{at}.who")).into(),
            );
        }
        if let Some(n) = text(agent, "name").or_else(|| text(who, "display")) {
            actor.insert("name".into(), self.fit(n, FIELD_BYTES_MAX, &format!("{at}.name")).into());
        }
        let roles = self.agent_roles(agent, &at);
        if !roles.is_empty() {
            actor.insert("roles".into(), roles.into());
        }
        if let Some(ip) =
            ip_of(agent).or_else(|| agents.iter().filter(|a| is_source_role(a)).find_map(ip_of))
        {
            actor.insert("ip".into(), ip.to_string().into());
        }
        if !actor.is_empty() {
            self.out.insert("actor".into(), actor.into());
        }
    }

    /// The codes of `agent.type` and `agent.role`, unique, within the native limits.
    fn agent_roles(&mut self, agent: &Value, at: &str) -> Vec<Value> {
        let concepts = agent.get("type").into_iter().chain(list(agent, "role"));
        let mut roles: Vec<Value> = Vec::new();
        for code in concepts.flat_map(codings).filter_map(|c| text(c, "code")) {
            let code = Value::String(self.fit(code, 128, &format!("{at}.role")));
            if roles.len() == ROLES_MAX {
                self.warn(
                    "too-long",
                    format!(
                        "{at} has more than {ROLES_MAX} roles; the rest are not indexed natively"
                    ),
                    at,
                );
                break;
            }
            if !roles.contains(&code) {
                roles.push(code);
            }
        }
        roles
    }

    fn source(&mut self, r: &Value) {
        let Some(source) = r.get("source") else {
            self.warn("required", "AuditEvent.source is required", "AuditEvent.source");
            return;
        };
        let mut out = Map::new();
        let observer = source.get("observer").unwrap_or(&Value::Null);
        let system = text(observer, "reference")
            .or_else(|| observer.get("identifier").and_then(|i| text(i, "value")))
            .or_else(|| text(observer, "display"));
        match system {
            Some(s) => {
                out.insert("system".into(), self.fit(s, 256, "AuditEvent.source.observer").into());
            }
            None => self.warn(
                "required",
                "AuditEvent.source.observer is required",
                "AuditEvent.source.observer",
            ),
        }
        if let Some(site) = text(source, "site") {
            out.insert("site".into(), self.fit(site, 256, "AuditEvent.source.site").into());
        }
        if let Some(ty) = list(source, "type").iter().find_map(|c| text(c, "code")) {
            out.insert("type".into(), self.fit(ty, 128, "AuditEvent.source.type").into());
        }
        if !out.is_empty() {
            self.out.insert("source".into(), out.into());
        }
    }

    /// The first patient entity (or, failing that, a patient agent) becomes `patient`; every
    /// other entity an item of `entities`. Returns whether a patient was found.
    fn patient_and_entities(&mut self, r: &Value) -> bool {
        let mut patient = None;
        let mut entities = Vec::new();
        for (i, e) in list(r, "entity").iter().enumerate() {
            let at = format!("AuditEvent.entity[{i}]");
            if patient.is_none() && is_patient_entity(e) {
                patient = self.patient_of(e.get("what").unwrap_or(&Value::Null), &at);
                if patient.is_some() {
                    continue;
                }
            }
            if entities.len() == ENTITIES_MAX {
                self.warn(
                    "too-long",
                    format!("more than {ENTITIES_MAX} entities; the rest are not indexed natively"),
                    &at,
                );
                break;
            }
            entities.push(self.entity(e, &at));
        }
        if patient.is_none() {
            patient = list(r, "agent")
                .iter()
                .enumerate()
                .filter_map(|(i, a)| a.get("who").filter(|w| refers_to_patient(w)).map(|w| (i, w)))
                .find_map(|(i, w)| self.patient_of(w, &format!("AuditEvent.agent[{i}].who")));
        }
        let found = patient.is_some();
        if let Some(p) = patient {
            self.out.insert("patient".into(), p.into());
        }
        if !entities.is_empty() {
            self.out.insert("entities".into(), entities.into());
        }
        found
    }

    /// A business identifier (MRN) names the patient best; a reference's id otherwise.
    fn patient_of(&mut self, reference: &Value, at: &str) -> Option<Map<String, Value>> {
        let mut p = Map::new();
        let identifier = reference.get("identifier");
        if let Some(value) = identifier.and_then(|i| text(i, "value")) {
            p.insert("id".into(), self.fit(value, 256, at).into());
            if let Some(system) = identifier.and_then(|i| text(i, "system")) {
                p.insert("system".into(), self.fit(system, 256, at).into());
            }
        } else if let Some(r) = text(reference, "reference") {
            let id = split_reference(r).map_or(r, |(_, id)| id);
            p.insert("id".into(), self.fit(id, 256, at).into());
        } else {
            return None;
        }
        Some(p)
    }

    fn entity(&mut self, e: &Value, at: &str) -> Value {
        let what = e.get("what").unwrap_or(&Value::Null);
        let reference = text(what, "reference");
        let split = reference.and_then(split_reference);
        let ty = split
            .map(|(t, _)| t)
            .or_else(|| text(what, "type"))
            .or_else(|| e.get("type").and_then(|t| text(t, "code")))
            .unwrap_or("unknown");
        let mut m = Map::new();
        m.insert("type".into(), self.fit(ty, 128, &format!("{at}.type")).into());
        let identifier = what.get("identifier");
        let id = split
            .map(|(_, id)| id)
            .or(reference)
            .or_else(|| identifier.and_then(|i| text(i, "value")));
        if let Some(id) = id {
            m.insert("id".into(), self.fit(id, 512, &format!("{at}.what")).into());
        }
        if let Some(system) = identifier.and_then(|i| text(i, "system")) {
            m.insert("system".into(), self.fit(system, 256, &format!("{at}.what")).into());
        }
        if let Some(role) = e.get("role").and_then(|r| text(r, "code")) {
            m.insert("role".into(), self.fit(role, 64, &format!("{at}.role")).into());
        }
        if let Some(name) = text(e, "name") {
            m.insert("name".into(), self.fit(name, FIELD_BYTES_MAX, &format!("{at}.name")).into());
        }
        Value::Object(m)
    }

    /// `action` is `fhir.<what happened>`: the first subtype code (`fhir.read`,
    /// `fhir.search-type`), else the verb of the action code, else the type code.
    fn category_and_action(&mut self, r: &Value, has_patient: bool) {
        let ty = r.get("type");
        if ty.and_then(|t| text(t, "code")).is_none() {
            self.warn("required", "AuditEvent.type is required", "AuditEvent.type");
        }
        let subtype = list(r, "subtype").iter().find_map(|c| text(c, "code")).and_then(action_word);
        let verb = text(r, "action").and_then(|a| match a {
            "C" => Some("create"),
            "R" => Some("read"),
            "U" => Some("update"),
            "D" => Some("delete"),
            "E" => Some("execute"),
            other => {
                self.warn(
                    "code-invalid",
                    format!("AuditEvent.action {other:?} is not C, R, U, D or E"),
                    "AuditEvent.action",
                );
                None
            }
        });
        let word = subtype
            .or_else(|| verb.map(String::from))
            .or_else(|| ty.and_then(|t| text(t, "code")).and_then(action_word))
            .unwrap_or_else(|| "event".to_string());
        let category = category_of(ty.and_then(|t| text(t, "code")), &word, has_patient);
        self.out.insert("category".into(), category.into());
        self.out.insert("action".into(), format!("fhir.{word}").into());
    }

    fn purpose_of_use(&mut self, r: &Value) {
        let requestor =
            list(r, "agent").iter().find(|a| a.get("requestor") == Some(&Value::Bool(true)));
        let concepts = list(r, "purposeOfEvent")
            .iter()
            .chain(requestor.map_or(&[][..], |a| list(a, "purposeOfUse")));
        let mut codes: Vec<Value> = Vec::new();
        for code in concepts.flat_map(codings).filter_map(|c| text(c, "code")) {
            let code = Value::String(self.fit(code, 128, "AuditEvent.purposeOfEvent"));
            if codes.len() == 16 {
                self.warn(
                    "too-long",
                    "more than 16 purposes of use; the rest are not indexed natively",
                    "AuditEvent.purposeOfEvent",
                );
                break;
            }
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        match codes.len() {
            0 => {}
            1 => {
                self.out.insert("purpose_of_use".into(), codes.swap_remove(0));
            }
            _ => {
                self.out.insert("purpose_of_use".into(), codes.into());
            }
        }
    }
}

fn is_source_role(agent: &Value) -> bool {
    agent.get("type").is_some_and(|t| codings(t).iter().any(|c| has_code(c, DICOM, SOURCE_ROLE_ID)))
}

/// `agent.network.address` when it is an IP address (it may also be a host name or a URL).
fn ip_of(agent: &Value) -> Option<IpAddr> {
    agent.get("network").and_then(|n| text(n, "address")).and_then(|a| a.parse().ok())
}

/// A code as one word of a native action: lowercase ASCII letters, digits, `_` and `-`, at
/// most 64 bytes so that `fhir.<word>` stays far inside the 128-byte limit.
fn action_word(code: &str) -> Option<String> {
    let mut w = String::with_capacity(code.len().min(64));
    let mut folded = String::new();
    for c in code.chars().flat_map(char::to_lowercase) {
        folded.clear();
        push_folded(c, &mut folded);
        for c in folded.chars() {
            let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '-' };
            if c == '-' && (w.is_empty() || w.ends_with('-')) {
                continue;
            }
            if w.len() < 64 {
                w.push(c);
            }
        }
    }
    while w.ends_with('-') {
        w.pop();
    }
    (!w.is_empty()).then_some(w)
}

/// The native category: patient data access and change are named as the native API names
/// them, so reports on PHI access cover FHIR events too; DICOM event types otherwise.
fn category_of(type_code: Option<&str>, word: &str, has_patient: bool) -> &'static str {
    let reads = [
        "read",
        "vread",
        "search",
        "search-type",
        "search-system",
        "history",
        "history-instance",
        "history-type",
        "disclose",
        "query",
        "execute",
    ];
    let writes = ["create", "update", "patch", "delete"];
    if has_patient && reads.contains(&word) {
        return "phi_access";
    }
    if has_patient && writes.contains(&word) {
        return "phi_modify";
    }
    match type_code {
        Some("110114") => "authentication",
        Some("110113") => "security",
        Some("110106") => "export",
        Some("110107") => "import",
        Some("110112") => "query",
        Some("rest") => "fhir_rest",
        _ => "fhir",
    }
}

// ---------------------------------------------------------------------------------------------
// Native event -> FHIR AuditEvent

/// The FHIR view of a stored event. A received resource is served as received, with the
/// server's `id` and `meta.lastUpdated`; a native event is translated. Either way, what the
/// privacy filter masked is labelled (see [`label_redactions`]).
pub fn to_audit_event(stored: &Value) -> Value {
    let id = text(stored, "id").filter(|id| is_fhir_id(id));
    let recorded_at = text(stored, "recorded_at");
    let mut r = if let Some(Value::Object(received)) = stored.get("fhir") {
        let mut r = received.clone();
        // The client's id is not ours to serve; an id that is no FHIR id is left out.
        r.remove("id");
        if let Some(id) = id {
            r.insert("id".into(), id.into());
        }
        if let Some(at) = recorded_at {
            object_member(&mut r, "meta").insert("lastUpdated".into(), at.into());
        }
        r
    } else {
        native_audit_event(stored, id, recorded_at)
    };
    label_redactions(stored, &mut r);
    Value::Object(r)
}

/// The object member `name` of `m`, made an empty object when it is missing or not one.
fn object_member<'m>(m: &'m mut Map<String, Value>, name: &str) -> &'m mut Map<String, Value> {
    let member = m.entry(name).or_insert_with(|| json!({}));
    if !member.is_object() {
        *member = json!({});
    }
    member.as_object_mut().expect("made an object above")
}

/// The extension listing what the privacy filter masked in an event, one per `(rule, field)`:
/// sub-extensions `rule` (valueCode) and `field` (valueString, the path in the stored event;
/// `fhir.` is the received resource). docs/fhir.md and docs/privacy.md describe it.
pub const REDACTION_EXTENSION: &str = "https://auditrail.dev/fhir/StructureDefinition/redaction";
/// HL7's security label for a resource altered by redaction.
pub const REDACTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Adds the `REDACTED` security label to `meta.security` and a [`REDACTION_EXTENSION`] per
/// entry of the stored event's `redactions`. A received resource's own copies of the
/// extension are removed first: only the server says what it masked.
fn label_redactions(stored: &Value, r: &mut Map<String, Value>) {
    if let Some(Value::Array(extensions)) = r.get_mut("extension") {
        extensions.retain(|e| text(e, "url") != Some(REDACTION_EXTENSION));
        if extensions.is_empty() {
            r.remove("extension");
        }
    }
    let redactions = list(stored, "redactions");
    if redactions.is_empty() {
        return;
    }
    let meta = object_member(r, "meta");
    let security = meta.entry("security").or_insert_with(|| json!([]));
    if let Value::Array(labels) = security
        && !labels.iter().any(|c| has_code(c, REDACTED_SYSTEM, "REDACTED"))
    {
        labels.push(json!({"system": REDACTED_SYSTEM, "code": "REDACTED", "display": "redacted"}));
    }
    let extensions = r.entry("extension").or_insert_with(|| json!([]));
    if !extensions.is_array() {
        *extensions = json!([]);
    }
    let extensions = extensions.as_array_mut().expect("made an array above");
    for entry in redactions {
        let (Some(rule), Some(field)) = (text(entry, "rule"), text(entry, "field")) else {
            continue;
        };
        extensions.push(json!({"url": REDACTION_EXTENSION, "extension": [
            {"url": "rule", "valueCode": rule},
            {"url": "field", "valueString": field},
        ]}));
    }
}

fn coding(system: &str, code: &str) -> Value {
    json!({"system": system, "code": fhir_code(code)})
}

/// A FHIR `code` has no leading, trailing or repeated whitespace; native strings may.
fn fhir_code(s: &str) -> Cow<'_, str> {
    let clean = !s.starts_with(char::is_whitespace)
        && !s.ends_with(char::is_whitespace)
        && !s.contains(|c: char| c.is_whitespace() && c != ' ')
        && !s.contains("  ");
    if clean {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

fn native_audit_event(
    e: &Value,
    id: Option<&str>,
    recorded_at: Option<&str>,
) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("resourceType".into(), "AuditEvent".into());
    if let Some(id) = id {
        r.insert("id".into(), id.into());
    }
    if let Some(at) = recorded_at {
        r.insert("meta".into(), json!({"lastUpdated": at}));
    }
    r.insert("type".into(), coding(CATEGORY_SYSTEM, category(e)));
    if let Some(action) = text(e, "action") {
        r.insert("subtype".into(), json!([coding(ACTION_SYSTEM, action)]));
        r.insert("action".into(), verb_code(action).into());
    }
    // R4 requires `recorded`; a stored event always has `recorded_at`. Both are normalised to
    // milliseconds in UTC, which is always a valid instant.
    let when = text(e, "occurred_at").or(recorded_at).and_then(parse_rfc3339).unwrap_or(0);
    r.insert("recorded".into(), format_millis(when).into());
    r.insert("outcome".into(), outcome_code(e).into());
    if let Some(desc) = text(e, "outcome_desc") {
        r.insert("outcomeDesc".into(), desc.into());
    }
    let purposes = purposes(e);
    if !purposes.is_empty() {
        let p: Vec<Value> =
            purposes.iter().map(|p| json!({"coding": [coding(PURPOSE_SYSTEM, p)]})).collect();
        r.insert("purposeOfEvent".into(), p.into());
    }
    r.insert("agent".into(), native_agents(e).into());
    r.insert("source".into(), native_source(e));
    let entities = native_entities(e);
    if !entities.is_empty() {
        r.insert("entity".into(), entities.into());
    }
    r
}

/// The category of a native event without one.
const CATEGORY_UNSPECIFIED: &str = "unspecified";

/// The native category, or `unspecified` (R4 requires `type`).
fn category(e: &Value) -> &str {
    text(e, "category").unwrap_or(CATEGORY_UNSPECIFIED)
}

fn purposes(e: &Value) -> Vec<&str> {
    match e.get("purpose_of_use") {
        Some(Value::String(s)) if !s.trim().is_empty() => vec![s.as_str()],
        Some(Value::Array(a)) => {
            a.iter().filter_map(Value::as_str).filter(|s| !s.trim().is_empty()).collect()
        }
        _ => Vec::new(),
    }
}

/// FHIR outcome of a native event: its code, else 0 for success and 8 (serious failure) for
/// failure.
fn outcome_code(e: &Value) -> &'static str {
    outcome_code_of(e.get("outcome_code").and_then(Value::as_u64), text(e, "outcome"))
}

/// The R4 outcome code of a native event's `outcome_code` and `outcome`.
fn outcome_code_of(outcome_code: Option<u64>, outcome: Option<&str>) -> &'static str {
    match outcome_code {
        Some(0) => "0",
        Some(4) => "4",
        Some(8) => "8",
        Some(12) => "12",
        _ if outcome == Some("success") => "0",
        _ => "8",
    }
}

/// The R4 action code (C, R, U, D, E) of a dotted native action: the last word that is a
/// known verb decides (`patient.read` is R, `mfa.disable` is U), and anything else is E.
pub fn verb_code(action: &str) -> &'static str {
    for word in action.rsplit('.') {
        match word {
            "create" | "add" | "insert" | "import" | "upload" | "register" | "new" => return "C",
            "read" | "vread" | "view" | "get" | "download" | "export" | "open" | "access"
            | "print" => return "R",
            "update" | "patch" | "edit" | "modify" | "change" | "set" | "enable" | "disable"
            | "rename" | "grant" | "revoke" | "assign" | "unassign" | "reset" => return "U",
            "delete" | "remove" | "purge" | "erase" | "destroy" => return "D",
            _ => {}
        }
    }
    "E"
}

fn native_agents(e: &Value) -> Vec<Value> {
    let actor = e.get("actor").unwrap_or(&Value::Null);
    let mut agents = Vec::new();
    let mut user = Map::new();
    let mut who = Map::new();
    if let Some(u) = text(actor, "user_id") {
        who.insert("identifier".into(), json!({"value": u}));
    }
    if let Some(n) = text(actor, "name") {
        who.insert("display".into(), n.into());
        user.insert("name".into(), n.into());
    }
    let roles: Vec<Value> = list(actor, "roles")
        .iter()
        .filter_map(Value::as_str)
        .filter(|r| !r.trim().is_empty())
        .map(|r| json!({"coding": [coding(ROLE_SYSTEM, r)]}))
        .collect();
    if !roles.is_empty() {
        user.insert("role".into(), roles.into());
    }
    if let Some(ip) = text(actor, "ip") {
        user.insert("network".into(), json!({"address": ip, "type": "2"}));
    }
    if !who.is_empty() || !user.is_empty() {
        if !who.is_empty() {
            user.insert("who".into(), who.into());
        }
        user.insert("requestor".into(), true.into());
        agents.push(Value::Object(user));
    }
    // The client application, as BALP records it: an agent of type Source Role ID.
    if let Some(client) = text(actor, "client_id") {
        agents.push(json!({
            "type": {"coding": [{"system": DICOM, "code": SOURCE_ROLE_ID, "display": "Source Role ID"}]},
            "who": {"identifier": {"value": client}},
            "requestor": agents.is_empty(),
        }));
    }
    // R4 requires an agent: an event without an actor gets an anonymous one.
    if agents.is_empty() {
        agents.push(json!({"requestor": false}));
    }
    agents
}

fn native_source(e: &Value) -> Value {
    let source = e.get("source").unwrap_or(&Value::Null);
    let mut out = Map::new();
    if let Some(site) = text(source, "site") {
        out.insert("site".into(), site.into());
    }
    // R4 requires an observer; `unknown` when the sender did not name its system.
    let observer = match text(source, "system") {
        Some(s) => json!({"identifier": {"value": s}, "display": s}),
        None => json!({"display": "unknown"}),
    };
    out.insert("observer".into(), observer);
    if let Some(ty) = text(source, "type") {
        out.insert("type".into(), json!([coding(SOURCE_TYPE_SYSTEM, ty)]));
    }
    Value::Object(out)
}

fn native_entities(e: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(p) = e.get("patient")
        && let Some(id) = text(p, "id")
    {
        let mut what = Map::new();
        if is_fhir_id(id) {
            what.insert("reference".into(), format!("Patient/{id}").into());
        }
        let mut identifier = Map::new();
        if let Some(system) = text(p, "system") {
            identifier.insert("system".into(), system.into());
        }
        identifier.insert("value".into(), id.into());
        what.insert("identifier".into(), identifier.into());
        out.push(json!({
            "what": what,
            "type": {"system": ENTITY_TYPE_R4, "code": "1", "display": "Person"},
            "role": {"system": OBJECT_ROLE_R4, "code": "1", "display": "Patient"},
        }));
    }
    for ent in list(e, "entities") {
        let Some(ty) = text(ent, "type") else { continue };
        let mut m = Map::new();
        if let Some(id) = text(ent, "id") {
            m.insert("what".into(), entity_what(ty, id, text(ent, "system")));
        }
        m.insert("type".into(), coding(ENTITY_TYPE_SYSTEM, ty));
        if let Some(role) = text(ent, "role") {
            m.insert("role".into(), coding(ENTITY_ROLE_SYSTEM, role));
        }
        if let Some(name) = text(ent, "name") {
            m.insert("name".into(), name.into());
        }
        out.push(Value::Object(m));
    }
    out
}

/// A native entity that names a FHIR resource (`Observation` and a FHIR id) becomes a literal
/// reference; any other becomes an identifier. The indexer makes the same choice.
fn entity_what(ty: &str, id: &str, system: Option<&str>) -> Value {
    if is_resource_type(ty) && is_fhir_id(id) {
        return json!({"reference": format!("{ty}/{id}")});
    }
    match system {
        Some(s) => json!({"identifier": {"system": s, "value": id}}),
        None => json!({"identifier": {"value": id}}),
    }
}

// ---------------------------------------------------------------------------------------------
// Search parameters

/// The R4 AuditEvent search parameters, plus the four chained `*.identifier` parameters the
/// IHE BALP ATNA Audit Record Repository CapabilityStatement lists (RESTful ATNA, ITI-81).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SearchParam {
    Action,
    Address,
    Agent,
    AgentName,
    AgentRole,
    Altid,
    Date,
    Entity,
    EntityName,
    EntityRole,
    EntityType,
    Outcome,
    Patient,
    Policy,
    Site,
    Source,
    Subtype,
    Type,
    AgentIdentifier,
    EntityIdentifier,
    PatientIdentifier,
    SourceIdentifier,
}

/// The FHIR search parameter types used here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Token,
    String,
    Reference,
    Date,
    Uri,
}

impl SearchParam {
    /// The 18 parameters of the R4 specification, in its order.
    pub const R4: [SearchParam; 18] = [
        SearchParam::Action,
        SearchParam::Address,
        SearchParam::Agent,
        SearchParam::AgentName,
        SearchParam::AgentRole,
        SearchParam::Altid,
        SearchParam::Date,
        SearchParam::Entity,
        SearchParam::EntityName,
        SearchParam::EntityRole,
        SearchParam::EntityType,
        SearchParam::Outcome,
        SearchParam::Patient,
        SearchParam::Policy,
        SearchParam::Site,
        SearchParam::Source,
        SearchParam::Subtype,
        SearchParam::Type,
    ];
    /// The four chained identifier parameters of RESTful ATNA.
    pub const ATNA: [SearchParam; 4] = [
        SearchParam::AgentIdentifier,
        SearchParam::EntityIdentifier,
        SearchParam::PatientIdentifier,
        SearchParam::SourceIdentifier,
    ];

    pub fn all() -> impl Iterator<Item = SearchParam> {
        SearchParam::R4.into_iter().chain(SearchParam::ATNA)
    }

    pub fn name(self) -> &'static str {
        match self {
            SearchParam::Action => "action",
            SearchParam::Address => "address",
            SearchParam::Agent => "agent",
            SearchParam::AgentName => "agent-name",
            SearchParam::AgentRole => "agent-role",
            SearchParam::Altid => "altid",
            SearchParam::Date => "date",
            SearchParam::Entity => "entity",
            SearchParam::EntityName => "entity-name",
            SearchParam::EntityRole => "entity-role",
            SearchParam::EntityType => "entity-type",
            SearchParam::Outcome => "outcome",
            SearchParam::Patient => "patient",
            SearchParam::Policy => "policy",
            SearchParam::Site => "site",
            SearchParam::Source => "source",
            SearchParam::Subtype => "subtype",
            SearchParam::Type => "type",
            SearchParam::AgentIdentifier => "agent.identifier",
            SearchParam::EntityIdentifier => "entity.identifier",
            SearchParam::PatientIdentifier => "patient.identifier",
            SearchParam::SourceIdentifier => "source.identifier",
        }
    }

    pub fn from_name(name: &str) -> Option<SearchParam> {
        SearchParam::all().find(|p| p.name() == name)
    }

    pub fn kind(self) -> ParamType {
        use SearchParam::*;
        match self {
            Address | AgentName | EntityName => ParamType::String,
            Agent | Entity | Patient | Source => ParamType::Reference,
            Date => ParamType::Date,
            Policy => ParamType::Uri,
            Action | AgentRole | Altid | EntityRole | EntityType | Outcome | Site | Subtype
            | Type | AgentIdentifier | EntityIdentifier | PatientIdentifier | SourceIdentifier => {
                ParamType::Token
            }
        }
    }

    /// The canonical URL of the R4 SearchParameter; `None` for the chained ATNA parameters.
    pub fn definition(self) -> Option<String> {
        let r4 = SearchParam::R4.contains(&self);
        r4.then(|| format!("http://hl7.org/fhir/SearchParameter/AuditEvent-{}", self.name()))
    }

    /// Whether the terms can identify a patient, so the index must store them blinded.
    pub fn carries_phi(self) -> bool {
        use SearchParam::*;
        matches!(self, Patient | PatientIdentifier | Entity | EntityIdentifier | EntityName)
    }

    /// The identifier parameter that `name:identifier` on this reference parameter means.
    fn identifier_param(self) -> Option<SearchParam> {
        match self {
            SearchParam::Agent => Some(SearchParam::AgentIdentifier),
            SearchParam::Entity => Some(SearchParam::EntityIdentifier),
            SearchParam::Patient => Some(SearchParam::PatientIdentifier),
            SearchParam::Source => Some(SearchParam::SourceIdentifier),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Index terms

/// Emits every term a stored event is found by, for every parameter except `date` (the index
/// keeps dates in a column; see [`event_date_ms`]). [`parse_search`] produces exactly these
/// strings. The event is a borrowed [`Json`], because the index runs this on every event it
/// reads; a FHIR-origin event's resource is converted to a `Value` for [`fhir_terms`].
pub fn index_terms(stored: &Json<'_>, emit: &mut dyn FnMut(SearchParam, &str)) {
    let mut t = Terms { emit, buf: String::new() };
    match stored.get("fhir") {
        Some(r @ Json::Object(_)) => fhir_terms(&r.to_value(), &mut t),
        _ => native_terms(stored, &mut t),
    }
}

/// The instant the `date` parameter matches: `occurred_at` (FHIR `recorded`), else
/// `recorded_at`.
pub fn event_date_ms(stored: &Value) -> Option<UnixMillis> {
    text(stored, "occurred_at").and_then(parse_rfc3339).or_else(|| last_updated_ms(stored))
}

/// The instant `_lastUpdated` matches: the server's `recorded_at`.
pub fn last_updated_ms(stored: &Value) -> Option<UnixMillis> {
    text(stored, "recorded_at").and_then(parse_rfc3339)
}

struct Terms<'e> {
    emit: &'e mut dyn FnMut(SearchParam, &str),
    buf: String,
}

impl Terms<'_> {
    fn raw(&mut self, p: SearchParam, s: &str) {
        if !s.is_empty() {
            (self.emit)(p, s);
        }
    }

    /// Emits `buf` after `fill` writes it.
    fn built(&mut self, p: SearchParam, fill: impl FnOnce(&mut String)) {
        self.buf.clear();
        fill(&mut self.buf);
        (self.emit)(p, &self.buf);
    }

    /// `code`, and `system|code` plus `system|` or, without a system, `|code`.
    fn token(&mut self, p: SearchParam, system: Option<&str>, code: Option<&str>) {
        let system = system.filter(|s| !s.is_empty());
        let code = code.filter(|c| !c.is_empty());
        if let Some(c) = code {
            self.raw(p, c);
            self.built(p, |b| {
                b.push_str(system.unwrap_or(""));
                b.push('|');
                b.push_str(c);
            });
        }
        if let Some(s) = system {
            self.built(p, |b| {
                b.push_str(s);
                b.push('|');
            });
        }
    }

    fn coding(&mut self, p: SearchParam, c: &Value) {
        self.token(p, text(c, "system"), text(c, "code"));
    }

    fn codeable(&mut self, p: SearchParam, cc: &Value) {
        for c in codings(cc) {
            self.coding(p, c);
        }
    }

    /// A literal reference as given, its `Type/id` and its id.
    fn reference(&mut self, p: SearchParam, r: &str) {
        let r = r.split_once("/_history/").map_or(r, |(head, _)| head);
        self.raw(p, r);
        if let Some((ty, id)) = split_reference(r) {
            if r.len() != ty.len() + 1 + id.len() {
                self.built(p, |b| {
                    b.push_str(ty);
                    b.push('/');
                    b.push_str(id);
                });
            }
            self.raw(p, id);
        }
    }

    /// A Reference element: its literal reference, and its identifier both as a bare value
    /// under `p` and as a token under the matching `*.identifier` parameter.
    fn reference_element(&mut self, p: SearchParam, reference: &Value) {
        if let Some(r) = text(reference, "reference") {
            self.reference(p, r);
        }
        if let Some(ident) = reference.get("identifier") {
            if let Some(v) = text(ident, "value") {
                self.raw(p, v);
            }
            if let Some(ip) = p.identifier_param() {
                self.token(ip, text(ident, "system"), text(ident, "value"));
            }
        }
    }

    /// A string parameter: the folded whole, each folded word, and `=` + the exact string.
    fn string(&mut self, p: SearchParam, s: &str) {
        if s.is_empty() {
            return;
        }
        let folded = fold_string(p, s);
        self.raw(p, &folded);
        if p != SearchParam::Address && folded.contains(' ') {
            for word in folded.split(' ').take(32) {
                self.raw(p, word);
            }
        }
        self.built(p, |b| {
            b.push('=');
            b.push_str(s);
        });
    }
}

fn fhir_terms(r: &Value, t: &mut Terms<'_>) {
    use SearchParam::*;
    t.token(Action, text(r, "action").map(|_| R4_ACTION_SYSTEM), text(r, "action"));
    t.token(Outcome, text(r, "outcome").map(|_| R4_OUTCOME_SYSTEM), text(r, "outcome"));
    if let Some(ty) = r.get("type") {
        t.coding(Type, ty);
    }
    for c in list(r, "subtype") {
        t.coding(Subtype, c);
    }
    for agent in list(r, "agent") {
        agent_terms(agent, t);
    }
    if let Some(source) = r.get("source") {
        if let Some(observer) = source.get("observer") {
            t.reference_element(Source, observer);
            // Many observers carry only a display (BALP examples do); it is searchable too.
            if let Some(d) = text(observer, "display") {
                t.raw(Source, d);
            }
        }
        if let Some(site) = text(source, "site") {
            t.raw(Site, site);
        }
    }
    for e in list(r, "entity") {
        if let Some(what) = e.get("what") {
            t.reference_element(Entity, what);
            if is_patient_entity(e) {
                t.reference_element(Patient, what);
            }
            if let Some(d) = text(what, "display") {
                t.string(EntityName, d);
            }
        }
        if let Some(ty) = e.get("type") {
            t.coding(EntityType, ty);
        }
        if let Some(role) = e.get("role") {
            t.coding(EntityRole, role);
        }
        if let Some(name) = text(e, "name") {
            t.string(EntityName, name);
        }
    }
}

fn agent_terms(agent: &Value, t: &mut Terms<'_>) {
    use SearchParam::*;
    if let Some(who) = agent.get("who") {
        t.reference_element(Agent, who);
        if refers_to_patient(who) {
            t.reference_element(Patient, who);
        }
        if let Some(d) = text(who, "display") {
            t.string(AgentName, d);
        }
    }
    if let Some(name) = text(agent, "name") {
        t.string(AgentName, name);
    }
    // BALP puts the participant's role in `agent.type`, so both answer `agent-role`.
    if let Some(ty) = agent.get("type") {
        t.codeable(AgentRole, ty);
    }
    for role in list(agent, "role") {
        t.codeable(AgentRole, role);
    }
    if let Some(alt) = text(agent, "altId") {
        t.raw(Altid, alt);
    }
    for policy in list(agent, "policy").iter().filter_map(Value::as_str) {
        t.raw(Policy, policy);
    }
    if let Some(address) = agent.get("network").and_then(|n| text(n, "address")) {
        t.string(Address, address);
    }
}

/// The same terms `fhir_terms` would find in `to_audit_event(stored)`, read straight from the
/// native fields.
fn native_terms(e: &Json<'_>, t: &mut Terms<'_>) {
    use SearchParam::*;
    t.token(
        Type,
        Some(CATEGORY_SYSTEM),
        Some(&fhir_code(jtext(e, "category").unwrap_or(CATEGORY_UNSPECIFIED))),
    );
    if let Some(action) = jtext(e, "action") {
        t.token(Subtype, Some(ACTION_SYSTEM), Some(action));
        t.token(Action, Some(R4_ACTION_SYSTEM), Some(verb_code(action)));
    }
    t.token(
        Outcome,
        Some(R4_OUTCOME_SYSTEM),
        Some(outcome_code_of(e.get("outcome_code").and_then(Json::as_u64), jtext(e, "outcome"))),
    );
    if let Some(actor) = e.get("actor") {
        for key in ["user_id", "client_id"] {
            if let Some(u) = jtext(actor, key) {
                t.raw(Agent, u);
                t.token(AgentIdentifier, None, Some(u));
            }
        }
        if jtext(actor, "client_id").is_some() {
            t.token(AgentRole, Some(DICOM), Some(SOURCE_ROLE_ID));
        }
        if let Some(name) = jtext(actor, "name") {
            t.string(AgentName, name);
        }
        for role in actor
            .at("roles")
            .elements()
            .iter()
            .filter_map(Json::as_str)
            .filter(|r| !r.trim().is_empty())
        {
            t.token(AgentRole, Some(ROLE_SYSTEM), Some(&fhir_code(role)));
        }
        if let Some(ip) = jtext(actor, "ip") {
            t.string(Address, ip);
        }
    }
    let source = e.at("source");
    match jtext(source, "system") {
        Some(system) => {
            t.raw(Source, system);
            t.token(SourceIdentifier, None, Some(system));
        }
        // As `native_source` names the observer of an event without a source system.
        None => t.raw(Source, "unknown"),
    }
    if let Some(site) = jtext(source, "site") {
        t.raw(Site, site);
    }
    if let Some(p) = e.get("patient")
        && let Some(id) = jtext(p, "id")
    {
        native_patient_terms(id, jtext(p, "system"), t);
    }
    for ent in e.at("entities").elements() {
        native_entity_terms(ent, t);
    }
}

fn native_patient_terms(id: &str, system: Option<&str>, t: &mut Terms<'_>) {
    use SearchParam::*;
    for p in [Patient, Entity] {
        if is_fhir_id(id) {
            t.built(p, |b| {
                b.push_str("Patient/");
                b.push_str(id);
            });
        }
        t.raw(p, id);
    }
    t.token(PatientIdentifier, system, Some(id));
    t.token(EntityIdentifier, system, Some(id));
    t.token(EntityType, Some(ENTITY_TYPE_R4), Some("1"));
    t.token(EntityRole, Some(OBJECT_ROLE_R4), Some("1"));
}

fn native_entity_terms(ent: &Json<'_>, t: &mut Terms<'_>) {
    use SearchParam::*;
    let Some(ty) = jtext(ent, "type") else { return };
    t.token(EntityType, Some(ENTITY_TYPE_SYSTEM), Some(&fhir_code(ty)));
    if let Some(role) = jtext(ent, "role") {
        t.token(EntityRole, Some(ENTITY_ROLE_SYSTEM), Some(&fhir_code(role)));
    }
    if let Some(name) = jtext(ent, "name") {
        t.string(EntityName, name);
    }
    if let Some(id) = jtext(ent, "id") {
        // As `entity_what`: a reference for FHIR-looking entities, an identifier otherwise.
        if is_resource_type(ty) && is_fhir_id(id) {
            t.built(Entity, |b| {
                b.push_str(ty);
                b.push('/');
                b.push_str(id);
            });
            t.raw(Entity, id);
        } else {
            t.raw(Entity, id);
            t.token(EntityIdentifier, jtext(ent, "system"), Some(id));
        }
    }
}

/// [`text`] of a [`Json`].
fn jtext<'j>(v: &'j Json<'_>, key: &str) -> Option<&'j str> {
    v.get(key).and_then(Json::as_str).filter(|s| !s.trim().is_empty())
}

/// The searchable form of a string: for names, lowercase, common Latin accents folded and
/// words separated by single spaces; for addresses, lowercase. Borrowed when already so.
fn fold_string(p: SearchParam, s: &str) -> Cow<'_, str> {
    if p == SearchParam::Address {
        let s = s.trim();
        return if s.bytes().any(|b| b.is_ascii_uppercase()) || !s.is_ascii() {
            Cow::Owned(s.to_lowercase())
        } else {
            Cow::Borrowed(s)
        };
    }
    let normal = !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.contains("  ")
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b' ');
    if normal {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut gap = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        if c.is_alphanumeric() {
            if gap && !out.is_empty() {
                out.push(' ');
            }
            gap = false;
            push_folded(c, &mut out);
        } else {
            gap = true;
        }
    }
    Cow::Owned(out)
}

/// Folds the accented lowercase letters of Latin-1 and Latin Extended-A that names commonly
/// carry; other letters pass through.
fn push_folded(c: char, out: &mut String) {
    let folded = match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' | 'ā' | 'ă' | 'ą' => "a",
        'ç' | 'ć' | 'č' => "c",
        'ď' | 'đ' => "d",
        'è' | 'é' | 'ê' | 'ë' | 'ē' | 'ė' | 'ę' | 'ě' => "e",
        'ì' | 'í' | 'î' | 'ï' | 'ī' | 'į' | 'ı' => "i",
        'ł' | 'ľ' | 'ĺ' => "l",
        'ñ' | 'ń' | 'ň' => "n",
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' | 'ō' | 'ő' => "o",
        'ŕ' | 'ř' => "r",
        'ś' | 'š' | 'ş' => "s",
        'ť' | 'ţ' => "t",
        'ù' | 'ú' | 'û' | 'ü' | 'ū' | 'ů' | 'ű' | 'ų' => "u",
        'ý' | 'ÿ' => "y",
        'ź' | 'ż' | 'ž' => "z",
        'ß' => "ss",
        'æ' => "ae",
        'œ' => "oe",
        'þ' => "th",
        _ => {
            out.push(c);
            return;
        }
    };
    out.push_str(folded);
}

// ---------------------------------------------------------------------------------------------
// Search request parsing

/// One parameter's values: the event must have at least one of the terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnyOf {
    pub param: SearchParam,
    pub values: Vec<String>,
}

/// The instant must lie in `[lo_ms, hi_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateBound {
    pub lo_ms: i64,
    pub hi_ms: i64,
}

impl DateBound {
    pub fn contains(&self, ms: i64) -> bool {
        self.lo_ms <= ms && ms < self.hi_ms
    }
}

/// Result order. The default is newest first in log order, which the server can serve
/// without sorting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    DateAsc,
    DateDesc,
    LastUpdatedAsc,
    #[default]
    LastUpdatedDesc,
}

pub const COUNT_DEFAULT: usize = 50;
pub const COUNT_MAX: usize = 1000;
/// Bounds the work one request can ask for: values per parameter and parameters per request.
pub const VALUES_MAX: usize = 64;
pub const PARAMS_MAX: usize = 64;

/// A parsed `GET /fhir/AuditEvent?...`: every `all_of` item, every date bound and every `ids`
/// item must hold (AND); within one item any value may (OR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Search {
    pub all_of: Vec<AnyOf>,
    pub date: Vec<DateBound>,
    pub last_updated: Vec<DateBound>,
    pub ids: Vec<Vec<String>>,
    pub count: usize,
    pub sort: Sort,
    /// `_cursor` or `_page`, passed through untouched for the server's paging.
    pub cursor: Option<String>,
}

impl Default for Search {
    fn default() -> Search {
        Search {
            all_of: Vec::new(),
            date: Vec::new(),
            last_updated: Vec::new(),
            ids: Vec::new(),
            count: COUNT_DEFAULT,
            sort: Sort::default(),
            cursor: None,
        }
    }
}

/// Parses decoded query pairs. Strict: an unknown parameter or modifier is an error, so a
/// search never silently returns more than was asked for. All problems are reported at once.
pub fn parse_search(pairs: &[(String, String)]) -> Result<Search, Vec<Issue>> {
    let mut s = Search::default();
    let mut issues = Vec::new();
    if pairs.len() > PARAMS_MAX {
        return Err(vec![Issue::error(
            "too-costly",
            format!("at most {PARAMS_MAX} search parameters"),
            "",
        )]);
    }
    for (name, value) in pairs {
        if let Err(issue) = parse_pair(&mut s, name, value) {
            issues.push(issue);
        }
    }
    if issues.is_empty() { Ok(s) } else { Err(issues) }
}

fn parse_pair(s: &mut Search, full_name: &str, value: &str) -> Result<(), Issue> {
    let (name, modifier) = match full_name.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (full_name, None),
    };
    let bad = |code, msg: String| Issue::error(code, msg, full_name);
    let no_modifier = || match modifier {
        Some(m) => {
            Err(bad("not-supported", format!("{full_name}: the modifier :{m} is not supported")))
        }
        None => Ok(()),
    };
    match name {
        "_format" | "_pretty" => return Ok(()),
        "_count" => {
            no_modifier()?;
            let n: usize = value.trim().parse().map_err(|_| {
                bad("value", format!("_count must be a whole number, not {value:?}"))
            })?;
            s.count = n.min(COUNT_MAX);
            return Ok(());
        }
        "_sort" => {
            no_modifier()?;
            s.sort = match value {
                "date" => Sort::DateAsc,
                "-date" => Sort::DateDesc,
                "_lastUpdated" => Sort::LastUpdatedAsc,
                "-_lastUpdated" => Sort::LastUpdatedDesc,
                _ => {
                    return Err(bad(
                        "value",
                        format!(
                            "_sort must be date, -date, _lastUpdated or -_lastUpdated, not {value:?}"
                        ),
                    ));
                }
            };
            return Ok(());
        }
        "_cursor" | "_page" => {
            no_modifier()?;
            if s.cursor.is_some() {
                return Err(bad("invalid", "give at most one _cursor or _page".into()));
            }
            s.cursor = Some(value.to_string());
            return Ok(());
        }
        _ => {}
    }
    // FHIR ignores a parameter whose value is empty.
    if value.is_empty() {
        return Ok(());
    }
    let values = split_values(value).map_err(|m| bad("value", format!("{full_name}: {m}")))?;
    match name {
        "_id" => {
            no_modifier()?;
            s.ids.push(values);
            return Ok(());
        }
        "date" | "_lastUpdated" => {
            no_modifier()?;
            let [one] = values.as_slice() else {
                return Err(bad(
                    "not-supported",
                    format!(
                        "{name}: several dates separated by commas are not supported; repeat the parameter to combine bounds"
                    ),
                ));
            };
            let bound = parse_date_bound(one).map_err(|m| bad("value", format!("{name}: {m}")))?;
            if name == "date" {
                s.date.push(bound)
            } else {
                s.last_updated.push(bound)
            }
            return Ok(());
        }
        _ => {}
    }
    let Some(param) = SearchParam::from_name(name) else {
        return Err(bad(
            "not-supported",
            format!("{name} is not a supported AuditEvent search parameter"),
        ));
    };
    let (param, values) = normalise(param, modifier, values)
        .map_err(|m| bad(m.0, format!("{full_name}: {}", m.1)))?;
    s.all_of.push(AnyOf { param, values });
    Ok(())
}

/// Splits on commas not escaped by `\`, and unescapes `\,`, `\$`, `\|` and `\\`.
fn split_values(value: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ (',' | '$' | '|' | '\\')) => {
                    // `\|` stays escaped for tokens to split on; the rest unescape here.
                    if e == '|' {
                        cur.push('\\');
                    }
                    cur.push(e);
                }
                _ => return Err("a backslash must escape , $ | or \\".into()),
            },
            ',' => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out.retain(|v| !v.is_empty());
    if out.is_empty() {
        return Err("no value".into());
    }
    if out.len() > VALUES_MAX {
        return Err(format!("at most {VALUES_MAX} values"));
    }
    Ok(out)
}

type NormError = (&'static str, String);

/// Turns search values into the exact terms `index_terms` emits, applying the modifier.
fn normalise(
    param: SearchParam,
    modifier: Option<&str>,
    values: Vec<String>,
) -> Result<(SearchParam, Vec<String>), NormError> {
    let unsupported =
        |m: &str| Err(("not-supported", format!("the modifier :{m} is not supported")));
    match (param.kind(), modifier) {
        (ParamType::Token, None) => {
            Ok((param, values.iter().map(|v| token_value(v)).collect::<Result<_, _>>()?))
        }
        (ParamType::Uri, None) => Ok((param, values.iter().map(|v| unescape_bar(v)).collect())),
        (ParamType::String, None) => {
            let folded: Vec<String> =
                values.iter().map(|v| fold_string(param, v).into_owned()).collect();
            if folded.iter().any(String::is_empty) {
                return Err(("value", "a value must have at least one letter or digit".into()));
            }
            Ok((param, folded))
        }
        (ParamType::String, Some("exact")) => {
            Ok((param, values.iter().map(|v| format!("={}", unescape_bar(v))).collect()))
        }
        (ParamType::Reference, None) => {
            Ok((param, values.iter().map(|v| reference_value(&unescape_bar(v))).collect()))
        }
        (ParamType::Reference, Some("identifier")) => {
            let ip = param
                .identifier_param()
                .ok_or(("not-supported", "no identifier form".to_string()))?;
            Ok((ip, values.iter().map(|v| token_value(v)).collect::<Result<_, _>>()?))
        }
        (ParamType::Reference, Some(ty)) if is_resource_type(ty) => {
            let typed = values.iter().map(|v| {
                let v = unescape_bar(v);
                if v.contains('/') {
                    let r = reference_value(&v);
                    if r.starts_with(ty) && r.as_bytes().get(ty.len()) == Some(&b'/') {
                        Ok(r)
                    } else {
                        Err(("value", format!("{v:?} is not a reference to a {ty}")))
                    }
                } else {
                    Ok(format!("{ty}/{v}"))
                }
            });
            Ok((param, typed.collect::<Result<_, _>>()?))
        }
        (_, Some(m)) => unsupported(m),
        (ParamType::Date, None) => {
            Err(("not-supported", "date parameters are handled apart".into()))
        }
    }
}

fn unescape_bar(v: &str) -> String {
    v.replace("\\|", "|")
}

/// `code`, `system|code`, `|code` and `system|` are terms as they are; `\|` is a literal bar.
fn token_value(v: &str) -> Result<String, NormError> {
    let bars =
        v.match_indices('|').filter(|(i, _)| *i == 0 || v.as_bytes()[i - 1] != b'\\').count();
    if bars > 1 {
        return Err(("value", format!("{v:?} has more than one unescaped |")));
    }
    if v == "|" {
        return Err(("value", "\"|\" names neither a system nor a code".into()));
    }
    Ok(v.replace("\\|", "|"))
}

/// A reference value as the index holds it: an absolute URL by its `Type/id` tail, a
/// version-specific one without its version; anything else as given.
fn reference_value(v: &str) -> String {
    let v = v.split_once("/_history/").map_or(v, |(head, _)| head);
    if v.contains("://")
        && let Some((ty, id)) = split_reference(v)
    {
        return format!("{ty}/{id}");
    }
    v.to_string()
}

/// Parses `[prefix]value` into the range of instants that satisfy it.
fn parse_date_bound(v: &str) -> Result<DateBound, String> {
    let (prefix, rest) = match v.get(..2) {
        Some(p) if p.bytes().all(|b| b.is_ascii_lowercase()) => (p, &v[2..]),
        _ => ("eq", v),
    };
    let (lo, hi) = parse_partial_date(rest).ok_or_else(|| {
        format!("{v:?} is not a date: use yyyy, yyyy-mm, yyyy-mm-dd or yyyy-mm-ddThh:mm[:ss[.sss]][Z|+hh:mm], after an optional prefix eq, ge, gt, le, lt, sa or eb")
    })?;
    let (lo_ms, hi_ms) = match prefix {
        "eq" => (lo, hi),
        "ge" => (lo, i64::MAX),
        // The event's instant is a point, so "starts after" is "after" and "ends before" is
        // "before".
        "gt" | "sa" => (hi, i64::MAX),
        "le" => (i64::MIN, hi),
        "lt" | "eb" => (i64::MIN, lo),
        "ne" | "ap" => return Err(format!("the prefix {prefix} is not supported")),
        _ => return Err(format!("{prefix:?} is not a date prefix (eq, ge, gt, le, lt, sa, eb)")),
    };
    Ok(DateBound { lo_ms, hi_ms })
}

/// The range `[lo, hi)` in milliseconds that a FHIR partial date covers. A time without a zone
/// is read as UTC, as the server has no other time zone.
fn parse_partial_date(s: &str) -> Option<(i64, i64)> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: u8| b.get(i) == Some(&c);
    let year = num(0..4).filter(|y| (1..=9999).contains(y))?;
    let day_ms = 86_400_000;
    match b.len() {
        4 => return Some((civil_ms(year, 1, 1), civil_ms(year + 1, 1, 1))),
        7 if sep(4, b'-') => {
            let m = num(5..7).filter(|m| (1..=12).contains(m))?;
            let (ny, nm) = if m == 12 { (year + 1, 1) } else { (year, m + 1) };
            return Some((civil_ms(year, m, 1), civil_ms(ny, nm, 1)));
        }
        10 if sep(4, b'-') && sep(7, b'-') => {
            let lo = date_ms(year, num(5..7)?, num(8..10)?)?;
            return Some((lo, lo + day_ms));
        }
        n if n < 16 => return None,
        _ => {}
    }
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':')) {
        return None;
    }
    let day = date_ms(year, num(5..7)?, num(8..10)?)?;
    let (h, mi) = (num(11..13).filter(|h| *h < 24)?, num(14..16).filter(|m| *m < 60)?);
    let mut at = day + (h * 60 + mi) * 60_000;
    let mut width = 60_000;
    let mut i = 16;
    if sep(i, b':') {
        at += num(17..19).filter(|s| *s < 60)? * 1000;
        width = 1000;
        i = 19;
        if sep(i, b'.') {
            let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
            if digits == 0 {
                return None;
            }
            let ms_digits = digits.min(3);
            let frac = num(i + 1..i + 1 + ms_digits)?;
            width = 10_i64.pow(3 - ms_digits as u32);
            at += frac * width;
            i += 1 + digits;
        }
    }
    let offset_min = match &b[i..] {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), ..] if b.len() == i + 6 && sep(i + 3, b':') => {
            let off = num(i + 1..i + 3).filter(|h| *h <= 14)? * 60
                + num(i + 4..i + 6).filter(|m| *m < 60)?;
            if *sign == b'+' { off } else { -off }
        }
        _ => return None,
    };
    let lo = at - offset_min * 60_000;
    Some((lo, lo + width))
}

fn date_ms(y: i64, m: i64, d: i64) -> Option<i64> {
    let days_in_month = match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    (1..=days_in_month).contains(&d).then(|| civil_ms(y, m, d))
}

/// Milliseconds since the epoch at midnight UTC of a proleptic Gregorian date (Howard
/// Hinnant's `days_from_civil`). `time.rs` has the same, but private and limited to the years
/// events can have, while search bounds may name any year.
fn civil_ms(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe - 719_468) * 86_400_000
}

// ---------------------------------------------------------------------------------------------
// CapabilityStatement

/// The date this statement's content last changed (R4 requires one; the core has no clock).
const CAPABILITY_DATE: &str = "2026-11-22";

/// The BALP content profiles the repository accepts (all of them, as the BALP ARR does).
const BALP_PROFILES: [&str; 19] = [
    "IHE.BasicAudit.Create",
    "IHE.BasicAudit.Read",
    "IHE.BasicAudit.Update",
    "IHE.BasicAudit.Delete",
    "IHE.BasicAudit.Query",
    "IHE.BasicAudit.PatientCreate",
    "IHE.BasicAudit.PatientRead",
    "IHE.BasicAudit.PatientUpdate",
    "IHE.BasicAudit.PatientDelete",
    "IHE.BasicAudit.PatientQuery",
    "IHE.IUA.71",
    "IHE.BasicAudit.OAUTHaccessTokenUse.Comprehensive",
    "IHE.BasicAudit.OAUTHaccessTokenUse.Minimal",
    "IHE.BasicAudit.OAUTHaccessTokenUse.Opaque",
    "IHE.BasicAudit.SAMLaccessTokenUse.Comprehensive",
    "IHE.BasicAudit.SAMLaccessTokenUse.Minimal",
    "IHE.BasicAudit.AuthZconsent",
    "IHE.BasicAudit.PrivacyDisclosure.Recipient",
    "IHE.BasicAudit.PrivacyDisclosure.Source",
];

/// An R4 CapabilityStatement for an IHE BALP ATNA Audit Record Repository: ITI-20 (create,
/// batch and transaction) and ITI-81 (read and search).
pub fn capability_statement(base_url: &str, software_version: &str) -> Value {
    let mut params: Vec<Value> = SearchParam::all()
        .map(|p| {
            let mut m = Map::new();
            m.insert("name".into(), p.name().into());
            if let Some(d) = p.definition() {
                m.insert("definition".into(), d.into());
            }
            m.insert("type".into(), param_type_code(p.kind()).into());
            if p.definition().is_none() {
                m.insert("documentation".into(), "RESTful ATNA: the identifier carried in the AuditEvent's reference (not resolved)".into());
            }
            Value::Object(m)
        })
        .collect();
    params.extend([
        json!({"name": "_id", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id", "type": "token"}),
        json!({"name": "_lastUpdated", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated", "type": "date"}),
        json!({"name": "_count", "type": "number", "documentation": format!("page size, default {COUNT_DEFAULT}, at most {COUNT_MAX}")}),
        json!({"name": "_sort", "type": "string", "documentation": "date, -date, _lastUpdated or -_lastUpdated (the default)"}),
    ]);
    let profiles: Vec<String> = BALP_PROFILES
        .iter()
        .map(|p| format!("https://profiles.ihe.net/ITI/BALP/StructureDefinition/{p}"))
        .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": CAPABILITY_DATE,
        "publisher": "auditrail",
        "kind": "instance",
        "instantiates": [BALP_ARR_CAPABILITY],
        "software": {"name": "auditrail", "version": software_version},
        "implementation": {"description": "auditrail audit record repository", "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "documentation": "IHE ITI-20 Record Audit Event (create, batch, transaction) and ITI-81 Retrieve ATNA Audit Event (read, search). AuditEvents are stored as received, never rejected for profile non-conformance.",
            "resource": [{
                "type": "AuditEvent",
                "profile": "http://hl7.org/fhir/StructureDefinition/AuditEvent",
                "supportedProfile": profiles,
                "interaction": [{"code": "create"}, {"code": "read"}, {"code": "search-type"}],
                "versioning": "no-version",
                "readHistory": false,
                "updateCreate": false,
                "searchParam": params,
            }],
            "interaction": [{"code": "batch"}, {"code": "transaction"}],
        }],
    })
}

fn param_type_code(t: ParamType) -> &'static str {
    match t {
        ParamType::Token => "token",
        ParamType::String => "string",
        ParamType::Reference => "reference",
        ParamType::Date => "date",
        ParamType::Uri => "uri",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::ClientEvent;
    use std::collections::BTreeSet;

    /// The IHE BALP examples. They live outside the repository, in the shared corpus.
    fn corpus_dir() -> std::path::PathBuf {
        std::env::var_os("AUDITRAIL_BALP_CORPUS").map_or_else(
            || concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/corpus/balp").into(),
            Into::into,
        )
    }

    fn corpus() -> Vec<(String, Value)> {
        let dir = corpus_dir();
        let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("BALP corpus at {dir:?} ({e}); set AUDITRAIL_BALP_CORPUS"))
            .map(|f| f.unwrap().path())
            .filter(|p| {
                let name = p.file_name().unwrap().to_string_lossy();
                name.starts_with("AuditEvent-") && name.ends_with(".json")
            })
            .map(|p| {
                let v = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
                (p.file_name().unwrap().to_string_lossy().into_owned(), v)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn example(name: &str) -> Value {
        let path = corpus_dir().join(format!("AuditEvent-ex-{name}.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// The index terms of a stored event, read back from its bytes as the index reads it.
    fn terms(stored: &Value) -> BTreeSet<(&'static str, String)> {
        let bytes = serde_json::to_vec(stored).unwrap();
        let mut out = BTreeSet::new();
        index_terms(&Json::parse(&bytes).unwrap(), &mut |p, t| {
            out.insert((p.name(), t.to_string()));
        });
        out
    }

    /// A stored event made from a received resource, as the server would store it.
    fn stored_from(resource: &Value) -> Value {
        let (mut m, _) = to_canonical(resource).unwrap();
        m.insert("id".into(), "0190f3a2-7c4e-7b1a-8f00-000000000001".into());
        m.insert("seq".into(), 7.into());
        m.insert("recorded_at".into(), "2026-11-22T10:15:00.123Z".into());
        Value::Object(m)
    }

    fn has(terms: &BTreeSet<(&'static str, String)>, param: &str, term: &str) -> bool {
        terms.contains(&(SearchParam::from_name(param).unwrap().name(), term.to_string()))
    }

    #[test]
    fn every_balp_example_maps_and_validates() {
        let all = corpus();
        assert!(all.len() >= 46, "only {} examples", all.len());
        for (name, r) in all {
            let (m, issues) = to_canonical(&r).unwrap_or_else(|e| panic!("{name}: {e:?}"));
            assert!(!issues.iter().any(Issue::is_error), "{name}: {issues:?}");
            assert_eq!(m.get("fhir"), Some(&r), "{name}");
            let event = ClientEvent::validate(Value::Object(m.clone()));
            assert!(event.is_ok(), "{name}: {event:?}\n{m:?}");
            assert!(event.unwrap().prepare().is_ok(), "{name} is too large to store");
            assert!(m["action"].as_str().unwrap().starts_with("fhir."), "{name}");
            // Every example carries a patient reference except the NoPatient ones.
            assert_eq!(m.contains_key("patient"), has_patient_ref(&r), "{name}");
        }
    }

    #[test]
    fn the_privacy_filter_finds_nothing_to_mask_in_the_balp_examples() {
        // 46 real AuditEvents with timestamps, UUIDs, base64 queries, addresses and OAuth
        // details: a false positive here would mangle ordinary events.
        let filter =
            crate::privacy::Filter::new(&crate::privacy::PrivacyConfig::default()).unwrap();
        for (name, r) in corpus() {
            let mut masked = r.clone();
            let fired = filter.mask_audit_event(&mut masked);
            assert_eq!(fired.pairs().collect::<Vec<_>>(), vec![], "{name}");
            assert_eq!(masked, r, "{name}");
        }
    }

    #[test]
    fn redactions_are_labelled_in_the_fhir_view_and_cannot_be_forged() {
        let forged = json!({"url": REDACTION_EXTENSION, "extension": [{"url": "rule", "valueCode": "none"}]});
        let other = json!({"url": "http://example.org/x", "valueString": "kept"});
        let htest = json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HTEST"});
        let mut stored = stored_from(&json!({"resourceType": "AuditEvent",
            "meta": {"security": [htest]}, "extension": [forged, other]}));
        let view = to_audit_event(&stored);
        assert_eq!(view["extension"], json!([other]), "a client cannot say what was masked");
        assert_eq!(view["meta"]["security"], json!([htest]));

        stored["redactions"] = json!([{"rule": "ssn", "field": "fhir.outcomeDesc"}]);
        let view = to_audit_event(&stored);
        let redacted =
            json!({"system": REDACTED_SYSTEM, "code": "REDACTED", "display": "redacted"});
        assert_eq!(view["meta"]["security"], json!([htest, redacted]));
        assert_eq!(
            view["extension"],
            json!([other, {"url": REDACTION_EXTENSION, "extension": [
                {"url": "rule", "valueCode": "ssn"}, {"url": "field", "valueString": "fhir.outcomeDesc"}]}])
        );
        // A native event is labelled the same way.
        let native = json!({"id": "e-1", "action": "patient.read", "outcome": "success",
            "recorded_at": "2026-11-22T10:15:00.123Z",
            "redactions": [{"rule": "email", "field": "context.note"}]});
        let view = to_audit_event(&native);
        assert_eq!(view["meta"]["security"], json!([redacted]));
        assert_eq!(view["extension"][0]["extension"][1]["valueString"], "context.note");
    }

    fn has_patient_ref(r: &Value) -> bool {
        r.to_string().contains("\"Patient/")
    }

    #[test]
    fn a_read_maps_onto_the_native_fields() {
        let (m, issues) = to_canonical(&example("auditBasicReadServer")).unwrap();
        assert_eq!(issues, vec![]);
        let native: Value = Value::Object(m.into_iter().filter(|(k, _)| k != "fhir").collect());
        assert_eq!(
            native,
            json!({
                "occurred_at": "2020-04-29T09:49:00.000Z",
                "outcome": "success", "outcome_code": 0,
                "category": "phi_access", "action": "fhir.read",
                // The requestor has no network address, and the Source Role agent's is a URL.
                "actor": {"name": "John Smith", "roles": ["IRCP"]},
                "source": {"system": "Device/ex-device", "site": "server.example.com", "type": "4"},
                "patient": {"id": "ex-patient"},
                "entities": [
                    {"type": "List", "id": "ex-list", "role": "4"},
                    {"type": "XrequestId", "id": "76d148b6-586d-11ec-bf63-0242ac130002"},
                ],
            })
        );
    }

    #[test]
    fn a_denied_consent_is_a_failure_with_its_description() {
        let (m, _) = to_canonical(&example("auditAuthZconsent-deny")).unwrap();
        assert_eq!(m["outcome"], "failure");
        assert_eq!(m["outcome_code"], 8);
        assert_eq!(m["outcome_desc"], "Consent denied access to this user");
        assert_eq!(m["action"], "fhir.authz-consent");
        // An authorization decision is a security event even when it names the patient.
        assert_eq!(m["category"], "security");
        assert_eq!(m["actor"]["user_id"], "Practitioner/ex-practitioner");
        assert_eq!(m["purpose_of_use"], "PATRQT");
        let (m, _) = to_canonical(&example("auditPrivacyDisclosure-source")).unwrap();
        assert_eq!(m["action"], "fhir.disclose");
        assert_eq!(m["purpose_of_use"], "PATRQT");
    }

    #[test]
    fn index_terms_of_balp_examples() {
        let t = terms(&stored_from(&example("auditBasicReadServer")));
        for (param, term) in [
            ("patient", "Patient/ex-patient"),
            ("patient", "ex-patient"),
            ("entity", "Patient/ex-patient"),
            ("entity", "List/ex-list"),
            ("entity", "76d148b6-586d-11ec-bf63-0242ac130002"),
            ("entity.identifier", "|76d148b6-586d-11ec-bf63-0242ac130002"),
            (
                "entity-type",
                "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType|XrequestId",
            ),
            ("entity-role", "http://terminology.hl7.org/CodeSystem/object-role|1"),
            ("entity-role", "4"),
            ("agent", "Device/ex-device"),
            ("agent", "ex-device"),
            ("agent-name", "john smith"),
            ("agent-name", "smith"),
            ("agent-name", "=John Smith"),
            ("agent-role", "IRCP"),
            ("agent-role", "http://dicom.nema.org/resources/ontology/DCM|110153"),
            ("address", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
            ("address", "http://server.example.com/fhir"),
            ("type", "rest"),
            ("type", "http://terminology.hl7.org/CodeSystem/audit-event-type|rest"),
            ("type", "http://terminology.hl7.org/CodeSystem/audit-event-type|"),
            ("subtype", "http://hl7.org/fhir/restful-interaction|read"),
            ("action", "R"),
            ("action", "http://hl7.org/fhir/audit-event-action|R"),
            ("outcome", "0"),
            ("source", "Device/ex-device"),
            ("site", "server.example.com"),
        ] {
            assert!(has(&t, param, term), "{param}={term} missing from {t:#?}");
        }
        assert!(!t.iter().any(|(p, _)| *p == "date"));
        assert!(!has(&t, "patient", "List/ex-list"));

        let t = terms(&stored_from(&example("auditAuthZconsent-deny")));
        for (param, term) in [
            ("outcome", "8"),
            ("agent", "Practitioner/ex-practitioner"),
            ("agent", "Organization/ex-organization"),
            ("entity", "Consent/ex-consent"),
            ("subtype", "AuthZ-Consent"),
            ("type", "http://dicom.nema.org/resources/ontology/DCM|110113"),
            ("action", "E"),
            ("patient", "Patient/ex-patient"),
        ] {
            assert!(has(&t, param, term), "{param}={term} missing");
        }
    }

    #[test]
    fn every_search_the_parser_builds_for_an_example_finds_it() {
        let stored = stored_from(&example("auditBasicReadServer"));
        let t = terms(&stored);
        for query in [
            "patient=ex-patient",
            "patient=Patient/ex-patient",
            "patient=http://server.example.com/fhir/Patient/ex-patient",
            "patient:Patient=ex-patient",
            "patient=Patient/ex-patient/_history/3",
            "entity=List/ex-list,Nope/1",
            "entity:identifier=76d148b6-586d-11ec-bf63-0242ac130002",
            "agent=Device/ex-device",
            "agent-name=John",
            "agent-name=JOHN  SMITH",
            "agent-name:exact=John Smith",
            "agent-role=http://terminology.hl7.org/CodeSystem/v3-ParticipationType|IRCP",
            "address=2001:0DB8:85a3:0000:0000:8a2e:0370:7334",
            "type=rest",
            "subtype=read",
            "subtype=http://hl7.org/fhir/restful-interaction|",
            "action=R",
            "outcome=0",
            "outcome=http://hl7.org/fhir/audit-event-outcome|0",
            "source=Device/ex-device",
            "site=server.example.com",
            "entity-role=1",
            "entity-type=http://terminology.hl7.org/CodeSystem/audit-entity-type|2",
        ] {
            let s = parse_search(&pairs(query)).unwrap_or_else(|e| panic!("{query}: {e:?}"));
            for any in &s.all_of {
                assert!(
                    any.values.iter().any(|v| t.contains(&(any.param.name(), v.clone()))),
                    "{query} does not find the example: {:?}",
                    any.values
                );
            }
        }
        for query in [
            "patient=other",
            "agent-name=jo",
            "outcome=8",
            "site=Server.example.com",
            "agent-name:exact=john smith",
        ] {
            let s = parse_search(&pairs(query)).unwrap();
            let any = &s.all_of[0];
            assert!(
                !any.values.iter().any(|v| t.contains(&(any.param.name(), v.clone()))),
                "{query}"
            );
        }
    }

    fn pairs(query: &str) -> Vec<(String, String)> {
        query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// One table helper: the query's `all_of` as `(param, values)` or the error codes.
    fn check(query: &str, expect: Result<&[(&str, &[&str])], &[&str]>) {
        let got = parse_search(&pairs(query));
        match (got, expect) {
            (Ok(s), Ok(want)) => {
                let got: Vec<(&str, Vec<String>)> =
                    s.all_of.iter().map(|a| (a.param.name(), a.values.clone())).collect();
                let want: Vec<(&str, Vec<String>)> = want
                    .iter()
                    .map(|(p, vs)| (*p, vs.iter().map(|v| v.to_string()).collect()))
                    .collect();
                assert_eq!(got, want, "{query}");
            }
            (Err(issues), Err(codes)) => {
                let got: Vec<&str> = issues.iter().map(|i| i.code).collect();
                assert_eq!(got, codes, "{query}: {issues:?}");
                assert!(issues.iter().all(|i| i.is_error() && i.expression.is_some()), "{query}");
            }
            (got, _) => panic!("{query}: got {got:?}"),
        }
    }

    #[test]
    fn parse_search_table() {
        check("", Ok(&[]));
        check("patient=123", Ok(&[("patient", &["123"])]));
        check("patient=123,Patient/9", Ok(&[("patient", &["123", "Patient/9"])]));
        check("patient=1&patient=2", Ok(&[("patient", &["1"]), ("patient", &["2"])]));
        check("patient:Patient=123", Ok(&[("patient", &["Patient/123"])]));
        check("patient:Patient=Group/1", Err(&["value"]));
        check(
            "patient.identifier=urn:oid:1.2|MRN1",
            Ok(&[("patient.identifier", &["urn:oid:1.2|MRN1"])]),
        );
        check("patient:identifier=|MRN1", Ok(&[("patient.identifier", &["|MRN1"])]));
        check("agent=https://x.org/fhir/Practitioner/p1", Ok(&[("agent", &["Practitioner/p1"])]));
        check("agent=urn:uuid:1234", Ok(&[("agent", &["urn:uuid:1234"])]));
        check("type=sys|code,|bare,sys|", Ok(&[("type", &["sys|code", "|bare", "sys|"])]));
        check(r"type=a\,b,c\|d", Ok(&[("type", &["a,b", "c|d"])]));
        check("type=a|b|c", Err(&["value"]));
        check("type=|", Err(&["value"]));
        check("agent-name=Élodie ", Ok(&[("agent-name", &["elodie"])]));
        check("agent-name=Dr. Ángel O'Brien", Ok(&[("agent-name", &["dr angel o brien"])]));
        check("agent-name=...", Err(&["value"]));
        check("entity-name:exact=Chart 7", Ok(&[("entity-name", &["=Chart 7"])]));
        check("address=10.0.0.1", Ok(&[("address", &["10.0.0.1"])]));
        check("policy=http://p.org/x", Ok(&[("policy", &["http://p.org/x"])]));
        check("patient=", Ok(&[]));
        check("_format=json&_pretty=true", Ok(&[]));
        check("colour=red", Err(&["not-supported"]));
        check("patient.name=x", Err(&["not-supported"]));
        check("type:not=rest", Err(&["not-supported"]));
        check("agent-name:contains=mit", Err(&["not-supported"]));
        check("patient:missing=true", Err(&["not-supported"]));
        check("_summary=count&_count=x", Err(&["not-supported", "value"]));
        check("_sort=outcome", Err(&["value"]));
        check("_cursor=a&_page=b", Err(&["invalid"]));
        check(r"type=a\q", Err(&["value"]));
    }

    #[test]
    fn result_controls() {
        let s = parse_search(&pairs("")).unwrap();
        assert_eq!((s.count, s.sort, s.cursor), (50, Sort::LastUpdatedDesc, None));
        let s = parse_search(&pairs("_count=0&_sort=-date&_cursor=opaque==")).unwrap();
        assert_eq!((s.count, s.sort, s.cursor.as_deref()), (0, Sort::DateDesc, Some("opaque==")));
        assert_eq!(parse_search(&pairs("_count=5000")).unwrap().count, 1000);
        assert_eq!(parse_search(&pairs("_sort=_lastUpdated")).unwrap().sort, Sort::LastUpdatedAsc);
        assert_eq!(parse_search(&pairs("_count=-1")).unwrap_err()[0].code, "value");
        let s = parse_search(&pairs("_id=a,b&_id=c")).unwrap();
        assert_eq!(s.ids, vec![vec!["a".to_string(), "b".into()], vec!["c".to_string()]]);
        let many = "patient=1&".repeat(PARAMS_MAX + 1);
        assert_eq!(parse_search(&pairs(&many)).unwrap_err()[0].code, "too-costly");
        let wide = format!("patient={}", vec!["1"; VALUES_MAX + 1].join(","));
        assert_eq!(parse_search(&pairs(&wide)).unwrap_err()[0].code, "value");
    }

    fn bound(v: &str) -> Result<(i64, i64), String> {
        parse_date_bound(v).map(|b| (b.lo_ms, b.hi_ms))
    }

    fn ms(s: &str) -> i64 {
        parse_rfc3339(s).unwrap()
    }

    #[test]
    fn date_prefixes_and_precision() {
        let y2020 = ms("2020-01-01T00:00:00Z");
        let y2021 = ms("2021-01-01T00:00:00Z");
        assert_eq!(bound("2020"), Ok((y2020, y2021)));
        assert_eq!(bound("eq2020"), Ok((y2020, y2021)));
        assert_eq!(bound("ge2020"), Ok((y2020, i64::MAX)));
        assert_eq!(bound("gt2020"), Ok((y2021, i64::MAX)));
        assert_eq!(bound("sa2020"), Ok((y2021, i64::MAX)));
        assert_eq!(bound("le2020"), Ok((i64::MIN, y2021)));
        assert_eq!(bound("lt2020"), Ok((i64::MIN, y2020)));
        assert_eq!(bound("eb2020"), Ok((i64::MIN, y2020)));
        assert_eq!(bound("2020-12"), Ok((ms("2020-12-01T00:00:00Z"), y2021)));
        assert_eq!(bound("2020-02"), Ok((ms("2020-02-01T00:00:00Z"), ms("2020-03-01T00:00:00Z"))));
        assert_eq!(
            bound("2020-02-29"),
            Ok((ms("2020-02-29T00:00:00Z"), ms("2020-03-01T00:00:00Z")))
        );
        let t = ms("2020-04-29T09:49:00Z");
        assert_eq!(bound("2020-04-29T09:49Z"), Ok((t, t + 60_000)));
        assert_eq!(bound("2020-04-29T09:49:00Z"), Ok((t, t + 1000)));
        assert_eq!(bound("2020-04-29T09:49:00.5Z"), Ok((t + 500, t + 600)));
        assert_eq!(bound("2020-04-29T09:49:00.123456Z"), Ok((t + 123, t + 124)));
        assert_eq!(bound("2020-04-29T11:49:00+02:00"), Ok((t, t + 1000)));
        assert_eq!(bound("2020-04-29T09:49:00"), Ok((t, t + 1000)), "no zone reads as UTC");
        assert_eq!(bound("2020-04-29T05:49:00-04:00"), Ok((t, t + 1000)));
        assert_eq!(bound("1960"), Ok((-3653 * 86_400_000, -3287 * 86_400_000)), "before the epoch");
        assert!(bound("9999").unwrap().1 > bound("9999").unwrap().0);
        for bad in [
            "2021-02-29",
            "2020-13",
            "2020-00-01",
            "20201",
            "2020-1-1",
            "0000",
            "ne2020",
            "ap2020",
            "xx2020",
            "2020-04-29T24:00Z",
            "2020-04-29T09:60Z",
            "2020-04-29T09:49:00.Z",
            "2020-04-29 09:49Z",
            "2020-04-29T09:49:00+2:00",
            "2020-04-29T09:49:00+15:00",
            "gt",
            "",
            "é2020",
            "2020-04-29T09",
        ] {
            assert!(bound(bad).is_err(), "{bad} was accepted: {:?}", bound(bad));
        }
        // The bound is half-open: the last millisecond of a day is in it, midnight after is not.
        let day = parse_date_bound("2020-04-29").unwrap();
        assert!(day.contains(ms("2020-04-29T23:59:59.999Z")));
        assert!(!day.contains(ms("2020-04-30T00:00:00Z")));
        let s = parse_search(&pairs("date=ge2020&date=lt2021&_lastUpdated=gt2026-11-22T10:00Z"))
            .unwrap();
        assert_eq!(
            s.date,
            vec![
                DateBound { lo_ms: y2020, hi_ms: i64::MAX },
                DateBound { lo_ms: i64::MIN, hi_ms: y2021 }
            ]
        );
        assert_eq!(s.last_updated.len(), 1);
        check("date=2020,2021", Err(&["not-supported"]));
        check("date=ne2020", Err(&["value"]));
        check("date:missing=true", Err(&["not-supported"]));
    }

    fn native_example() -> Value {
        json!({"id": "0190f3a2-7c4e-7b1a-8f00-000000000002", "seq": 3,
         "recorded_at": "2026-11-22T10:15:00.123Z",
         "occurred_at": "2026-11-22T11:15:00+01:00", "category": "phi_access", "action": "patient.read", "outcome": "success",
         "actor": {"user_id": "u123", "name": "Dr. Zoë Ångström", "roles": ["physician", "on call"], "ip": "10.1.2.3",
                   "session_id": "s", "client_id": "ehr-web"},
         "source": {"system": "ehr", "site": "main-campus", "type": "app"},
         "patient": {"id": "MRN00012345", "system": "urn:oid:2.16.840.1.113883.3.0"},
         "entities": [{"type": "Observation", "id": "123", "role": "domain", "name": "Blood pressure"},
                      {"type": "report", "id": "r 1", "system": "urn:x"}],
         "request": {"method": "GET", "path": "/api/patients/123", "status": 200},
         "purpose_of_use": ["TREAT", "ETREAT"], "project": "default",
         "context": {"reason": "chart review"}})
    }

    #[test]
    fn a_native_event_reads_as_an_r4_audit_event() {
        let r = to_audit_event(&native_example());
        assert_eq!(r["resourceType"], "AuditEvent");
        assert_eq!(r["id"], "0190f3a2-7c4e-7b1a-8f00-000000000002");
        assert_eq!(r["meta"]["lastUpdated"], "2026-11-22T10:15:00.123Z");
        assert_eq!(r["recorded"], "2026-11-22T10:15:00.000Z");
        assert_eq!(r["type"], json!({"system": CATEGORY_SYSTEM, "code": "phi_access"}));
        assert_eq!(r["subtype"][0]["code"], "patient.read");
        assert_eq!((r["action"].as_str(), r["outcome"].as_str()), (Some("R"), Some("0")));
        assert_eq!(r["agent"][0]["requestor"], true);
        assert_eq!(r["agent"][0]["who"]["identifier"]["value"], "u123");
        assert_eq!(r["agent"][0]["network"], json!({"address": "10.1.2.3", "type": "2"}));
        assert_eq!(r["agent"][1]["who"]["identifier"]["value"], "ehr-web");
        assert_eq!(r["source"]["observer"]["display"], "ehr");
        assert_eq!(r["entity"][0]["what"]["reference"], "Patient/MRN00012345");
        assert_eq!(r["entity"][0]["what"]["identifier"]["system"], "urn:oid:2.16.840.1.113883.3.0");
        assert_eq!(r["entity"][1]["what"]["reference"], "Observation/123");
        assert_eq!(
            r["entity"][2]["what"]["identifier"],
            json!({"system": "urn:x", "value": "r 1"})
        );
        assert_eq!(r["agent"][0]["role"][1]["coding"][0]["code"], "on call");
        assert_eq!(r["purposeOfEvent"].as_array().unwrap().len(), 2);
        assert_required_r4(&r);

        // The least a stored event can be still gives every element R4 requires.
        let min = to_audit_event(
            &json!({"id": "has spaces", "seq": 1, "recorded_at": "2026-11-22T10:15:00.123Z",
            "action": "login.failure", "outcome": "failure"}),
        );
        assert_required_r4(&min);
        assert_eq!(min.get("id"), None, "not a FHIR id");
        assert_eq!((min["outcome"].as_str(), min["action"].as_str()), (Some("8"), Some("E")));
        assert_eq!(min["recorded"], "2026-11-22T10:15:00.123Z");

        // Strings of spaces are valid natively but not in FHIR: they are left out.
        let blank = to_audit_event(
            &json!({"id": "b", "recorded_at": "2026-11-22T10:15:00.123Z", "category": " ",
            "action": "x", "outcome": "success", "actor": {"roles": [" "], "name": " "}, "entities": [{"type": " ", "id": "1"}]}),
        );
        assert_required_r4(&blank);
        assert_eq!(blank["type"]["code"], "unspecified");
        assert_eq!(blank.get("entity"), None);
    }

    fn assert_required_r4(r: &Value) {
        assert!(r["type"]["code"].is_string(), "{r}");
        assert!(parse_rfc3339(r["recorded"].as_str().unwrap()).is_some(), "{r}");
        assert!(r["source"]["observer"].is_object(), "{r}");
        let agents = r["agent"].as_array().unwrap();
        assert!(!agents.is_empty() && agents.iter().all(|a| a["requestor"].is_boolean()), "{r}");
        let issues = to_canonical(r).unwrap().1;
        assert!(issues.iter().all(|i| i.code != "structure" && i.code != "required"), "{issues:?}");
    }

    #[test]
    fn native_terms_equal_the_terms_of_the_fhir_view() {
        let mut plain = native_example();
        plain["actor"] = json!({"user_id": "u9"});
        let bare = json!({"id": "x", "seq": 1, "recorded_at": "2026-11-22T10:15:00.123Z", "action": "mfa.disable", "outcome": "failure", "outcome_code": 4});
        for e in [native_example(), plain, bare] {
            let native = terms(&e);
            let view = terms(&json!({"fhir": to_audit_event(&e)}));
            assert_eq!(native, view, "{e}");
        }
        let t = terms(&native_example());
        for (param, term) in [
            ("patient", "MRN00012345"),
            ("patient", "Patient/MRN00012345"),
            ("patient.identifier", "urn:oid:2.16.840.1.113883.3.0|MRN00012345"),
            ("agent", "u123"),
            ("agent", "ehr-web"),
            ("agent-name", "dr zoe angstrom"),
            ("agent-name", "zoe"),
            ("agent-role", "urn:auditrail:role|on call"),
            ("address", "10.1.2.3"),
            ("source", "ehr"),
            ("site", "main-campus"),
            ("type", "urn:auditrail:category|phi_access"),
            ("subtype", "patient.read"),
            ("action", "R"),
            ("outcome", "0"),
            ("entity", "Observation/123"),
            ("entity", "r 1"),
            ("entity.identifier", "urn:x|r 1"),
            ("entity-name", "blood pressure"),
            ("entity-type", "Observation"),
            ("entity-role", "urn:auditrail:entity-role|domain"),
        ] {
            assert!(has(&t, param, term), "{param}={term} missing from {t:#?}");
        }
    }

    #[test]
    fn a_received_resource_is_served_as_received() {
        let r = example("auditBasicReadServer");
        let stored = stored_from(&r);
        let view = to_audit_event(&stored);
        assert_eq!(view["id"], "0190f3a2-7c4e-7b1a-8f00-000000000001");
        assert_eq!(view["meta"]["lastUpdated"], "2026-11-22T10:15:00.123Z");
        assert_eq!(view["meta"]["profile"], r["meta"]["profile"]);
        let mut back = view.clone();
        back["id"] = r["id"].clone();
        back["meta"].as_object_mut().unwrap().remove("lastUpdated");
        assert_eq!(back, r);
    }

    #[test]
    fn non_conformance_warns_and_wrong_json_types_fail() {
        let (m, issues) = to_canonical(&json!({"resourceType": "AuditEvent"})).unwrap();
        let codes: BTreeSet<&str> = issues.iter().map(|i| i.code).collect();
        assert!(issues.iter().all(|i| i.severity == Severity::Warning));
        assert_eq!(codes, ["required"].into_iter().collect());
        assert_eq!(
            (m["outcome"].as_str(), m["action"].as_str()),
            (Some("success"), Some("fhir.event"))
        );
        assert!(ClientEvent::validate(Value::Object(m)).is_ok());

        let (m, issues) = to_canonical(&json!({"resourceType": "AuditEvent", "recorded": "2020-04-29",
            "outcome": "3", "action": "X", "colour": 1, "modifierExtension": [],
            "subtype": [{"code": "Ünïcode / Thing!!"}],
            "agent": [{"requestor": false, "who": {"display": "x".repeat(2000)}, "network": {"address": "host.example"}}],
            "source": {"observer": {"display": "obs"}}})).unwrap();
        assert_eq!(m["outcome"], "failure");
        assert_eq!(m.get("outcome_code"), None);
        assert_eq!(m.get("occurred_at"), None);
        assert_eq!(m["action"], "fhir.unicode-thing");
        assert_eq!(m["actor"]["name"].as_str().unwrap().len(), FIELD_BYTES_MAX);
        assert_eq!(m["actor"].get("ip"), None);
        let at: BTreeSet<&str> = issues.iter().filter_map(|i| i.expression.as_deref()).collect();
        for path in [
            "AuditEvent.recorded",
            "AuditEvent.outcome",
            "AuditEvent.action",
            "AuditEvent.colour",
            "AuditEvent.modifierExtension",
            "AuditEvent.agent[0].name",
        ] {
            assert!(at.contains(path), "{path} not in {at:?}");
        }
        assert!(ClientEvent::validate(Value::Object(m)).is_ok());

        for (bad, path) in [
            (json!({"resourceType": "AuditEvent", "recorded": 5}), "AuditEvent.recorded"),
            (
                json!({"resourceType": "AuditEvent", "agent": {"requestor": true}}),
                "AuditEvent.agent",
            ),
            (
                json!({"resourceType": "AuditEvent", "agent": [{"requestor": "yes"}]}),
                "AuditEvent.agent[0].requestor",
            ),
            (json!({"resourceType": "AuditEvent", "type": [{"code": "rest"}]}), "AuditEvent.type"),
            (
                json!({"resourceType": "AuditEvent", "entity": [{"what": {"reference": null}}]}),
                "AuditEvent.entity[0].what.reference",
            ),
        ] {
            let errs = to_canonical(&bad).unwrap_err();
            assert!(
                errs.iter().any(|i| i.is_error() && i.expression.as_deref() == Some(path)),
                "{bad}: {errs:?}"
            );
        }
        assert_eq!(to_canonical(&json!([1])).unwrap_err()[0].code, "structure");
        assert_eq!(
            to_canonical(&json!({"resourceType": "Patient"})).unwrap_err()[0].code,
            "invalid"
        );
    }

    #[test]
    fn long_and_many_values_are_cut_to_the_native_limits() {
        let entities: Vec<Value> =
            (0..70).map(|i| json!({"what": {"reference": format!("Observation/{i}")}})).collect();
        let roles: Vec<Value> =
            (0..40).map(|i| json!({"coding": [{"code": format!("r{i}")}]})).collect();
        let r = json!({"resourceType": "AuditEvent", "recorded": "2020-04-29T09:49:00Z", "outcome": "0",
            "type": {"code": "rest"}, "source": {"observer": {"reference": format!("Device/{}", "d".repeat(300))}},
            "agent": [{"requestor": true, "role": roles, "who": {"identifier": {"value": "u1"}}}],
            "entity": entities});
        let (m, issues) = to_canonical(&r).unwrap();
        assert_eq!(m["entities"].as_array().unwrap().len(), ENTITIES_MAX);
        assert_eq!(m["actor"]["roles"].as_array().unwrap().len(), ROLES_MAX);
        assert_eq!(m["source"]["system"].as_str().unwrap().len(), 256);
        assert_eq!(issues.iter().filter(|i| i.code == "too-long").count(), 3, "{issues:?}");
        assert!(ClientEvent::validate(Value::Object(m)).is_ok());
    }

    #[test]
    fn operation_outcome_is_r4() {
        let oo = operation_outcome(&[Issue::error(
            "not-supported",
            "colour is not a parameter",
            "colour",
        )]);
        assert_eq!(
            oo,
            json!({"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-supported",
                "diagnostics": "colour is not a parameter", "expression": ["colour"]}]})
        );
        assert_eq!(operation_outcome(&[])["issue"][0]["severity"], "information");
    }

    #[test]
    fn search_params_round_trip_and_are_declared() {
        assert_eq!(SearchParam::all().count(), 22);
        for p in SearchParam::all() {
            assert_eq!(SearchParam::from_name(p.name()), Some(p));
        }
        assert_eq!(SearchParam::from_name("Patient"), None);
        let cs = capability_statement("https://audit.example.org/fhir", "0.1.0");
        let params = cs["rest"][0]["resource"][0]["searchParam"].as_array().unwrap();
        assert_eq!(params.len(), 22 + 4);
        let defined = params.iter().filter(|p| p.get("definition").is_some()).count();
        assert_eq!(defined, 18 + 2);
        assert_eq!(cs["instantiates"][0], BALP_ARR_CAPABILITY);
        assert_eq!(cs["implementation"]["url"], "https://audit.example.org/fhir");
    }

    /// Every R4 search parameter in the shared corpus is one of ours, with the same type.
    #[test]
    fn search_params_match_the_r4_definitions() {
        let path = corpus_dir().join("../fhir-r4/AuditEvent-SearchParameters.json");
        let bundle: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 18);
        for e in entries {
            let sp = &e["resource"];
            let p = SearchParam::from_name(sp["code"].as_str().unwrap()).unwrap();
            assert_eq!(param_type_code(p.kind()), sp["type"]);
            assert_eq!(p.definition().as_deref(), sp["url"].as_str());
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-zA-Z0-9 /|:.é-]{0,12}".prop_map(Value::from),
            Just(Value::from("Patient/1")),
            Just(Value::from("2020-01-01T00:00:00Z")),
            Just(Value::from("0")),
        ];
        let keys = prop_oneof![
            Just("reference".to_string()),
            Just("code".to_string()),
            Just("system".to_string()),
            Just("coding".to_string()),
            Just("who".to_string()),
            Just("what".to_string()),
            Just("requestor".to_string()),
            Just("identifier".to_string()),
            Just("value".to_string()),
            Just("role".to_string()),
            Just("type".to_string()),
            Just("name".to_string()),
            "[a-z]{1,4}",
        ];
        leaf.prop_recursive(4, 40, 5, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(keys.clone(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Nothing panics, and whatever is accepted is a valid native event.
        #[test]
        fn any_input_maps_without_panicking(
            body in proptest::collection::btree_map(
                proptest::prop_oneof![
                    proptest::strategy::Just("agent".to_string()), proptest::strategy::Just("entity".to_string()),
                    proptest::strategy::Just("source".to_string()), proptest::strategy::Just("type".to_string()),
                    proptest::strategy::Just("subtype".to_string()), proptest::strategy::Just("recorded".to_string()),
                    proptest::strategy::Just("outcome".to_string()), proptest::strategy::Just("action".to_string()),
                ],
                arb_json(), 0..8),
            query in proptest::collection::vec(("[a-z_.:-]{0,12}", "\\PC{0,16}"), 0..4),
        ) {
            let mut r: Map<String, Value> = body.into_iter().collect();
            r.insert("resourceType".into(), "AuditEvent".into());
            let r = Value::Object(r);
            if let Ok((m, _)) = to_canonical(&r) {
                let stored = Value::Object(m.clone());
                proptest::prop_assert!(ClientEvent::validate(stored.clone()).is_ok(), "{:?}", m);
                terms(&stored);
                to_audit_event(&stored);
            }
            terms(&r);
            to_audit_event(&r);
            let _ = parse_search(&query);
        }
    }
}
