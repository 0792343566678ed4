//! What a report reads of each event, and the accounting-of-disclosures rule: which accesses
//! to a patient's data HIPAA (45 CFR 164.528) asks a covered entity to account for. Pure: no
//! I/O, no clock; unit-tested below and documented in docs/reports.md.

use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;

/// The fields of a stored event that reports group by and classify, read without building a
/// JSON tree (the schema fixes their types, so a stored event always parses).
#[derive(Debug, Default, Deserialize)]
pub struct Fields<'a> {
    #[serde(borrow, default)]
    pub action: Cow<'a, str>,
    #[serde(borrow, default)]
    pub category: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub outcome: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub occurred_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub recorded_at: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub actor: Actor<'a>,
    #[serde(borrow, default)]
    pub purpose_of_use: Purposes<'a>,
    #[serde(borrow, default)]
    pub context: Context<'a>,
    /// A FHIR AuditEvent as received: kept as JSON, since BALP lets its shape vary (an ARR
    /// never rejects a resource for profile non-conformance) and only its agents are read.
    #[serde(default)]
    pub fhir: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Actor<'a> {
    #[serde(borrow, default)]
    pub user_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub client_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub ip: Option<Cow<'a, str>>,
}

/// `purpose_of_use`: one code or a list of them.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
pub enum Purposes<'a> {
    #[default]
    None,
    One(#[serde(borrow)] Cow<'a, str>),
    Many(#[serde(borrow)] Vec<Cow<'a, str>>),
}

impl Purposes<'_> {
    pub fn codes(&self) -> Vec<&str> {
        match self {
            Purposes::None => Vec::new(),
            Purposes::One(c) => vec![c.as_ref()],
            Purposes::Many(cs) => cs.iter().map(|c| c.as_ref()).collect(),
        }
    }
}

/// The two spellings of the context key a native event names the actor's organisation with.
#[derive(Debug, Default, Deserialize)]
pub struct Context<'a> {
    #[serde(borrow, default)]
    pub organization: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub organisation: Option<Cow<'a, str>>,
}

impl<'a> Fields<'a> {
    pub fn parse(stored: &'a [u8]) -> Result<Fields<'a>, serde_json::Error> {
        serde_json::from_slice(stored)
    }

    /// Who acted: `actor.user_id`, else the API client (`actor.client_id`).
    pub fn user(&self) -> Option<&str> {
        self.actor.user_id.as_deref().or(self.actor.client_id.as_deref())
    }

    /// The purposes of use joined with `;` (as the CSV export writes lists), if any.
    pub fn purpose_text(&self) -> Option<String> {
        let codes = self.purpose_of_use.codes();
        (!codes.is_empty()).then(|| codes.join(";"))
    }

    /// The organisation the actor acted for: `context.organization` (or `organisation`) of a
    /// native event; for a FHIR AuditEvent, the agent that is an organisation (BALP records
    /// the user's organisation as an agent whose `who` is an `Organization` reference or whose
    /// type is the v3 RoleClass `PROV`, healthcare provider): its display name, else its
    /// reference, else its identifier's value.
    pub fn organization(&self) -> Option<String> {
        let native = self.context.organization.as_deref().or(self.context.organisation.as_deref());
        if let Some(o) = native {
            return Some(o.to_string());
        }
        let agents = self.fhir.as_ref()?.get("agent")?.as_array()?;
        agents.iter().find(|a| is_organization_agent(a)).and_then(|a| {
            let who = a.get("who")?;
            let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
            text(who.get("display"))
                .or_else(|| text(who.get("reference")))
                .or_else(|| text(who.get("identifier").and_then(|i| i.get("value"))))
        })
    }

    /// `occurred_at` (else `recorded_at`) in Unix milliseconds.
    pub fn occurred_ms(&self) -> Option<i64> {
        let t = self.occurred_at.as_deref().or(self.recorded_at.as_deref())?;
        auditrail_core::time::parse_rfc3339(t)
    }
}

const ROLE_CLASS: &str = "http://terminology.hl7.org/CodeSystem/v3-RoleClass";

fn is_organization_agent(agent: &Value) -> bool {
    let reference = agent.pointer("/who/reference").and_then(Value::as_str).unwrap_or("");
    if reference.starts_with("Organization/") || reference.contains("/Organization/") {
        return true;
    }
    let codings = agent.pointer("/type/coding").and_then(Value::as_array);
    codings.into_iter().flatten().any(|c| {
        c.get("code").and_then(Value::as_str) == Some("PROV")
            && c.get("system").and_then(Value::as_str).is_none_or(|s| s == ROLE_CLASS)
    })
}

/// Which part of "treatment, payment and health care operations" (TPO) a purpose of use is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tpo {
    Treatment,
    Payment,
    Operations,
}

