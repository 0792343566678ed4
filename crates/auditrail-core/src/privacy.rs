//! The privacy filter: masks secrets and personal identifiers in an event before it is stored,
//! and records what it masked (rule and field, never the value). docs/privacy.md lists the
//! HIPAA Safe Harbor identifiers and what happens to each.
//!
//! Two kinds of rules:
//! - **By name** (`secret`): a member whose name marks a secret (`password`, `api_key`,
//!   `Authorization`, `session_secret`, ...) is masked or dropped at any depth of the free-form
//!   parts of an event; so is the value of a key/value pair whose label marks one (FHIR
//!   `entity.detail` `type`/`value[x]`, native `changes` `field`/`before`/`after`,
//!   `{"name": "Cookie", "value": ...}`); in free text, the value of `name=value` or
//!   `name: value` with such a name is masked.
//! - **By value**, in free-text fields only: `bearer` (credentials and JSON Web Tokens), `ssn`,
//!   `dob` (a date labelled as a birth date), `card` (Luhn-checked), `email`, `phone`, and the
//!   patterns an operator configures (an MRN format, say). A member whose own name says it
//!   holds an SSN or a birth date has its whole value masked.
//!
//! Patient identifiers in their own fields (`patient.id`, FHIR `entity.what`) are never looked
//! at: accounting of disclosures needs them, and they are encrypted at rest, tokenised in the
//! index and masked for readers without the right to see them.
//!
//! Like the rest of the core this module does no I/O: the server compiles one [`Filter`] from
//! its configuration at start and runs it on every ingest path before anything is stored.

use crate::event::{ClientEvent, InvalidEvent};
use crate::limits::{PRIVACY_PATTERNS_MAX, REDACTED_FIELD_BYTES_MAX, REDACTIONS_MAX};
use base64::Engine as _;
use regex::{Captures, Match, Regex, RegexSet};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The `[privacy]` section of the server's configuration.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacyConfig {
    /// Whether the filter runs at all.
    pub enabled: bool,
    /// Built-in rules turned off, by name (see [`BUILT_IN_RULES`]).
    pub disabled_rules: Vec<String>,
    /// More member names that hold secrets, matched whole (ignoring case and everything but
    /// letters and digits, so `pin_code` also names `PinCode`).
    pub secret_fields: Vec<String>,
    /// What becomes of a secret-named member: masked in place, or dropped.
    pub secret_field_action: SecretFieldAction,
    /// Named patterns masked in free text: `name = "regex"` (the `regex` crate's syntax).
    pub patterns: BTreeMap<String, String>,
}

