//! The canonical event: validation of what clients send, the server-assigned fields, and the
//! canonical (RFC 8785) bytes that commitments are computed over.
//!
//! The schema is written down as JSON Schema in `schema/event.schema.json`; this module is its
//! executable form, and a test checks that both accept and reject the same fixtures.

use crate::limits::*;
use crate::privacy::Redactions;
use crate::time::{UnixMillis, parse_rfc3339};
use serde_json::{Map, Value};
use std::net::IpAddr;

/// One problem with one field, named by its JSON path (`actor.ip`, `entities[2].type`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FieldError {
    pub field: String,
    /// A stable machine-readable code: `required`, `unknown_field`, `wrong_type`, `too_long`,
    /// `too_many`, `invalid_format`, `invalid_value`, `server_assigned`, `too_large`.
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.field.is_empty() {
            write!(f, "{} ({})", self.message, self.code)
        } else {
            write!(f, "{}: {} ({})", self.field, self.message, self.code)
        }
    }
}

/// The problems found in one event, in document order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid event: {}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
pub struct InvalidEvent(pub Vec<FieldError>);

/// An event that passed validation, as the client sent it (minus nothing, plus nothing).
#[derive(Debug, Clone, PartialEq)]
pub struct ClientEvent {
    fields: Map<String, Value>,
}

/// Fields the server assigns; a client may send `id` but never these. `redactions` is the
/// privacy filter's record of what it masked (`crate::privacy`).
pub const SERVER_FIELDS: [&str; 3] = ["seq", "recorded_at", "redactions"];

struct Checker {
    errors: Vec<FieldError>,
}

impl Checker {
    fn err(&mut self, field: &str, code: &'static str, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.to_string(), code, message: message.into() });
    }

    /// Checks a bounded, non-empty string. The path is built only when there is a problem, so
    /// valid events cost no allocation here.
    fn string<'v>(
        &mut self,
        path: impl FnOnce() -> String,
        v: &'v Value,
        max: usize,
    ) -> Option<&'v str> {
        let problem = match v {
            Value::String(s) if s.is_empty() => ("invalid_value", "must not be empty".to_string()),
            Value::String(s) if s.len() > max => {
                ("too_long", format!("must be at most {max} bytes"))
            }
            Value::String(s) => return Some(s),
            _ => ("wrong_type", "must be a string".to_string()),
        };
        self.err(&path(), problem.0, problem.1);
        None
    }

    fn object<'v>(
        &mut self,
        path: &str,
        v: &'v Value,
        allowed: &[&str],
    ) -> Option<&'v Map<String, Value>> {
        let Value::Object(m) = v else {
            self.err(path, "wrong_type", "must be an object");
            return None;
        };
        for k in m.keys() {
            if !allowed.contains(&k.as_str()) {
                self.err(&join(path, k), "unknown_field", format!("is not a field of {path}"));
            }
        }
        Some(m)
    }

    /// Checks that each present member of `m` named in `strings` is a bounded string.
    fn strings(&mut self, path: &str, m: &Map<String, Value>, strings: &[(&str, usize)]) {
        for (name, max) in strings {
            if let Some(v) = m.get(*name) {
                self.string(|| join(path, name), v, *max);
            }
        }
    }

    fn array<'v>(&mut self, path: &str, v: &'v Value, max: usize) -> Option<&'v Vec<Value>> {
        match v {
            Value::Array(a) if a.len() > max => {
                self.err(path, "too_many", format!("must have at most {max} items"));
                None
            }
            Value::Array(a) => Some(a),
            _ => {
                self.err(path, "wrong_type", "must be an array");
                None
            }
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() { name.to_string() } else { format!("{path}.{name}") }
}

fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// `patient.read`, `login.failure`, `fhir.auditevent.create`: lowercase dotted words.
fn valid_action(s: &str) -> bool {
    !s.starts_with('.')
        && !s.ends_with('.')
        && !s.contains("..")
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

const TOP_LEVEL: &[&str] = &[
    "id",
    "occurred_at",
    "category",
    "action",
    "outcome",
    "outcome_code",
    "outcome_desc",
    "actor",
    "source",
    "patient",
    "entities",
    "request",
    "purpose_of_use",
    "project",
    "changes",
    "context",
    "fhir",
    "seq",
    "recorded_at",
    "redactions",
];

impl ClientEvent {
    /// Validates one event as a client sent it.
    pub fn validate(value: Value) -> Result<ClientEvent, InvalidEvent> {
        let mut c = Checker { errors: Vec::new() };
        let Value::Object(fields) = value else {
            return Err(InvalidEvent(vec![FieldError {
                field: String::new(),
                code: "wrong_type",
                message: "an event must be a JSON object".into(),
            }]));
        };
        for k in fields.keys() {
            if SERVER_FIELDS.contains(&k.as_str()) {
                c.err(k, "server_assigned", "is assigned by the server and must not be sent");
            } else if !TOP_LEVEL.contains(&k.as_str()) {
                c.err(k, "unknown_field", "is not a field of an event");
            }
        }
        for required in ["action", "outcome"] {
            if !fields.contains_key(required) {
                c.err(required, "required", "is required");
            }
        }
        c.strings(
            "",
            &fields,
            &[("id", 128), ("category", 64), ("outcome_desc", FIELD_BYTES_MAX), ("project", 128)],
        );
        if let Some(id) = fields.get("id").and_then(Value::as_str)
            && id.chars().any(char::is_control)
        {
            c.err("id", "invalid_format", "must not contain control characters");
        }
        if let Some(v) = fields.get("occurred_at")
            && let Some(s) = c.string(|| "occurred_at".into(), v, 64)
            && parse_rfc3339(s).is_none()
        {
            c.err(
                "occurred_at",
                "invalid_format",
                "must be an RFC 3339 date-time such as 2026-11-22T10:15:00Z",
            );
        }
        if let Some(v) = fields.get("action")
            && let Some(s) = c.string(|| "action".into(), v, 128)
            && !valid_action(s)
        {
            c.err(
                "action",
                "invalid_format",
                "must be lowercase dotted words such as patient.read",
            );
        }
        let mut success = None;
        if let Some(v) = fields.get("outcome")
            && let Some(s) = c.string(|| "outcome".into(), v, 16)
        {
            match s {
                "success" => success = Some(true),
                "failure" => success = Some(false),
                _ => c.err("outcome", "invalid_value", "must be \"success\" or \"failure\""),
            }
        }
        if let Some(v) = fields.get("outcome_code") {
            match (v.as_u64(), success) {
                (Some(0), Some(false)) | (Some(4 | 8 | 12), Some(true)) => c.err(
                    "outcome_code",
                    "invalid_value",
                    "must be 0 for success and 4, 8 or 12 for failure",
                ),
                (Some(0 | 4 | 8 | 12), _) => {}
                _ => c.err(
                    "outcome_code",
                    "invalid_value",
                    "must be a FHIR outcome code: 0, 4, 8 or 12",
                ),
            }
        }
        if let Some(v) = fields.get("actor")
            && let Some(m) = c.object(
                "actor",
                v,
                &[
                    "user_id",
                    "name",
                    "roles",
                    "client_id",
                    "session_id",
                    "ip",
                    "user_agent",
                    "device_id",
                ],
            )
        {
            c.strings(
                "actor",
                m,
                &[
                    ("user_id", FIELD_BYTES_MAX),
                    ("name", FIELD_BYTES_MAX),
                    ("client_id", FIELD_BYTES_MAX),
                    ("session_id", FIELD_BYTES_MAX),
                    ("user_agent", LONG_FIELD_BYTES_MAX),
                    ("device_id", FIELD_BYTES_MAX),
                ],
            );
            if let Some(ip) = m.get("ip")
                && let Some(s) = c.string(|| "actor.ip".into(), ip, 64)
                && s.parse::<IpAddr>().is_err()
            {
                c.err("actor.ip", "invalid_format", "must be an IPv4 or IPv6 address");
            }
            if let Some(roles) = m.get("roles")
                && let Some(a) = c.array("actor.roles", roles, ROLES_MAX)
            {
                for (i, r) in a.iter().enumerate() {
                    c.string(|| format!("actor.roles[{i}]"), r, 128);
                }
            }
        }
        if let Some(v) = fields.get("source")
            && let Some(m) = c.object("source", v, &["system", "site", "type"])
        {
            c.strings("source", m, &[("system", 256), ("site", 256), ("type", 128)]);
        }
        if let Some(v) = fields.get("patient")
            && let Some(m) = c.object("patient", v, &["id", "system"])
        {
            c.strings("patient", m, &[("id", 256), ("system", 256)]);
            if !m.contains_key("id") {
                c.err("patient.id", "required", "is required when patient is given");
            }
        }
        if let Some(v) = fields.get("entities")
            && let Some(a) = c.array("entities", v, ENTITIES_MAX)
        {
            for (i, e) in a.iter().enumerate() {
                let path = format!("entities[{i}]");
                if let Some(m) = c.object(&path, e, &["type", "id", "role", "system", "name"]) {
                    c.strings(
                        &path,
                        m,
                        &[
                            ("type", 128),
                            ("id", 512),
                            ("role", 64),
                            ("system", 256),
                            ("name", FIELD_BYTES_MAX),
                        ],
                    );
                    if !m.contains_key("type") {
                        c.err(&join(&path, "type"), "required", "is required");
                    }
                }
            }
        }
        if let Some(v) = fields.get("request")
            && let Some(m) = c.object("request", v, &["method", "path", "status", "query"])
        {
            c.strings(
                "request",
                m,
                &[("path", LONG_FIELD_BYTES_MAX), ("query", LONG_FIELD_BYTES_MAX)],
            );
            if let Some(method) = m.get("method")
                && let Some(s) = c.string(|| "request.method".into(), method, 16)
                && !s.bytes().all(|b| b.is_ascii_uppercase())
            {
                c.err(
                    "request.method",
                    "invalid_format",
                    "must be an uppercase HTTP method such as GET",
                );
            }
            if let Some(status) = m.get("status")
                && !matches!(status.as_u64(), Some(100..=599))
            {
                c.err("request.status", "invalid_value", "must be an HTTP status code, 100 to 599");
            }
        }
        match fields.get("purpose_of_use") {
            None => {}
            Some(v @ Value::String(_)) => {
                c.string(|| "purpose_of_use".into(), v, 128);
            }
            Some(v @ Value::Array(_)) => {
                if let Some(a) = c.array("purpose_of_use", v, 16) {
                    for (i, p) in a.iter().enumerate() {
                        c.string(|| format!("purpose_of_use[{i}]"), p, 128);
                    }
                }
            }
            Some(_) => {
                c.err("purpose_of_use", "wrong_type", "must be a string or an array of strings")
            }
        }
        if let Some(v) = fields.get("changes")
            && let Some(a) = c.array("changes", v, CHANGES_MAX)
        {
            for (i, ch) in a.iter().enumerate() {
                let path = format!("changes[{i}]");
                if let Some(m) = c.object(&path, ch, &["field", "before", "after"]) {
                    c.strings(&path, m, &[("field", 256)]);
                    if !m.contains_key("field") {
                        c.err(&join(&path, "field"), "required", "is required");
                    }
                    for side in ["before", "after"] {
                        if let Some(val) = m.get(side)
                            && depth(val) > JSON_DEPTH_MAX
                        {
                            c.err(
                                &join(&path, side),
                                "too_deep",
                                format!("must nest at most {JSON_DEPTH_MAX} levels"),
                            );
                        }
                    }
                }
            }
        }
        if let Some(v) = fields.get("context") {
            match v {
                Value::Object(m) if m.len() > CONTEXT_ENTRIES_MAX => c.err(
                    "context",
                    "too_many",
                    format!("must have at most {CONTEXT_ENTRIES_MAX} entries"),
                ),
                Value::Object(m) => {
                    for (k, val) in m {
                        if k.is_empty() || k.len() > 64 {
                            c.err(
                                &format!("context.{k}"),
                                "invalid_format",
                                "keys must be 1 to 64 bytes",
                            );
                        }
                        c.string(|| format!("context.{k}"), val, FIELD_BYTES_MAX);
                    }
                }
                _ => c.err("context", "wrong_type", "must be an object of strings"),
            }
        }
        if let Some(v) = fields.get("fhir")
            && v.get("resourceType").and_then(Value::as_str) != Some("AuditEvent")
        {
            c.err(
                "fhir",
                "invalid_value",
                "must be a FHIR AuditEvent resource (an object with resourceType AuditEvent)",
            );
        }
        if c.errors.is_empty() { Ok(ClientEvent { fields }) } else { Err(InvalidEvent(c.errors)) }
    }

    /// Parses and validates one JSON document.
    pub fn from_json(bytes: &[u8]) -> Result<ClientEvent, InvalidEvent> {
        ClientEvent::validate(parse_json(bytes)?)
    }

    /// The client's idempotency key, if it sent one.
    pub fn id(&self) -> Option<&str> {
        self.fields.get("id").and_then(Value::as_str)
    }

    /// The sending system (`source.system`), which scopes idempotency keys.
    pub fn source_system(&self) -> &str {
        self.fields
            .get("source")
            .and_then(|s| s.get("system"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    /// Records what the privacy filter masked, when it masked anything.
    pub fn with_redactions(mut self, redactions: &Redactions) -> ClientEvent {
        if !redactions.is_empty() {
            self.fields.insert("redactions".into(), redactions.to_json());
        }
        self
    }
}

/// Parses one JSON document of at most [`EVENT_BYTES_MAX`] bytes (not yet validated).
pub fn parse_json(bytes: &[u8]) -> Result<Value, InvalidEvent> {
    if bytes.len() > EVENT_BYTES_MAX {
        return Err(too_large());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        InvalidEvent(vec![FieldError {
            field: String::new(),
            code: "invalid_json",
            message: format!("not valid JSON: {e}"),
        }])
    })
}

fn too_large() -> InvalidEvent {
    InvalidEvent(vec![FieldError {
        field: String::new(),
        code: "too_large",
        message: format!(
            "an event must be at most {EVENT_BYTES_MAX} bytes, in canonical form with the server's fields"
        ),
    }])
}

/// A validated event whose client fields are already in canonical form, so the single writer
/// only splices in the server-assigned fields (`id` when absent, `seq`, `recorded_at`). The
/// expensive part of canonicalisation runs on the caller's thread, in parallel.
///
/// This is exact RFC 8785: top-level keys are from a fixed ASCII set, so sorting them by bytes
/// is sorting them by UTF-16 code units, and the canonical form of an object is its sorted
/// members' canonical forms joined by commas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedEvent {
    /// The client's members in canonical form (`"key":value`), sorted by key, each followed by
    /// a comma: one allocation per event, whichever thread frees it.
    members: Vec<u8>,
    /// Where in `members` each server field ([`SERVER_MEMBERS`]) goes: before the first client
    /// member whose key sorts after it.
    server_at: [u32; SERVER_MEMBERS.len()],
    /// Where the value of the client's `id` member lies in `members`, if it sent one.
    id_value: Option<(u32, u32)>,
    /// The key that makes a retry idempotent: `source.system` and the client's `id`.
    idempotency_key: Option<IdempotencyKey>,
}

/// The members the writer splices in, in key order (`id` only when the client sent none).
const SERVER_MEMBERS: [&str; 3] = ["id", "recorded_at", "seq"];

/// A 128-bit digest of `(source.system, id)`; collisions are resolved by comparing the stored
/// event's fields, so it only needs to be well spread.
pub type IdempotencyKey = u128;

pub fn idempotency_key(source_system: &str, id: &str) -> IdempotencyKey {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"auditrail/idempotency/v1\0");
    h.update(source_system.as_bytes());
    h.update([0]);
    h.update(id.as_bytes());
    u128::from_be_bytes(h.finalize()[..16].try_into().unwrap())
}

impl ClientEvent {
    /// Canonicalises the client's fields; refuses an event whose stored form would exceed
    /// [`EVENT_BYTES_MAX`] once the server's fields are added.
    pub fn prepare(self) -> Result<PreparedEvent, InvalidEvent> {
        let idempotency_key = self.id().map(|id| idempotency_key(self.source_system(), id));
        let mut members = Vec::with_capacity(512);
        let mut server_at = [0u32; SERVER_MEMBERS.len()];
        let mut placed = 0;
        let mut id_value = None;
        // The keys are ASCII (validated against `TOP_LEVEL`), so byte order is RFC 8785's
        // order. A `Map` iterates in it unless some crate turns on serde_json's
        // `preserve_order`, hence the check.
        let mut fields: Vec<(&String, &Value)> = self.fields.iter().collect();
        if !fields.is_sorted_by_key(|f| f.0) {
            fields.sort_unstable_by_key(|f| f.0);
        }
        for (k, v) in fields {
            while placed < SERVER_MEMBERS.len() && SERVER_MEMBERS[placed] < k.as_str() {
                server_at[placed] = members.len() as u32;
                placed += 1;
            }
            members.push(b'"');
            members.extend_from_slice(k.as_bytes());
            members.extend_from_slice(b"\":");
            let value_start = members.len();
            write_canonical(v, &mut members);
            if k == "id" {
                id_value = Some((value_start as u32, members.len() as u32));
            }
            members.push(b',');
        }
        for at in &mut server_at[placed..] {
            *at = members.len() as u32;
        }
        // `{`, the members, `}` in place of the last comma.
        if members.len() + 1 + SERVER_FIELDS_BYTES_MAX > EVENT_BYTES_MAX {
            return Err(too_large());
        }
        Ok(PreparedEvent { members, server_at, id_value, idempotency_key })
    }
}

impl PreparedEvent {
    pub fn idempotency_key(&self) -> Option<IdempotencyKey> {
        self.idempotency_key
    }

    /// The client's `id`, if it sent one.
    pub fn client_id(&self) -> Option<String> {
        let (start, end) = self.id_value?;
        serde_json::from_slice::<String>(&self.members[start as usize..end as usize]).ok()
    }

    /// An upper bound of the stored event's size before the server fields.
    pub fn approx_len(&self) -> usize {
        self.members.len() + 1
    }

    /// The stored event's canonical bytes, written into `out`, with `default_id` used when the
    /// client sent no `id`. Returns the `id` the event is stored under when it was generated.
    pub fn write_stored(
        &self,
        seq: u64,
        recorded_at: UnixMillis,
        default_id: &str,
        out: &mut Vec<u8>,
    ) {
        out.push(b'{');
        let mut from = 0;
        for (field, &at) in SERVER_MEMBERS.iter().zip(&self.server_at) {
            out.extend_from_slice(&self.members[from..at as usize]);
            from = at as usize;
            match *field {
                "id" if self.id_value.is_some() => continue,
                "id" => {
                    out.extend_from_slice(b"\"id\":");
                    serde_json::to_writer(&mut *out, default_id).expect("writing to a Vec");
                }
                "recorded_at" => {
                    out.extend_from_slice(b"\"recorded_at\":\"");
                    write_millis(recorded_at, out);
                    out.push(b'"');
                }
                _ => {
                    out.extend_from_slice(b"\"seq\":");
                    write_decimal(seq, out);
                }
            }
            out.push(b',');
        }
        out.extend_from_slice(&self.members[from..]);
        // `seq` is always written, so there is a trailing comma to close over.
        *out.last_mut().expect("at least one member") = b'}';
    }
}

/// Appends `n` in decimal.
fn write_decimal(n: u64, out: &mut Vec<u8>) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Appends [`crate::time::format_millis`]'s form of `ms` without allocating.
fn write_millis(ms: UnixMillis, out: &mut Vec<u8>) {
    use std::io::Write as _;
    write!(out, "{}", crate::time::Millis(ms)).expect("writing to a Vec");
}

/// RFC 8785 (JCS) canonical bytes of a JSON value.
pub fn canonical_bytes(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out);
    out
}