/// HL7 v3 PurposeOfUse codes (`http://terminology.hl7.org/CodeSystem/v3-ActReason`, the value
/// set FHIR R4 binds `AuditEvent.purposeOfEvent` to) that are treatment, payment or health
/// care operations in HIPAA's sense (45 CFR 164.501), so that a disclosure for them is
/// excepted from the accounting (164.528(a)(1)(i)). Each code's specialisations in the code
/// system are listed with it. Left out on purpose, although HL7 files some of them under
/// `HOPERAT`: DONAT (organ donation, 164.512(h)), GOV (government), HDECD (decedents,
/// 164.512(g)), HDIRECT (directory, 164.510(a)), HLEGAL (legal proceedings, 164.512(e)), HPRGRP
/// (reporting to a health program), MILCDM (military command, 164.512(k)), HMARKT (marketing),
/// HRESCH and its kinds (research, 164.512(i)), PUBHLTH and its kinds (public health,
/// 164.512(b)), PATRQT, FAMRQT, PWATRNY and SUPNWK (requested by the patient or others): all
/// disclosures HIPAA asks to be accounted for or to be judged case by case, so they are
/// marked. docs/reports.md lists the same table.
pub const TPO_CODES: &[(&str, Tpo)] = &[
    ("TREAT", Tpo::Treatment),
    ("ETREAT", Tpo::Treatment),
    ("BTG", Tpo::Treatment),
    ("ERTREAT", Tpo::Treatment),
    ("CLINTRL", Tpo::Treatment),
    ("COC", Tpo::Treatment),
    ("POPHLTH", Tpo::Treatment),
    ("HPAYMT", Tpo::Payment),
    ("CLMATTCH", Tpo::Payment),
    ("COVAUTH", Tpo::Payment),
    ("COVERAGE", Tpo::Payment),
    ("ELIGDTRM", Tpo::Payment),
    ("ELIGVER", Tpo::Payment),
    ("ENROLLM", Tpo::Payment),
    ("REMITADV", Tpo::Payment),
    ("HOPERAT", Tpo::Operations),
    ("CAREMGT", Tpo::Operations),
    ("FRAUD", Tpo::Operations),
    ("HACCRED", Tpo::Operations),
    ("HCOMPL", Tpo::Operations),
    ("HDM", Tpo::Operations),
    ("HOUTCOMS", Tpo::Operations),
    ("HQUALIMP", Tpo::Operations),
    ("HSYSADMIN", Tpo::Operations),
    ("LABELING", Tpo::Operations),
    ("MEMADMIN", Tpo::Operations),
    ("METAMGT", Tpo::Operations),
    ("PATADMIN", Tpo::Operations),
    ("PATSFTY", Tpo::Operations),
    ("PERFMSR", Tpo::Operations),
    ("RECORDMGT", Tpo::Operations),
    ("SYSDEV", Tpo::Operations),
    ("HTEST", Tpo::Operations),
    ("TRAIN", Tpo::Operations),
];

/// The TPO part of a purpose-of-use code, compared without regard to ASCII case; `None` for
/// every other code.
pub fn tpo(code: &str) -> Option<Tpo> {
    TPO_CODES.iter().find(|(c, _)| c.eq_ignore_ascii_case(code)).map(|&(_, t)| t)
}

/// Whether an action names a disclosure: its last dotted word is `disclose` or `disclosure`
/// (`patient.disclose`; a FHIR AuditEvent with the ISO 21089 `disclose` subtype is stored
/// as `fhir.disclose`).
pub fn is_disclosure_action(action: &str) -> bool {
    let last = action.rsplit('.').next().unwrap_or("");
    last == "disclose" || last == "disclosure"
}

/// Why an event is, or is not, part of the accounting of disclosures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accounting {
    /// Every purpose of use is treatment, payment or operations, or there is none and the
    /// action is a use, not a disclosure.
    NotAccountable,
    /// A purpose of use outside TPO (the first such code).
    PurposeOutsideTpo(String),
    /// A disclosure action with no purpose of use stated: nothing shows it was for TPO.
    DisclosureWithoutPurpose,
}

impl Accounting {
    pub fn is_disclosure(&self) -> bool {
        *self != Accounting::NotAccountable
    }

    /// The reason, in words, for a marked event.
    pub fn reason(&self) -> Option<String> {
        match self {
            Accounting::NotAccountable => None,
            Accounting::PurposeOutsideTpo(code) => Some(format!(
                "purpose of use {code} is not treatment, payment or health care operations"
            )),
            Accounting::DisclosureWithoutPurpose => {
                Some("a disclosure with no purpose of use stated".to_string())
            }
        }
    }
}