impl Default for PrivacyConfig {
    fn default() -> PrivacyConfig {
        PrivacyConfig {
            enabled: true,
            disabled_rules: Vec::new(),
            secret_fields: Vec::new(),
            secret_field_action: SecretFieldAction::Mask,
            patterns: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecretFieldAction {
    /// The value becomes `[REDACTED:secret]`: the event still says the member was there.
    #[default]
    Mask,
    /// The member is removed (a FHIR `entity.detail` naming a secret is removed whole, since
    /// R4 requires its value).
    Drop,
}

impl std::str::FromStr for SecretFieldAction {
    type Err = String;

    fn from_str(s: &str) -> Result<SecretFieldAction, String> {
        match s {
            "mask" => Ok(SecretFieldAction::Mask),
            "drop" => Ok(SecretFieldAction::Drop),
            _ => Err(format!("{s:?} is not mask or drop")),
        }
    }
}

/// A configuration the filter cannot be built from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("privacy: {0}")]
pub struct PrivacyConfigError(pub String);

/// The built-in rules, each named in the indicator it leaves (`[REDACTED:ssn]`).
pub const BUILT_IN_RULES: [&str; 7] = ["secret", "bearer", "ssn", "dob", "card", "email", "phone"];

/// Substrings of a member name (lowercased, letters and digits only) that mark a secret.
/// Substrings rather than words, so that `accesstoken` and `X-Api-Key` are caught: a name that
/// merely contains one (`secretary`) is masked too, which errs on the safe side.
const SECRET_MARKERS: &[&[&str]] = &[
    &["password"],
    &["passwd"],
    &["passphrase"],
    &["pwd"],
    &["secret"],
    &["token"],
    &["authorization"],
    &["cookie"],
    &["api", "key"],
    &["private", "key"],
    &["credential"],
];

/// Member names (as words) saying that the whole value is an SSN or a birth date.
const NAMED_VALUES: &[(&str, &[&str])] =
    &[("ssn", &["ssn", "socialsecurity"]), ("dob", &["dob", "birthdate", "dateofbirth"])];

/// Members that label a key/value pair, and those that hold its value.
const LABELS: [&str; 4] = ["name", "key", "type", "field"];

fn is_value_member(name: &str) -> bool {
    name.starts_with("value") || name == "before" || name == "after"
}

/// FHIR elements holding free text (a `text` object, the narrative, is walked into for `div`).
const FHIR_TEXT: [&str; 7] =
    ["outcomeDesc", "description", "name", "text", "div", "valueString", "valueMarkdown"];
/// FHIR base64Binary elements: their decoded text is scanned and encoded again.
const FHIR_BASE64: [&str; 2] = ["query", "valueBase64Binary"];

/// How a rule's match becomes the masked span.
#[derive(Debug, Clone, Copy)]
enum Span {
    /// All of it (configured patterns).
    Whole,
    /// The first capture group that took part (`SSN: (123456789)`), else all of it.
    FirstGroup,
}

#[derive(Debug)]
struct ValueRule {
    name: String,
    regex: Regex,
    span: Span,
    /// Whether a span is really what the rule looks for (a Luhn check, say).
    accept: fn(&str) -> bool,
}

/// A compiled filter; see the module documentation.
#[derive(Debug)]
pub struct Filter {
    enabled: bool,
    action: SecretFieldAction,
    /// [`SECRET_MARKERS`] compacted, when the `secret` rule is on.
    secret_markers: Vec<String>,
    /// [`NAMED_VALUES`] of the rules that are on.
    named_values: Vec<(&'static str, &'static [&'static str])>,
    /// Configured secret names, compacted (lowercase letters and digits).
    secret_names: Vec<String>,
    /// The value rules in the order they claim text: an earlier rule's match wins an overlap.
    rules: Vec<ValueRule>,
    /// Every rule's regex in one set: most text matches none, and one pass says so.
    any: RegexSet,
}

/// The built-in value rules' regexes. `\b` and `\d` are made ASCII-only when compiled
/// (see [`ascii`]); a capture group marks the part masked when the rest is context.
fn built_in_regex(name: &str, secret_keys: &str) -> String {
    match name {
        // `name=value`, `name: value`, `"name": "value"`; an HTTP credential keeps its scheme
        // word with it, so `Authorization: Bearer x` loses the token, not only the word.
        "secret" => format!(
            r#"(?i)(?:{secret_keys})["']?\s*[:=]\s*(?:((?:bearer|basic|digest|negotiate)\s+[^\s&;,"']+)|"([^"]*)"|'([^']*)'|([^\s&;,"']+))"#
        ),
        "bearer" => {
            r"(?i:\bbearer)\s+([A-Za-z0-9\-._~+/]+=*)|\b(eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*)".into()
        }
        // Dashed or spaced anywhere; nine bare digits only after a label.
        "ssn" => r"(?i:\b(?:ssn|social security(?: number| no\.?)?)(?:\s+is)?)\W{0,3}(\d{9})\b|\b(\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4})\b".into(),
        "dob" => r#"(?i:\b(?:dob|birth[ _-]?date|date[ _-]?of[ _-]?birth))["']?\s*[:=]?\s*"?(\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4})\b"#.into(),
        // 14 to 19 digits, bare or in groups of four (Amex 4-6-5, Diners 4-6-4). Not 13: that
        // is every Unix time in milliseconds until 2286.
        "card" => r"\b(\d{4}[ -]\d{4}[ -]\d{4}[ -]\d{2,7}|\d{4}[ -]\d{6}[ -]\d{4,5}|\d{14,19})\b".into(),
        // `%40` too: addresses arrive percent-encoded in query strings.
        "email" => r"(?i)\b([a-z0-9._%+-]+(?:@|%40)[a-z0-9-]+(?:\.[a-z0-9-]+)*\.[a-z]{2,})\b".into(),
        // International numbers need their `+` (bare digit runs are ids and times); US numbers
        // need separators; an IPv4 address never has a four-digit group.
        "phone" => concat!(
            r"(?:^|[^A-Za-z0-9_+])(\+\d(?:[ .-]?\d){7,14})\b",
            r"|(?:^|[^A-Za-z0-9_])((?:\+1[ .-]?)?\(\d{3}\)[ .-]?\d{3}[ .-]\d{4})\b",
            r"|\b((?:1[.-])?\d{3}[.-]\d{3}[.-]\d{4}|\d{3} \d{3} \d{4})\b",
        )
        .into(),
        _ => unreachable!("{name} is not a built-in rule"),
    }
}

/// ASCII word boundaries keep the regexes on the fast DFA for any text, and ASCII digits are
/// what the checks below read.
fn ascii(pattern: &str) -> String {
    pattern.replace(r"\b", r"(?-u:\b)").replace(r"\d", "[0-9]")
}

fn accept_for(name: &str) -> fn(&str) -> bool {
    match name {
        "bearer" => |s| s.len() >= 20 || s.bytes().any(|b| b.is_ascii_digit()),
        "ssn" => valid_ssn,
        "card" => |s| {
            let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect();
            (14..=19).contains(&digits.len()) && luhn_valid(&digits)
        },
        _ => |_| true,
    }
}

/// The SSA never issues area 000, 666 or group 00 or serial 0000; such numbers are
/// placeholders, not identifiers.
fn valid_ssn(s: &str) -> bool {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    d.len() == 9 && !matches!(&d[..3], "000" | "666") && &d[3..5] != "00" && &d[5..] != "0000"
}

/// The Luhn checksum of payment card numbers (ISO/IEC 7812-1).
fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 { if d * 2 > 9 { d * 2 - 9 } else { d * 2 } } else { d }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// A name lowercased with everything but ASCII letters and digits removed.
fn compact(name: &str) -> String {
    name.chars().filter(char::is_ascii_alphanumeric).map(|c| c.to_ascii_lowercase()).collect()
}

/// Calls `f` with [`compact`]`(name)`, kept on the stack for the usual short names: this runs
/// for every free-form member name of every event.
fn with_compact<R>(name: &str, f: impl FnOnce(&str) -> R) -> R {
    let mut buf = [0u8; 64];
    let mut len = 0;
    for b in name.bytes().filter(u8::is_ascii_alphanumeric) {
        if len == buf.len() {
            return f(&compact(name));
        }
        buf[len] = b.to_ascii_lowercase();
        len += 1;
    }
    f(std::str::from_utf8(&buf[..len]).expect("ASCII letters and digits"))
}

/// The words of a name: split at anything but letters and digits and at lowercase-to-uppercase
/// steps (`socialSecurityNumber` is social, security, number), lowercased.
fn words(name: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let mut prev_lower = false;
    for c in name.chars() {
        if !c.is_ascii_alphanumeric() {
            prev_lower = false;
            out.push(String::new());
            continue;
        }
        if c.is_ascii_uppercase() && prev_lower {
            out.push(String::new());
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        match out.last_mut() {
            Some(w) => w.push(c.to_ascii_lowercase()),
            None => out.push(c.to_ascii_lowercase().to_string()),
        }
    }
    out.retain(|w| !w.is_empty());
    out
}

/// `[REDACTED:<rule>]`
pub fn indicator(rule: &str) -> String {
    format!("[REDACTED:{rule}]")
}

fn valid_rule_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b))
}

impl Filter {
    pub fn new(config: &PrivacyConfig) -> Result<Filter, PrivacyConfigError> {
        let err = |m: String| PrivacyConfigError(m);
        for name in &config.disabled_rules {
            if !BUILT_IN_RULES.contains(&name.as_str()) {
                return Err(err(format!(
                    "disabled_rules: {name:?} is not a built-in rule ({})",
                    BUILT_IN_RULES.join(", ")
                )));
            }
        }
        if config.patterns.len() > PRIVACY_PATTERNS_MAX {
            return Err(err(format!("patterns: at most {PRIVACY_PATTERNS_MAX} may be configured")));
        }
        let mut secret_names = Vec::new();
        for name in &config.secret_fields {
            let c = compact(name);
            if c.is_empty() {
                return Err(err(format!("secret_fields: {name:?} has no letters or digits")));
            }
            secret_names.push(c);
        }
        let on = |name: &str| config.enabled && !config.disabled_rules.iter().any(|d| d == name);
        let secret_markers: Vec<String> = if on("secret") {
            SECRET_MARKERS.iter().map(|m| m.concat()).collect()
        } else {
            Vec::new()
        };
        // The names whose `name=value` is masked in text: a marker anywhere in a name, or a
        // configured name whole; `api_key`, `api-key` and `apiKey` alike.
        let spelled = |words: &[&str]| {
            words.iter().map(|w| regex::escape(w)).collect::<Vec<_>>().join("[-_. ]?")
        };
        let mut keys = Vec::new();
        if !secret_markers.is_empty() {
            let markers: Vec<String> = SECRET_MARKERS.iter().map(|m| spelled(m)).collect();
            keys.push(format!("[A-Za-z0-9_.-]*(?:{})[A-Za-z0-9_.-]*", markers.join("|")));
        }
        for name in &config.secret_fields {
            let parts: Vec<&str> = name
                .split(|c: char| !c.is_ascii_alphanumeric())
                .filter(|p| !p.is_empty())
                .collect();
            keys.push(format!(r"\b{}\b", spelled(&parts)));
        }
        let mut rules = Vec::new();
        let add_built_in = |name: &str, rules: &mut Vec<ValueRule>| {
            if name == "secret" && keys.is_empty() || name != "secret" && !on(name) {
                return;
            }
            let regex = Regex::new(&ascii(&built_in_regex(name, &keys.join("|"))))
                .expect("the built-in patterns compile");
            rules.push(ValueRule {
                name: name.to_string(),
                regex,
                span: Span::FirstGroup,
                accept: accept_for(name),
            });
        };
        if config.enabled {
            // Credentials first, then the organisation's own patterns, then the generic ones.
            add_built_in("secret", &mut rules);
            add_built_in("bearer", &mut rules);
            for (name, pattern) in &config.patterns {
                if !valid_rule_name(name) || BUILT_IN_RULES.contains(&name.as_str()) {
                    return Err(err(format!(
                        "patterns: {name:?} must be 1 to 32 lowercase letters, digits, _ or -, and not a built-in rule's name"
                    )));
                }
                let regex = Regex::new(pattern).map_err(|e| {
                    err(format!("patterns.{name}: not a valid regular expression: {e}"))
                })?;
                if regex.is_match("") {
                    return Err(err(format!("patterns.{name}: matches the empty string")));
                }
                rules.push(ValueRule {
                    name: name.clone(),
                    regex,
                    span: Span::Whole,
                    accept: |_| true,
                });
            }
            for name in ["ssn", "dob", "card", "email", "phone"] {
                add_built_in(name, &mut rules);
            }
        }
        let any = RegexSet::new(rules.iter().map(|r| r.regex.as_str()))
            .expect("patterns that compile alone compile as a set");
        Ok(Filter {
            enabled: config.enabled,
            action: config.secret_field_action,
            secret_markers,
            named_values: NAMED_VALUES.iter().copied().filter(|(rule, _)| on(rule)).collect(),
            secret_names: if config.enabled { secret_names } else { Vec::new() },
            rules,
            any,
        })
    }

    /// Masks an event as a client sent it (a native event, with any `fhir` resource in it)
    /// and says what was masked. Anything that is not an object is left for validation to
    /// refuse.
    pub fn mask_event(&self, event: &mut Value) -> Redactions {
        let mut walk = Walk { filter: self, path: String::new(), record: Redactions::default() };
        if let Value::Object(m) = event
            && self.enabled
        {
            walk.native(m);
        }
        walk.record
    }

    /// Masks a FHIR AuditEvent as received, before it is mapped; the fields recorded are those
    /// of the stored event, where the resource is `fhir`.
    pub fn mask_audit_event(&self, resource: &mut Value) -> Redactions {
        let mut walk = Walk { filter: self, path: String::new(), record: Redactions::default() };
        if self.enabled {
            walk.at(Seg::Key("fhir"), |w| w.fhir(resource, ""));
        }
        walk.record
    }

    /// Masks and validates an event as a client sent it: the event to store, with its record
    /// of what was masked.
    pub fn validate(&self, mut event: Value) -> Result<ClientEvent, InvalidEvent> {
        let redactions = self.mask_event(&mut event);
        Ok(ClientEvent::validate(event)?.with_redactions(&redactions))
    }

    fn is_secret_name(&self, name: &str) -> bool {
        if self.secret_markers.is_empty() && self.secret_names.is_empty() {
            return false;
        }
        with_compact(name, |c| {
            self.secret_markers.iter().any(|m| c.contains(m.as_str()))
                || self.secret_names.iter().any(|n| n == c)
        })
    }

    /// The rule a member's name gives its whole value (`patient_ssn`: `ssn`), when it is on.
    /// A name this filter masked (`[REDACTED:ssn]`) names nothing.
    fn named_rule(&self, name: &str) -> Option<&'static str> {
        // Most names hold none of the words even as a substring: say so without splitting.
        let mentioned = with_compact(name, |c| {
            self.named_values.iter().any(|(_, names)| names.iter().any(|n| c.contains(n)))
        });
        if !mentioned || name.starts_with("[REDACTED:") {
            return None;
        }
        let w = words(name);
        let (rule, _) = self.named_values.iter().find(|(_, names)| {
            (0..w.len()).any(|i| {
                (1..=3).any(|n| i + n <= w.len() && names.contains(&w[i..i + n].concat().as_str()))
            })
        })?;
        Some(rule)
    }

    /// `text` with every match of the value rules masked, and the rules that fired (in rule
    /// order); `None` when nothing fired. Indicators already in the text are left alone, so
    /// masking twice changes nothing.
    pub fn mask_text(&self, text: &str) -> Option<(String, Vec<&str>)> {
        self.mask_text_by(text, |_| true)
    }

    /// `text` with only its credentials masked (`secret` and `bearer`), for what the server
    /// records about a request it answered: a query string's search terms are evidence of
    /// what was looked up, but a token in it is still a token.
    pub fn mask_credentials(&self, text: &str) -> Option<String> {
        self.mask_text_by(text, |rule| rule == "secret" || rule == "bearer").map(|(s, _)| s)
    }

    fn mask_text_by(
        &self,
        text: &str,
        applies: impl Fn(&str) -> bool,
    ) -> Option<(String, Vec<&str>)> {
        let candidates = self.any.matches(text);
        if !candidates.matched_any() {
            return None;
        }
        let mut taken: Vec<(usize, usize, Option<usize>)> = Vec::new();
        let mut from = 0;
        while let Some(at) = text[from..].find("[REDACTED:") {
            let start = from + at;
            let Some(len) = text[start..].find(']') else { break };
            taken.push((start, start + len + 1, None));
            from = start + len + 1;
        }
        let rules = self.rules.iter().enumerate();
        for (i, rule) in rules.filter(|(i, r)| candidates.matched(*i) && applies(&r.name)) {
            for c in rule.regex.captures_iter(text) {
                let m = masked_span(&c, rule.span);
                let overlaps = taken.iter().any(|t| t.0 < m.end() && m.start() < t.1);
                if !m.is_empty() && !overlaps && (rule.accept)(m.as_str()) {
                    taken.push((m.start(), m.end(), Some(i)));
                }
            }
        }
        if taken.iter().all(|t| t.2.is_none()) {
            return None;
        }
        taken.sort_unstable();
        let mut out = String::with_capacity(text.len() + 16);
        let mut fired: Vec<usize> = Vec::new();
        let mut end = 0;
        for (start, stop, rule) in taken {
            out.push_str(&text[end..start]);
            match rule {
                Some(i) => {
                    out.push_str(&indicator(&self.rules[i].name));
                    if !fired.contains(&i) {
                        fired.push(i);
                    }
                }
                None => out.push_str(&text[start..stop]),
            }
            end = stop;
        }
        out.push_str(&text[end..]);
        fired.sort_unstable();
        Some((out, fired.into_iter().map(|i| self.rules[i].name.as_str()).collect()))
    }
}

fn masked_span<'t>(c: &Captures<'t>, span: Span) -> Match<'t> {
    let whole = c.get(0).expect("group 0 is the match");
    match span {
        Span::Whole => whole,
        Span::FirstGroup => c.iter().skip(1).flatten().next().unwrap_or(whole),
    }
}