/// Integers up to 2^53 print the same in ECMAScript and in serde_json; beyond that ECMAScript
/// rounds them to a double.
const EXACT_INTEGER_MAX: u64 = 1 << 53;

/// Appends the RFC 8785 form of `value` to `out`.
///
/// serde_json writes strings exactly as JCS requires (the short escapes, `\u00xx` in lowercase
/// for other control characters, nothing else escaped) and small integers in the same digits, so
/// this walk only has to order object members by UTF-16 code units and hand any other number to
/// `serde_json_canonicalizer`, the reference implementation. It exists because canonicalising
/// through the reference for every member was a third of the ingest cost; a property test checks
/// it against the reference.
pub fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) if u <= EXACT_INTEGER_MAX => {
                out.extend_from_slice(u.to_string().as_bytes())
            }
            (_, Some(i)) if i.unsigned_abs() <= EXACT_INTEGER_MAX => {
                out.extend_from_slice(i.to_string().as_bytes())
            }
            _ => out.extend_from_slice(
                &serde_json_canonicalizer::to_vec(value)
                    .expect("a finite JSON number canonicalises"),
            ),
        },
        Value::String(s) => {
            serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail")
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            if !members.windows(2).all(|w| utf16_cmp(w[0].0, w[1].0).is_lt()) {
                members.sort_by(|a, b| utf16_cmp(a.0, b.0));
            }
            out.push(b'{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, k).expect("writing to a Vec cannot fail");
                out.push(b':');
                write_canonical(v, out);
            }
            out.push(b'}');
        }
    }
}