/// The accounting-of-disclosures rule (docs/reports.md): an event is marked when any of its
/// purposes of use is outside TPO, or when it is a disclosure action with no purpose of use.
pub fn accounting(action: &str, purposes: &[&str]) -> Accounting {
    if let Some(other) = purposes.iter().find(|p| tpo(p).is_none()) {
        return Accounting::PurposeOutsideTpo(other.to_string());
    }
    if purposes.is_empty() && is_disclosure_action(action) {
        return Accounting::DisclosureWithoutPurpose;
    }
    Accounting::NotAccountable
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(action: &str, purposes: &[&str], expect: Option<&str>) {
        let got = accounting(action, purposes);
        assert_eq!(got.is_disclosure(), expect.is_some(), "{action} {purposes:?}: {got:?}");
        if let Some(word) = expect {
            assert!(got.reason().unwrap().contains(word), "{action} {purposes:?}: {got:?}");
        }
    }

    #[test]
    fn treatment_payment_and_operations_are_not_disclosures() {
        check("patient.read", &["TREAT"], None);
        check("patient.read", &["ETREAT", "BTG"], None);
        check("patient.disclose", &["HPAYMT"], None);
        check("fhir.disclose", &["COVAUTH"], None);
        check("patient.read", &["HOPERAT"], None);
        check("patient.read", &["HQUALIMP", "treat"], None);
        check("patient.read", &[], None);
        check("patient.update", &[], None);
    }

    #[test]
    fn everything_else_is_marked_with_the_reason() {
        check("patient.read", &["HRESCH"], Some("HRESCH"));
        check("patient.read", &["TREAT", "PUBHLTH"], Some("PUBHLTH"));
        check("fhir.disclose", &["PATRQT"], Some("PATRQT"));
        check("patient.read", &["HMARKT"], Some("HMARKT"));
        check("patient.read", &["treatment"], Some("treatment"));
        // HL7 files these under HOPERAT; HIPAA accounts for them (164.512).
        for code in ["DONAT", "GOV", "HDECD", "HDIRECT", "HLEGAL", "HPRGRP", "MILCDM"] {
            check("patient.read", &[code], Some(code));
        }
        check("patient.disclose", &[], Some("no purpose"));
        check("record.disclosure", &[], Some("no purpose"));
        check("fhir.disclose", &[], Some("no purpose"));
    }

    #[test]
    fn the_tpo_table_has_no_duplicates_and_knows_each_part() {
        let mut codes: Vec<&str> = TPO_CODES.iter().map(|(c, _)| *c).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), TPO_CODES.len());
        assert_eq!(tpo("TREAT"), Some(Tpo::Treatment));
        assert_eq!(tpo("hpaymt"), Some(Tpo::Payment));
        assert_eq!(tpo("HOPERAT"), Some(Tpo::Operations));
        assert_eq!(tpo("HRESCH"), None);
        assert!(!is_disclosure_action("patient.disclosed"));
        assert!(!is_disclosure_action("disclose.read"));
    }

    #[test]
    fn fields_are_read_from_native_and_fhir_events() {
        let native =
            json!({"action": "patient.read", "actor": {"user_id": "dr.a", "ip": "10.0.0.1"},
            "purpose_of_use": ["TREAT", "HRESCH"], "context": {"organisation": "St. Mary"},
            "occurred_at": "2026-01-02T03:04:05+01:00"})
            .to_string();
        let f = Fields::parse(native.as_bytes()).unwrap();
        assert_eq!(f.user(), Some("dr.a"));
        assert_eq!(f.purpose_text().as_deref(), Some("TREAT;HRESCH"));
        assert_eq!(f.organization().as_deref(), Some("St. Mary"));
        assert_eq!(f.occurred_ms(), auditrail_core::time::parse_rfc3339("2026-01-02T02:04:05Z"));

        let key = json!({"action": "events.search", "actor": {"client_id": "key_1"},
            "purpose_of_use": "TREAT", "recorded_at": "2026-01-02T00:00:00Z"})
        .to_string();
        let f = Fields::parse(key.as_bytes()).unwrap();
        assert_eq!((f.user(), f.organization()), (Some("key_1"), None));
        assert_eq!(f.purpose_of_use.codes(), ["TREAT"]);
        assert!(f.occurred_ms().is_some(), "recorded_at stands in for occurred_at");

        // BALP: the user's organisation is an agent of its own.
        for (agent, want) in [
            (
                json!({"who": {"reference": "Organization/ex-organization"}}),
                "Organization/ex-organization",
            ),
            (
                json!({"type": {"coding": [{"system": ROLE_CLASS, "code": "PROV"}]},
                    "who": {"display": "St. Mary of Examples", "identifier": {"value": "1234567"}}}),
                "St. Mary of Examples",
            ),
            (
                json!({"type": {"coding": [{"code": "PROV"}]}, "who": {"identifier": {"value": "1234567"}}}),
                "1234567",
            ),
        ] {
            let e = json!({"action": "fhir.read", "fhir": {"resourceType": "AuditEvent",
                "agent": [{"who": {"reference": "Practitioner/p"}, "requestor": true}, agent]}})
            .to_string();
            assert_eq!(Fields::parse(e.as_bytes()).unwrap().organization().as_deref(), Some(want));
        }
        // A shape BALP does not expect is read as no organisation, not as an error.
        let odd =
            json!({"action": "fhir.read", "fhir": {"resourceType": "AuditEvent", "agent": "x"}})
                .to_string();
        assert_eq!(Fields::parse(odd.as_bytes()).unwrap().organization(), None);
    }
}