/// What the filter masked in one event: `(rule, field)` pairs in the order found, never a
/// value. At most [`REDACTIONS_MAX`] pairs, except that every rule that fired is listed at
/// least once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Redactions(Vec<(String, String)>);

impl Redactions {
    fn add(&mut self, rule: &str, field: &str) {
        if self.0.iter().any(|(r, f)| r == rule && f == field) {
            return;
        }
        if self.0.len() >= REDACTIONS_MAX && self.0.iter().any(|(r, _)| r == rule) {
            return;
        }
        let mut end = field.len().min(REDACTED_FIELD_BYTES_MAX);
        while !field.is_char_boundary(end) {
            end -= 1;
        }
        self.0.push((rule.to_string(), field[..end].to_string()));
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(r, f)| (r.as_str(), f.as_str()))
    }

    /// The stored form: `[{"rule": "ssn", "field": "context.note"}, ...]`.
    pub fn to_json(&self) -> Value {
        self.0.iter().map(|(rule, field)| json!({"rule": rule, "field": field})).collect()
    }
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// One pass over one event: the path of the member being looked at and what fired so far.
struct Walk<'f> {
    filter: &'f Filter,
    /// `context.note`, `changes[0].after`, `fhir.entity[1].description`
    path: String,
    record: Redactions,
}