/// Orders strings by their UTF-16 code units, as RFC 8785 sorts object members.
fn utf16_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    if a.is_ascii() && b.is_ascii() {
        return a.cmp(b);
    }
    a.encode_utf16().cmp(b.encode_utf16())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::format_millis;
    use serde_json::json;

    pub(crate) fn example() -> Value {
        json!({"id": "optional client idempotency key",
         "occurred_at": "2026-11-22T10:15:00Z", "category": "phi_access", "action": "patient.read", "outcome": "success",
         "actor": {"user_id": "u123", "name": "Dr. A", "roles": ["physician"], "ip": "10.1.2.3", "user_agent": "...",
                   "session_id": "...", "client_id": "ehr-web"},
         "source": {"system": "ehr", "site": "main-campus"},
         "patient": {"id": "MRN00012345", "system": "urn:oid:2.16.840.1.113883.3.0"},
         "entities": [{"type": "Observation", "id": "123", "role": "domain"}],
         "request": {"method": "GET", "path": "/api/patients/123", "status": 200},
         "purpose_of_use": "TREAT", "project": "default",
         "changes": [{"field": "role", "before": "annotator", "after": "admin"}],
         "context": {"reason": "chart review"}})
    }

    /// The example with `patch`'s members set (or removed, where they are null).
    fn patched(patch: &Value) -> Value {
        let mut v = example();
        for (k, val) in patch.as_object().unwrap() {
            if val.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = val.clone();
            }
        }
        v
    }

    /// One data-driven helper: an event with `patch` merged into the example, and the expected
    /// `(field, code)` pairs (empty = valid).
    fn check(patch: Value, expect: &[(&str, &str)]) {
        let v = patched(&patch);
        let got: Vec<(String, &str)> = match ClientEvent::validate(v) {
            Ok(_) => vec![],
            Err(InvalidEvent(errs)) => errs.into_iter().map(|e| (e.field, e.code)).collect(),
        };
        let want: Vec<(String, &str)> = expect.iter().map(|(f, c)| (f.to_string(), *c)).collect();
        assert_eq!(got, want, "patch {patch}");
    }

    #[test]
    fn agrees_with_the_json_schema_fixtures() {
        // schema/check_schema.py checks the JSON Schema against the same fixtures.
        let examples: Value =
            serde_json::from_str(include_str!("../../../schema/examples.json")).unwrap();
        for (i, e) in examples["valid"].as_array().unwrap().iter().enumerate() {
            assert!(
                ClientEvent::validate(e.clone()).is_ok(),
                "valid[{i}]: {:?}",
                ClientEvent::validate(e.clone())
            );
        }
        for (i, e) in examples["invalid"].as_array().unwrap().iter().enumerate() {
            assert!(ClientEvent::validate(e.clone()).is_err(), "invalid[{i}] was accepted");
        }
    }

    #[test]
    fn validation_table() {
        check(json!({}), &[]);
        check(json!({"id": null, "occurred_at": null, "actor": null, "entities": null}), &[]);
        check(json!({"action": null}), &[("action", "required")]);
        check(json!({"action": "Patient Read"}), &[("action", "invalid_format")]);
        check(json!({"outcome": "ok"}), &[("outcome", "invalid_value")]);
        check(json!({"outcome": "failure", "outcome_code": 8}), &[]);
        check(
            json!({"outcome": "failure", "outcome_code": 0}),
            &[("outcome_code", "invalid_value")],
        );
        check(json!({"occurred_at": "yesterday"}), &[("occurred_at", "invalid_format")]);
        check(json!({"occurred_at": 5}), &[("occurred_at", "wrong_type")]);
        check(json!({"actor": {"ip": "10.1.2.300"}}), &[("actor.ip", "invalid_format")]);
        check(
            json!({"actor": {"ip": "::1", "roles": ["a", 3]}}),
            &[("actor.roles[1]", "wrong_type")],
        );
        check(json!({"actor": {"badge": "x"}}), &[("actor.badge", "unknown_field")]);
        check(json!({"seq": 5}), &[("seq", "server_assigned")]);
        check(json!({"colour": "red"}), &[("colour", "unknown_field")]);
        check(json!({"request": {"status": 99}}), &[("request.status", "invalid_value")]);
        check(json!({"request": {"method": "get"}}), &[("request.method", "invalid_format")]);
        check(json!({"entities": [{"id": "1"}]}), &[("entities[0].type", "required")]);
        check(json!({"patient": {"system": "x"}}), &[("patient.id", "required")]);
        check(json!({"context": {"k": 1}}), &[("context.k", "wrong_type")]);
        check(json!({"purpose_of_use": ["TREAT", "ETREAT"]}), &[]);
        check(json!({"category": "x".repeat(65)}), &[("category", "too_long")]);
        check(
            json!({"changes": [{"field": "a", "before": {"x": [1, {"y": null}]}, "after": true}]}),
            &[],
        );
    }

    /// The stored event built the slow, obvious way: insert the server's fields into the
    /// object and canonicalise the whole. The reference for [`PreparedEvent::write_stored`].
    fn reference_stored(
        e: ClientEvent,
        seq: u64,
        recorded_at: UnixMillis,
        default_id: &str,
    ) -> Vec<u8> {
        let mut fields = e.fields;
        fields.entry("id").or_insert_with(|| Value::String(default_id.into()));
        fields.insert("seq".into(), Value::from(seq));
        fields.insert("recorded_at".into(), Value::String(format_millis(recorded_at)));
        serde_json_canonicalizer::to_vec(&Value::Object(fields)).unwrap()
    }

    fn stored(e: ClientEvent, seq: u64, recorded_at: UnixMillis, default_id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        e.prepare().unwrap().write_stored(seq, recorded_at, default_id, &mut out);
        assert!(out.len() <= EVENT_BYTES_MAX);
        out
    }

    #[test]
    fn an_event_too_large_once_canonical_is_refused() {
        let big = |n: usize| {
            let entities: Vec<Value> =
                (0..n).map(|i| json!({"type": "Observation", "id": format!("{i}"), "name": "n".repeat(1024)})).collect();
            ClientEvent::validate(
                json!({"action": "patient.read", "outcome": "success", "entities": entities}),
            )
            .unwrap()
        };
        assert!(big(40).prepare().is_ok());
        assert_eq!(big(64).prepare().unwrap_err().0[0].code, "too_large");
    }

    #[test]
    fn stored_bytes_are_canonical_and_carry_server_fields() {
        let e = ClientEvent::validate(json!({"outcome": "success", "action": "login.success", "context": {"b": "1", "a": "2"}})).unwrap();
        let bytes = stored(e, 7, 1_795_342_500_123, "fixed");
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"action":"login.success","context":{"a":"2","b":"1"},"id":"fixed","outcome":"success","recorded_at":"2026-11-22T10:15:00.123Z","seq":7}"#
        );
    }

    #[test]
    fn prepared_splice_equals_full_canonicalisation() {
        for patch in [
            json!({}),
            json!({"id": null}),
            json!({"id": "a\"b\\c\u{e9}", "context": {"\u{e9}": "x", "\u{1F600}": "\u{FF61}", "\u{FF61}": "y"}}),
        ] {
            let v = patched(&patch);
            let Ok(e) = ClientEvent::validate(v.clone()) else { continue };
            let spliced = stored(e.clone(), 42, 1_795_342_500_123, "0190-generated");
            let full = reference_stored(e, 42, 1_795_342_500_123, "0190-generated");
            assert_eq!(String::from_utf8(spliced).unwrap(), String::from_utf8(full).unwrap());
        }
    }

    /// The server's members land before, between and after the client's whatever the client
    /// sent: nothing before `id`, nothing after `seq`, an `id` of its own or none.
    #[test]
    fn server_members_are_spliced_at_every_position() {
        for (v, seq) in [
            (json!({"action": "a.b", "outcome": "success"}), 0),
            (json!({"action": "a.b", "outcome": "success", "id": "x-1"}), 9),
            (
                json!({"action": "a.b", "outcome": "success", "source": {"system": "s"}}),
                (1 << 53) - 1,
            ),
            (json!({"outcome": "failure", "action": "z", "request": {"path": "/p"}}), 10_000_000),
        ] {
            let e = ClientEvent::validate(v).unwrap();
            let spliced = stored(e.clone(), seq, 1_795_342_500_123, "gen");
            assert_eq!(
                String::from_utf8(spliced).unwrap(),
                String::from_utf8(reference_stored(e.clone(), seq, 1_795_342_500_123, "gen"))
                    .unwrap()
            );
            let client_id = e.id().map(str::to_string);
            assert_eq!(e.prepare().unwrap().client_id(), client_id);
        }
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
            "\\PC{0,8}".prop_map(Value::from),
            proptest::collection::vec(any::<char>(), 0..6)
                .prop_map(|c| Value::from(c.into_iter().collect::<String>())),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(
                    proptest::collection::vec(any::<char>(), 0..4)
                        .prop_map(|c| c.into_iter().collect::<String>()),
                    inner,
                    0..6
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn fast_canonical_form_equals_the_reference(v in arb_json()) {
            proptest::prop_assert_eq!(
                String::from_utf8(canonical_bytes(&v)).unwrap(),
                String::from_utf8(serde_json_canonicalizer::to_vec(&v).unwrap()).unwrap()
            );
        }
    }

    #[test]
    fn canonical_bytes_follow_rfc8785() {
        // Keys sort by UTF-16 code units (U+1F600 is D83D DE00, before U+FF61), numbers use the
        // ECMAScript form, and strings carry only the required escapes.
        let v = json!({"\u{FF61}": 1, "\u{1F600}": 2, "b": [1.0, 1e21, -0.0, 0.000001], "a": "\u{7f}\n\u{1}/"});
        assert_eq!(
            String::from_utf8(canonical_bytes(&v)).unwrap(),
            "{\"a\":\"\u{7f}\\n\\u0001/\",\"b\":[1,1e+21,0,0.000001],\"\u{1F600}\":2,\"\u{FF61}\":1}"
        );
    }

    #[test]
    fn not_an_object_or_not_json_is_one_clear_error() {
        assert_eq!(ClientEvent::from_json(b"[1]").unwrap_err().0[0].code, "wrong_type");
        assert_eq!(ClientEvent::from_json(b"{\"a\":").unwrap_err().0[0].code, "invalid_json");
    }
}