impl Walk<'_> {
    fn at<R>(&mut self, seg: Seg<'_>, f: impl FnOnce(&mut Self) -> R) -> R {
        let len = self.path.len();
        match seg {
            Seg::Key(k) => {
                if !self.path.is_empty() {
                    self.path.push('.');
                }
                self.path.push_str(k);
            }
            Seg::Index(i) => {
                let _ = write!(self.path, "[{i}]");
            }
        }
        let r = f(self);
        self.path.truncate(len);
        r
    }

    fn fired(&mut self, rule: &str) {
        self.record.add(rule, &self.path);
    }

    /// The native event's free-form parts. Other members are left for validation, which
    /// refuses any member the schema does not know.
    fn native(&mut self, m: &mut Map<String, Value>) {
        if let Some(v) = m.get_mut("outcome_desc") {
            self.at(Seg::Key("outcome_desc"), |w| w.text(v));
        }
        if let Some(Value::Array(entities)) = m.get_mut("entities") {
            self.at(Seg::Key("entities"), |w| {
                for (i, e) in entities.iter_mut().enumerate() {
                    if let Some(name) = e.get_mut("name") {
                        w.at(Seg::Index(i), |w| w.at(Seg::Key("name"), |w| w.text(name)));
                    }
                }
            });
        }
        if let Some(Value::Object(request)) = m.get_mut("request") {
            self.at(Seg::Key("request"), |w| {
                for key in ["path", "query"] {
                    if let Some(v) = request.get_mut(key) {
                        w.at(Seg::Key(key), |w| w.text(v));
                    }
                }
            });
        }
        for key in ["context", "changes"] {
            if let Some(v) = m.get_mut(key) {
                self.at(Seg::Key(key), |w| w.free(v, None));
            }
        }
        if let Some(v) = m.get_mut("fhir") {
            self.at(Seg::Key("fhir"), |w| w.fhir(v, ""));
        }
    }

    /// Masks what the value rules find in a string.
    fn text(&mut self, v: &mut Value) {
        let Value::String(s) = v else { return };
        if let Some((masked, rules)) = self.filter.mask_text(s) {
            for rule in rules {
                self.fired(rule);
            }
            *s = masked;
        }
    }

    /// A string or number that a member's name says is an SSN or a birth date, masked whole.
    fn named(&mut self, v: &mut Value, rule: &str) {
        if matches!(v, Value::String(_) | Value::Number(_)) {
            *v = indicator(rule).into();
            self.fired(rule);
        }
    }

    /// Free-form JSON (`context`, `changes`): every string is free text, and every name may
    /// mark a secret.
    fn free(&mut self, v: &mut Value, named: Option<&str>) {
        match v {
            Value::String(_) | Value::Number(_) if named.is_some() => {
                self.named(v, named.expect("checked"))
            }
            Value::String(_) => self.text(v),
            Value::Array(items) => {
                for (i, item) in items.iter_mut().enumerate() {
                    self.at(Seg::Index(i), |w| w.free(item, named));
                }
            }
            Value::Object(m) => {
                self.rename_keys(m);
                self.secret_members(m);
                self.pair(m, "");
                for (k, child) in m.iter_mut() {
                    let named = self.filter.named_rule(k);
                    self.at(Seg::Key(k), |w| w.free(child, named));
                }
            }
            _ => {}
        }
    }

    /// Free-form names can hold values too (`{"123-45-6789": "on file"}`): such a name is
    /// replaced by its masked form (a name that then collides with another is dropped).
    fn rename_keys(&mut self, m: &mut Map<String, Value>) {
        let renamed: Vec<(String, String, Vec<&str>)> = m
            .keys()
            .filter_map(|k| {
                self.filter.mask_text(k).map(|(masked, rules)| (k.clone(), masked, rules))
            })
            .collect();
        for (old, new, rules) in renamed {
            let value = m.remove(&old).expect("the key was just listed");
            self.at(Seg::Key(&new), |w| {
                for rule in rules {
                    w.fired(rule);
                }
            });
            m.entry(new).or_insert(value);
        }
    }

    /// Members whose names mark secrets, masked or dropped.
    fn secret_members(&mut self, m: &mut Map<String, Value>) {
        let secret: Vec<String> =
            m.keys().filter(|k| self.filter.is_secret_name(k)).cloned().collect();
        for k in secret {
            self.at(Seg::Key(&k), |w| w.fired("secret"));
            match self.filter.action {
                SecretFieldAction::Mask => {
                    m.insert(k, indicator("secret").into());
                }
                SecretFieldAction::Drop => {
                    m.remove(&k);
                }
            }
        }
    }

    /// A key/value pair whose label names a secret (or an SSN or a birth date) has its values
    /// masked, or dropped; returns whether a secret's values were dropped.
    fn pair(&mut self, m: &mut Map<String, Value>, base64_key: &str) -> bool {
        let Some(label) = LABELS.iter().find_map(|l| m.get(*l).and_then(Value::as_str)) else {
            return false;
        };
        let rule = if self.filter.is_secret_name(label) {
            "secret"
        } else if let Some(rule) = self.filter.named_rule(label) {
            rule
        } else {
            return false;
        };
        let values: Vec<String> = m.keys().filter(|k| is_value_member(k)).cloned().collect();
        let drop = rule == "secret" && self.filter.action == SecretFieldAction::Drop;
        for k in &values {
            self.at(Seg::Key(k), |w| w.fired(rule));
            if drop {
                m.remove(k);
            } else if k == base64_key {
                m.insert(
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(indicator(rule)).into(),
                );
            } else {
                m.insert(k.clone(), indicator(rule).into());
            }
        }
        drop && !values.is_empty()
    }

    /// A FHIR resource (or one of its elements, named `key`): free text only in the elements
    /// that hold it, but any name may mark a secret.
    fn fhir(&mut self, v: &mut Value, key: &str) {
        match v {
            Value::String(_) if FHIR_TEXT.contains(&key) => self.text(v),
            Value::String(s) if FHIR_BASE64.contains(&key) => {
                let engine = &base64::engine::general_purpose::STANDARD;
                // Binary content cannot be scanned and is left as it is.
                let Some(text) =
                    engine.decode(s.trim()).ok().and_then(|b| String::from_utf8(b).ok())
                else {
                    return;
                };
                if let Some((masked, rules)) = self.filter.mask_text(&text) {
                    for rule in rules {
                        self.fired(rule);
                    }
                    *s = engine.encode(masked);
                }
            }
            Value::Array(items) => {
                let mut dropped = Vec::new();
                for (i, item) in items.iter_mut().enumerate() {
                    if self.at(Seg::Index(i), |w| w.fhir_object(item, key)) {
                        dropped.push(i);
                    }
                }
                // R4 requires a detail's value: a detail whose value was dropped goes whole.
                for i in dropped.into_iter().rev() {
                    items.remove(i);
                }
            }
            Value::Object(_) => {
                self.fhir_object(v, key);
            }
            _ => {}
        }
    }

    /// Returns whether `v` is an `entity.detail` whose secret value was dropped.
    fn fhir_object(&mut self, v: &mut Value, key: &str) -> bool {
        let Value::Object(m) = v else {
            self.fhir(v, key);
            return false;
        };
        self.secret_members(m);
        let dropped = self.pair(m, "valueBase64Binary");
        for (k, child) in m.iter_mut() {
            self.at(Seg::Key(k), |w| w.fhir(child, k));
        }
        dropped && key == "detail"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(config: PrivacyConfig) -> Filter {
        Filter::new(&config).unwrap()
    }

    fn with_mrn() -> Filter {
        filter(PrivacyConfig {
            patterns: [("mrn".to_string(), r"\bMRN-?\d{6,10}\b".to_string())].into(),
            ..PrivacyConfig::default()
        })
    }

    /// One data-driven helper: free text in, masked text out (the same text when nothing fires).
    fn check(f: &Filter, input: &str, expect: &str) {
        let got = f.mask_text(input).map_or_else(|| input.to_string(), |(s, _)| s);
        assert_eq!(got, expect, "input {input:?}");
    }

    #[test]
    fn value_rules_table() {
        let f = with_mrn();
        // SSNs: dashed, spaced, or nine digits after a label; never a placeholder.
        check(&f, "SSN 123-45-6789 on file", "SSN [REDACTED:ssn] on file");
        check(&f, "ssn: 123456789", "ssn: [REDACTED:ssn]");
        check(
            &f,
            "Social Security Number is 123456789.",
            "Social Security Number is [REDACTED:ssn].",
        );
        check(&f, "id 123 45 6789", "id [REDACTED:ssn]");
        check(&f, "call 000-12-3456 or 123-00-4567", "call 000-12-3456 or 123-00-4567");
        check(&f, "ref 123456789", "ref 123456789");
        // Cards: Luhn-valid with spaces, dashes or none; Luhn-invalid ids stay.
        check(&f, "card 4111 1111 1111 1111 used", "card [REDACTED:card] used");
        check(&f, "card 4111-1111-1111-1111", "card [REDACTED:card]");
        check(&f, "amex 3782 822463 10005", "amex [REDACTED:card]");
        check(&f, "4111111111111111", "[REDACTED:card]");
        check(&f, "order 4111111111111112", "order 4111111111111112");
        check(&f, "order 4111-1111-1111-1112", "order 4111-1111-1111-1112");
        check(&f, "at 1795342500123 ms", "at 1795342500123 ms");
        // E-mail addresses, also percent-encoded in a query string.
        check(&f, "sent to john.doe+x@mail.example.org today", "sent to [REDACTED:email] today");
        check(&f, "to=jane%40example.com&x=1", "to=[REDACTED:email]&x=1");
        // Phone numbers in several formats.
        check(&f, "call (415) 555-2671", "call [REDACTED:phone]");
        check(&f, "call 415-555-2671.", "call [REDACTED:phone].");
        check(&f, "call 415.555.2671", "call [REDACTED:phone]");
        check(&f, "call 415 555 2671", "call [REDACTED:phone]");
        check(&f, "call 1-800-555-0199", "call [REDACTED:phone]");
        check(&f, "call +1 (415) 555-2671", "call [REDACTED:phone]");
        check(&f, "tel:+14155552671", "tel:[REDACTED:phone]");
        check(&f, "ring +44 20 7946 0958 now", "ring [REDACTED:phone] now");
        check(&f, "ring +33 1 23 45 67 89", "ring [REDACTED:phone]");
        // Credentials in text.
        check(
            &f,
            "GET /x?user=a&access_token=abc123&y=2",
            "GET /x?user=a&access_token=[REDACTED:secret]&y=2",
        );
        check(&f, "password: hunter2", "password: [REDACTED:secret]");
        check(&f, r#"{"apiKey": "k-123"}"#, r#"{"apiKey": "[REDACTED:secret]"}"#);
        check(&f, "Authorization: Bearer abc.def-123", "Authorization: [REDACTED:secret]");
        check(
            &f,
            "retried with Bearer eyJhbGciOi.eyJzdWIiOi.sig",
            "retried with Bearer [REDACTED:bearer]",
        );
        check(&f, "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln", "token [REDACTED:bearer]");
        check(&f, "bearer of the news", "bearer of the news");
        // Birth dates, when labelled.
        check(&f, "DOB: 01/02/1970", "DOB: [REDACTED:dob]");
        check(&f, "birthdate=1970-01-02", "birthdate=[REDACTED:dob]");
        // The organisation's MRN format.
        check(&f, "chart of MRN-0012345 reviewed", "chart of [REDACTED:mrn] reviewed");
        // Never: timestamps, UUIDs, addresses, seqs, short numbers, versions.
        for kept in [
            "2026-11-22T10:15:00.123Z",
            "2026-11-22T10:15:00+01:00",
            "2026-11-22 10:15:00",
            "0190f3a2-7c4e-7b1a-8f00-000000000001",
            "cc6d168e-5871-11ec-bf63-0242ac130002",
            "10.1.2.3",
            "192.168.100.200",
            "2001:db8::1",
            "seq 123456",
            "seq 12345678901",
            "room 42, 3 of 5",
            "v1.2.3",
            "/api/patients/123/observations/4567",
            "_lastUpdated=gt2020-11-06T21:52:30.300Z&_count=10",
            "chart review",
        ] {
            check(&f, kept, kept);
        }
        // Masking twice changes nothing.
        check(
            &f,
            "password=[REDACTED:secret] [REDACTED:ssn]",
            "password=[REDACTED:secret] [REDACTED:ssn]",
        );
    }

    #[test]
    fn credentials_alone_for_the_servers_own_records() {
        let f = with_mrn();
        let masked = f.mask_credentials("patient=MRN-0012345&user=a@b.org&access_token=x1");
        assert_eq!(
            masked.as_deref(),
            Some("patient=MRN-0012345&user=a@b.org&access_token=[REDACTED:secret]")
        );
        assert_eq!(f.mask_credentials("patient=MRN-0012345"), None);
    }

    #[test]
    fn rules_fired_are_listed_once_in_rule_order() {
        let f = with_mrn();
        let (_, rules) = f.mask_text("a@b.org 123-45-6789 c@d.org token=x MRN1234567").unwrap();
        assert_eq!(rules, ["secret", "mrn", "ssn", "email"]);
    }

    fn masked(f: &Filter, mut event: Value) -> (Value, Vec<(String, String)>) {
        let r = f.mask_event(&mut event);
        let pairs = r.pairs().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        (event, pairs)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    #[test]
    fn secret_names_at_every_depth_and_key_value_pairs() {
        let f = with_mrn();
        let (e, fired) = masked(
            &f,
            json!({
                "action": "user.update", "outcome": "success",
                "patient": {"id": "MRN-0012345"},
                "outcome_desc": "sent to a@b.org",
                "request": {"path": "/login?Password=x", "query": "apikey=y&n=1"},
                "entities": [{"type": "Document", "id": "MRN-0012345", "name": "note for MRN-0012345"}],
                "context": {"Authorization": "Bearer abc123", "session_secret": "s", "note": "ok",
                            "patient_ssn": "123456789", "123-45-6789": "on file"},
                "changes": [
                    {"field": "password", "before": "old", "after": "new"},
                    {"field": "profile", "after": {"contact": {"X-Api-Key": "k", "email": "c@d.org"},
                                                  "headers": [{"name": "Cookie", "value": "sid=1"}]}},
                    {"field": "date_of_birth", "before": "1970-01-02"},
                ],
            }),
        );
        assert_eq!(e["patient"]["id"], "MRN-0012345", "patient identifiers stay");
        assert_eq!(e["entities"][0]["id"], "MRN-0012345");
        assert_eq!(e["entities"][0]["name"], "note for [REDACTED:mrn]");
        assert_eq!(e["outcome_desc"], "sent to [REDACTED:email]");
        assert_eq!(e["request"]["path"], "/login?Password=[REDACTED:secret]");
        assert_eq!(e["request"]["query"], "apikey=[REDACTED:secret]&n=1");
        assert_eq!(
            e["context"],
            json!({"Authorization": "[REDACTED:secret]", "session_secret": "[REDACTED:secret]",
                   "note": "ok", "patient_ssn": "[REDACTED:ssn]", "[REDACTED:ssn]": "on file"})
        );
        assert_eq!(
            e["changes"][0],
            json!({"field": "password", "before": "[REDACTED:secret]", "after": "[REDACTED:secret]"})
        );
        assert_eq!(
            e["changes"][1]["after"],
            json!({"contact": {"X-Api-Key": "[REDACTED:secret]", "email": "[REDACTED:email]"},
                   "headers": [{"name": "Cookie", "value": "[REDACTED:secret]"}]})
        );
        assert_eq!(e["changes"][2]["before"], "[REDACTED:dob]");
        assert_eq!(
            fired,
            pairs(&[
                ("email", "outcome_desc"),
                ("mrn", "entities[0].name"),
                ("secret", "request.path"),
                ("secret", "request.query"),
                ("ssn", "context.[REDACTED:ssn]"),
                ("secret", "context.Authorization"),
                ("secret", "context.session_secret"),
                ("ssn", "context.patient_ssn"),
                ("secret", "changes[0].after"),
                ("secret", "changes[0].before"),
                ("secret", "changes[1].after.contact.X-Api-Key"),
                ("email", "changes[1].after.contact.email"),
                ("secret", "changes[1].after.headers[0].value"),
                ("dob", "changes[2].before"),
            ])
        );
    }

    #[test]
    fn drop_removes_secret_members_and_values() {
        let f = filter(PrivacyConfig {
            secret_field_action: SecretFieldAction::Drop,
            secret_fields: vec!["pin_code".into()],
            ..PrivacyConfig::default()
        });
        let (e, fired) = masked(
            &f,
            json!({"context": {"token": "t", "PinCode": "1234", "pin": "kept"},
                   "changes": [{"field": "password", "before": "a", "after": "b"}]}),
        );
        assert_eq!(e, json!({"context": {"pin": "kept"}, "changes": [{"field": "password"}]}));
        assert_eq!(
            fired,
            pairs(&[
                ("secret", "context.PinCode"),
                ("secret", "context.token"),
                ("secret", "changes[0].after"),
                ("secret", "changes[0].before"),
            ])
        );
    }

    #[test]
    fn fhir_free_text_base64_and_details() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let resource = json!({
            "resourceType": "AuditEvent",
            "outcomeDesc": "denied for 123-45-6789",
            "purposeOfEvent": [{"text": "call 415-555-2671"}],
            "agent": [{"who": {"reference": "Patient/MRN-0012345", "display": "MRN-0012345"}}],
            "entity": [{
                "what": {"reference": "Patient/MRN-0012345"},
                "description": "MRN-0012345",
                "query": b64("GET /Patient?email=a@b.org&access_token=abc123"),
                "detail": [
                    {"type": "password", "valueString": "hunter2"},
                    {"type": "client_secret", "valueBase64Binary": b64("s3cr3t")},
                    {"type": "note", "valueString": "MRN-0012345"},
                    {"type": "blob", "valueBase64Binary": "//79"},
                ],
            }],
            "text": {"status": "generated", "div": "<div>a@b.org</div>"},
        });
        let f = with_mrn();
        let mut r = resource.clone();
        let fired: Vec<(String, String)> = f
            .mask_audit_event(&mut r)
            .pairs()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        assert_eq!(r["outcomeDesc"], "denied for [REDACTED:ssn]");
        assert_eq!(r["purposeOfEvent"][0]["text"], "call [REDACTED:phone]");
        assert_eq!(r["agent"], resource["agent"], "patient references stay");
        assert_eq!(r["entity"][0]["what"], resource["entity"][0]["what"]);
        assert_eq!(r["entity"][0]["description"], "[REDACTED:mrn]");
        assert_eq!(
            r["entity"][0]["query"],
            b64("GET /Patient?email=[REDACTED:email]&access_token=[REDACTED:secret]")
        );
        let details = &r["entity"][0]["detail"];
        assert_eq!(details[0]["valueString"], "[REDACTED:secret]");
        assert_eq!(details[1]["valueBase64Binary"], b64("[REDACTED:secret]"));
        assert_eq!(details[2]["valueString"], "[REDACTED:mrn]");
        assert_eq!(details[3]["valueBase64Binary"], "//79", "binary is left alone");
        assert_eq!(r["text"]["div"], "<div>[REDACTED:email]</div>");
        assert_eq!(
            fired,
            pairs(&[
                ("mrn", "fhir.entity[0].description"),
                ("secret", "fhir.entity[0].detail[0].valueString"),
                ("secret", "fhir.entity[0].detail[1].valueBase64Binary"),
                ("mrn", "fhir.entity[0].detail[2].valueString"),
                ("secret", "fhir.entity[0].query"),
                ("email", "fhir.entity[0].query"),
                ("ssn", "fhir.outcomeDesc"),
                ("phone", "fhir.purposeOfEvent[0].text"),
                ("email", "fhir.text.div"),
            ])
        );

        let drop = filter(PrivacyConfig {
            secret_field_action: SecretFieldAction::Drop,
            ..PrivacyConfig::default()
        });
        let mut r = resource.clone();
        drop.mask_audit_event(&mut r);
        let types: Vec<&str> = r["entity"][0]["detail"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["note", "blob"], "a detail cannot lose only its value");
    }

    #[test]
    fn configuration_switches_rules_and_refuses_bad_patterns() {
        let f = filter(PrivacyConfig {
            disabled_rules: vec!["phone".into(), "secret".into()],
            ..PrivacyConfig::default()
        });
        check(&f, "call 415-555-2671, password=x", "call 415-555-2671, password=x");
        let (e, fired) = masked(&f, json!({"context": {"password": "x", "e": "a@b.org"}}));
        assert_eq!(e["context"], json!({"password": "x", "e": "[REDACTED:email]"}));
        assert_eq!(fired, pairs(&[("email", "context.e")]));

        let off = filter(PrivacyConfig { enabled: false, ..PrivacyConfig::default() });
        let event = json!({"context": {"password": "x", "ssn": "123-45-6789"}});
        assert_eq!(masked(&off, event.clone()), (event, vec![]));

        let bad = |patterns: &[(&str, &str)], disabled: &[&str]| {
            Filter::new(&PrivacyConfig {
                patterns: patterns.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect(),
                disabled_rules: disabled.iter().map(|d| d.to_string()).collect(),
                ..PrivacyConfig::default()
            })
            .unwrap_err()
            .to_string()
        };
        let e = bad(&[("mrn", "MRN[0-9")], &[]);
        assert!(e.contains("patterns.mrn: not a valid regular expression"), "{e}");
        assert!(bad(&[("mrn", "x*")], &[]).contains("matches the empty string"));
        assert!(bad(&[("ssn", "x")], &[]).contains("built-in rule"));
        assert!(bad(&[("MRN", "x")], &[]).contains("lowercase"));
        assert!(bad(&[], &["phon"]).contains("\"phon\" is not a built-in rule"));
    }

    #[test]
    fn validate_records_the_redactions_clients_cannot_send() {
        let f = Filter::new(&PrivacyConfig::default()).unwrap();
        let event = f
            .validate(json!({"action": "a.b", "outcome": "success", "context": {"pwd": "x"}}))
            .unwrap();
        assert_eq!(
            event.fields()["redactions"],
            json!([{"rule": "secret", "field": "context.pwd"}])
        );
        let sent = json!({"action": "a.b", "outcome": "success", "redactions": []});
        assert_eq!(f.validate(sent).unwrap_err().0[0].code, "server_assigned");
        let clean = f.validate(json!({"action": "a.b", "outcome": "success"})).unwrap();
        assert!(!clean.fields().contains_key("redactions"));
    }

    #[test]
    fn the_record_is_bounded_but_names_every_rule() {
        let f = Filter::new(&PrivacyConfig::default()).unwrap();
        let many: Vec<Value> = (0..100).map(|i| json!(format!("u{i}@example.org"))).collect();
        let (e, fired) = masked(
            &f,
            json!({"outcome_desc": "ssn 123-45-6789", "changes": [{"field": "x", "after": many}],
                   "fhir": {"resourceType": "AuditEvent", "outcomeDesc": "call 415-555-2671"}}),
        );
        assert_eq!(e["changes"][0]["after"][99], "[REDACTED:email]", "everything is masked");
        assert_eq!(fired.len(), REDACTIONS_MAX + 1);
        assert_eq!(fired[0], ("ssn".to_string(), "outcome_desc".to_string()));
        assert_eq!(fired[REDACTIONS_MAX - 1].1, "changes[0].after[62]");
        assert_eq!(fired[REDACTIONS_MAX], ("phone".to_string(), "fhir.outcomeDesc".to_string()));
    }

    #[test]
    fn luhn_and_ssn_checks() {
        let digits = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn_valid(&digits("79927398713")));
        assert!(!luhn_valid(&digits("79927398710")));
        assert!(valid_ssn("123-45-6789") && valid_ssn("900-12-3456"));
        assert!(!valid_ssn("666-12-3456") && !valid_ssn("123-45-0000"));
    }
}
