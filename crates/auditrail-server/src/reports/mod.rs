//! Compliance reports (docs/reports.md): the patient access report with the accounting of
//! disclosures, user activity, failed access attempts, security configuration changes and the
//! alert summary, each as JSON or CSV.
//!
//! The four event reports are planned before the first byte (parameters checked, a checkpoint
//! published if the index is ahead of the newest one, the events pinned to those indexed and
//! in that checkpoint, their number counted), then streamed like an export: the index is read
//! a page at a time on a blocking thread, each event read back from the log, classified and
//! tallied into its group, and handed to the response in chunks through a small channel. JSON
//! puts the groups and totals after the events, so nothing but the groups (at most
//! [`groups::GROUPS_MAX`]) is held while a report streams. Every run is recorded in the log
//! by the access-control middleware as a `report.run` event (`auth::http`).

pub mod disclosure;
pub mod groups;

use crate::alerts::{Alert, Status};
use crate::auth::{EventView, Principal, Scope, TraceDetail};
use crate::export::{CHUNK_BYTES, CHUNKS_IN_FLIGHT, ChunkStream};
use crate::export_format::{write_csv_header, write_csv_row};
use crate::openapi::{ErrorBody, StoredEvent};
use crate::query::{Paging, pairs, search_query};
use crate::{ApiError, SharedState, blocking};
use auditrail_core::checkpoint::Checkpoint;
use auditrail_index::Query;
use auditrail_index::doc::{Field, GroupBy, term};
use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderName, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use disclosure::{Accounting, Fields, accounting};
use groups::Groups;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// Events per index page while a report reads its events.
const PAGE_EVENTS: usize = 1000;
/// How many events (or alerts) the report holds, counted before the first byte.
pub const REPORT_TOTAL: HeaderName = HeaderName::from_static("x-report-total");
/// The report run's id, as recorded in the log's `report.run` event.
pub const REPORT_ID: HeaderName = HeaderName::from_static("x-report-id");
/// The size of the signed checkpoint the report's events are all in.
pub const REPORT_TREE_SIZE: HeaderName = HeaderName::from_static("x-report-tree-size");

/// The four reports made of events from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    PatientAccess,
    UserActivity,
    FailedAccess,
    SecurityChanges,
}

impl Report {
    pub fn name(self) -> &'static str {
        match self {
            Report::PatientAccess => "patient-access",
            Report::UserActivity => "user-activity",
            Report::FailedAccess => "failed-access",
            Report::SecurityChanges => "security-changes",
        }
    }

    /// The parameter naming whom the report is about, required.
    fn subject(self) -> Option<&'static str> {
        match self {
            Report::PatientAccess => Some("patient"),
            Report::UserActivity => Some("user"),
            Report::FailedAccess | Report::SecurityChanges => None,
        }
    }

    /// The values events are grouped by, in order.
    pub fn dims(self) -> &'static [&'static str] {
        match self {
            Report::PatientAccess => &["user", "organization", "purpose_of_use"],
            Report::UserActivity => &["category", "action", "outcome"],
            Report::FailedAccess => &["action", "user", "ip"],
            Report::SecurityChanges => &["action", "user"],
        }
    }

    /// Whether each event is classified for the accounting of disclosures: the reports of
    /// access to patient data.
    pub fn classifies(self) -> bool {
        matches!(self, Report::PatientAccess | Report::UserActivity)
    }

    /// The columns a CSV row has before the export's 31.
    pub fn csv_leading(self) -> &'static [&'static str] {
        if self.classifies() { &["disclosure", "disclosure_reason", "organization"] } else { &[] }
    }

    fn key(self, f: &Fields, organization: &Option<String>) -> Vec<Option<String>> {
        let s = |v: Option<&str>| v.map(str::to_string);
        match self {
            Report::PatientAccess => vec![s(f.user()), organization.clone(), f.purpose_text()],
            Report::UserActivity => {
                vec![s(f.category.as_deref()), Some(f.action.to_string()), s(f.outcome.as_deref())]
            }
            Report::FailedAccess => {
                vec![Some(f.action.to_string()), s(f.user()), s(f.actor.ip.as_deref())]
            }
            Report::SecurityChanges => vec![Some(f.action.to_string()), s(f.user())],
        }
    }
}

/// JSON (the default) or CSV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Json,
    Csv,
}

impl ReportFormat {
    fn name(self) -> &'static str {
        match self {
            ReportFormat::Json => "json",
            ReportFormat::Csv => "csv",
        }
    }

    fn content_type(self) -> &'static str {
        match self {
            ReportFormat::Json => "application/json",
            ReportFormat::Csv => "text/csv; charset=utf-8; header=present",
        }
    }
}

/// A report's parameters, checked.
#[derive(Debug, Clone)]
struct Params {
    /// The patient or user the report is about.
    subject: Option<String>,
    from: Option<(String, i64)>,
    to: Option<(String, i64)>,
    format: ReportFormat,
}

fn bad(param: &str, message: impl std::fmt::Display) -> ApiError {
    ApiError::bad_request("invalid_parameter", format!("{param}: {message}"))
}

impl Params {
    /// `subject` names the required parameter (`patient`, `user`), if the report has one.
    fn parse(
        raw: Option<&str>,
        headers: &HeaderMap,
        subject: Option<&str>,
    ) -> Result<Params, ApiError> {
        let mut p = Params { subject: None, from: None, to: None, format: ReportFormat::Json };
        let mut format = None;
        let mut seen = std::collections::HashSet::new();
        for (k, v) in pairs(raw)? {
            let known = subject == Some(k.as_str()) || ["from", "to", "format"].contains(&&*k);
            if !known {
                return Err(ApiError::unknown_parameter(&k));
            }
            if !seen.insert(k.clone()) {
                return Err(bad(&k, "may be given once"));
            }
            if v.is_empty() {
                return Err(bad(&k, "must not be empty"));
            }
            let time = |v: &str| {
                auditrail_core::time::parse_rfc3339(v).ok_or_else(|| {
                    bad(&k, "must be an RFC 3339 date-time such as 2026-11-22T10:15:00Z")
                })
            };
            match k.as_str() {
                "from" => p.from = Some((v.clone(), time(&v)?)),
                "to" => p.to = Some((v.clone(), time(&v)?)),
                "format" => {
                    format = Some(match v.as_str() {
                        "json" => ReportFormat::Json,
                        "csv" => ReportFormat::Csv,
                        _ => return Err(bad("format", "must be json or csv")),
                    })
                }
                _ => p.subject = Some(v),
            }
        }
        if let Some(name) = subject
            && p.subject.is_none()
        {
            return Err(bad(name, "is required"));
        }
        if let (Some((_, from)), Some((_, to))) = (&p.from, &p.to)
            && from >= to
        {
            return Err(bad("from", "must be before to"));
        }
        let accept_csv = headers
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.split(',').any(|m| m.trim().starts_with("text/csv")));
        p.format =
            format.unwrap_or(if accept_csv { ReportFormat::Csv } else { ReportFormat::Json });
        Ok(p)
    }

    fn occurred(&self) -> (i64, i64) {
        (self.from.as_ref().map_or(i64::MIN, |f| f.1), self.to.as_ref().map_or(i64::MAX, |t| t.1))
    }

    /// The parameters as the report states them.
    fn json(&self, subject: Option<&str>) -> Value {
        let mut m = Map::new();
        if let (Some(name), Some(v)) = (subject, &self.subject) {
            m.insert(name.into(), v.clone().into());
        }
        m.insert("from".into(), json!(self.from.as_ref().map(|f| &f.0)));
        m.insert("to".into(), json!(self.to.as_ref().map(|t| &t.0)));
        m.insert("format".into(), self.format.name().into());
        Value::Object(m)
    }
}

/// The categories whose events are all security configuration changes.
pub const SECURITY_CATEGORIES: &[&str] = &["configuration", "security", "admin"];

/// Actions that change security or configuration (`*` stands for any run of characters),
/// among them every change auditrail records about itself: settings and governance, users and
/// their passwords and MFA, roles, API keys, projects, alert rules, retention holds and
/// purges, break-glass. docs/reports.md lists the same.
pub const SECURITY_ACTIONS: &[&str] = &[
    "settings.*",
    "*governance*",
    "config.*",
    "configuration.*",
    "*security*",
    "user.*",
    "users.*",
    "role.*",
    "roles.*",
    "*permission*",
    "api_key.*",
    "apikey.*",
    "key.*",
    "keys.*",
    "*mfa*",
    "*totp*",
    "*password*",
    "*break_glass*",
    "*break-glass*",
    "alerts.rule.*",
    "retention.*",
    "project.create",
    "project.delete",
    "license.*",
    "licence.*",
];

/// What is never a change even when a pattern above matches it: auditrail's traces of reads
/// (`read.<path>`), searches and exports, and actions whose last word is a read, a check or a
/// session step.
const NOT_CHANGE_ACTIONS: &[&str] = &["read.*", "events.*", "report.*", "fhir.*"];
const NOT_CHANGE_WORDS: &[&str] = &[
    "read",
    "search",
    "list",
    "view",
    "get",
    "query",
    "verify",
    "validate",
    "challenge",
    "login",
    "logout",
];

/// Whether an action is a security configuration change (docs/reports.md).
pub fn is_security_change(action: &str) -> bool {
    let glob = crate::alerts::rules::glob;
    let last = action.rsplit('.').next().unwrap_or("");
    SECURITY_ACTIONS.iter().any(|p| glob(p, action))
        && !NOT_CHANGE_ACTIONS.iter().any(|p| glob(p, action))
        && !NOT_CHANGE_WORDS.contains(&last)
}

/// The index query a report's events are found by (before it is pinned).
fn report_query(
    state: &SharedState,
    report: Report,
    params: &Params,
    view: &EventView,
) -> Result<Query, ApiError> {
    if report == Report::PatientAccess {
        // Exactly the search `GET /api/v1/events?patient=&from=&to=` runs, so that the report
        // and the search agree event for event.
        let mut search = vec![("patient".to_string(), params.subject.clone().unwrap_or_default())];
        for (name, v) in [("from", &params.from), ("to", &params.to)] {
            if let Some((text, _)) = v {
                search.push((name.to_string(), text.clone()));
            }
        }
        return Ok(search_query(state, view, &search, Paging::All)?.0);
    }
    // The others cover auditrail's own `repository` events too: a user's activity in the
    // repository, its refused requests and failed logins, its settings changes.
    let mut q = Query { newest_first: false, occurred: params.occurred(), ..Query::default() };
    if let Some(projects) = view.project_filter(None)? {
        q.all_of.push(projects.iter().map(|p| term(Field::Project, p)).collect());
    }
    match report {
        Report::PatientAccess => unreachable!("answered above"),
        Report::UserActivity => {
            q.all_of.push(vec![term(Field::User, params.subject.as_deref().unwrap_or_default())])
        }
        Report::FailedAccess => q.all_of.push(vec![term(Field::Outcome, "failure")]),
        Report::SecurityChanges => {
            // The index knows every action in the range; the changes among them are asked for
            // by name, with the categories that are changes whatever the action.
            let (from, to) = params.occurred();
            let mut any: Vec<Vec<u8>> =
                SECURITY_CATEGORIES.iter().map(|c| term(Field::Category, c)).collect();
            for (action, _) in state.index.stats(GroupBy::Action, from, to) {
                if is_security_change(&action) {
                    any.push(term(Field::Action, &action));
                }
            }
            q.all_of.push(any);
        }
    }
    Ok(q)
}

/// Everything decided before the first byte.
struct Plan {
    report: Report,
    format: ReportFormat,
    view: EventView,
    query: Query,
    total: u64,
    tree_size: u64,
    run_id: String,
    /// The JSON report's members before `events`.
    head: Map<String, Value>,
}

fn plan(
    state: &SharedState,
    report: Report,
    params: &Params,
    view: EventView,
) -> Result<Plan, ApiError> {
    let mut query = report_query(state, report, params, &view)?;
    // Every event the report holds is in the checkpoint it names: publish what the index is
    // ahead of (it is never ahead of what is durable), then pin the query to both.
    let indexed_through = state.index.indexed_through();
    if state.store.stages().published < indexed_through {
        state.store.publish()?;
    }
    let note = state.store.checkpoint(None)?;
    let key = state.store.verifier();
    let checkpoint = auditrail_core::note::open(&note, std::slice::from_ref(&key))
        .map_err(ApiError::internal)
        .and_then(|text| Checkpoint::parse(text).map_err(ApiError::internal))?;
    let through = indexed_through.min(checkpoint.size);
    query.seqs = (0, through);
    query.newest_first = false;
    query.limit = PAGE_EVENTS;
    let total = state.index.count(&query);
    let run_id = uuid::Uuid::now_v7().to_string();
    let mut head = Map::new();
    head.insert("report".into(), report.name().into());
    head.insert("run_id".into(), run_id.clone().into());
    head.insert(
        "generated_at".into(),
        auditrail_core::time::format_millis(state.auth.now_ms()).into(),
    );
    head.insert("parameters".into(), params.json(report.subject()));
    head.insert(
        "checkpoint".into(),
        json!({
            "origin": checkpoint.origin,
            "tree_size": checkpoint.size,
            "root_hash": base64::engine::general_purpose::STANDARD.encode(checkpoint.root),
            "signed_note": note,
        }),
    );
    head.insert("indexed_through".into(), through.into());
    head.insert("events_total".into(), total.into());
    Ok(Plan {
        report,
        format: params.format,
        view,
        query,
        total,
        tree_size: checkpoint.size,
        run_id,
        head,
    })
}

/// Answers an event report: planned here, streamed from a blocking thread.
async fn event_report(
    state: SharedState,
    principal: Principal,
    headers: HeaderMap,
    raw: Option<String>,
    report: Report,
) -> Result<Response, ApiError> {
    let params = Params::parse(raw.as_deref(), &headers, report.subject())?;
    let view = EventView::for_reports(&principal);
    let s = state.clone();
    let plan = blocking(move || plan(&s, report, &params, view)).await?;
    let detail = TraceDetail(json!({
        "report": report.name(), "run_id": plan.run_id, "format": plan.format.name(),
        "events": plan.total, "tree_size": plan.tree_size,
    }));
    let response_headers = [
        (header::CONTENT_TYPE, plan.format.content_type().to_string()),
        (REPORT_TOTAL, plan.total.to_string()),
        (REPORT_ID, plan.run_id.clone()),
        (REPORT_TREE_SIZE, plan.tree_size.to_string()),
    ];
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        if let Err(e) = write_events(&state, plan, &tx) {
            // The status is sent already: ending the stream with an error cuts it short.
            eprintln!("auditrail: report failed: {}", e.message);
            let _ = tx.blocking_send(Err(std::io::Error::other(e.message)));
        }
    });
    let mut response = (response_headers, Body::from_stream(ChunkStream(rx))).into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

fn to_json(v: &impl serde::Serialize, out: &mut Vec<u8>) -> Result<(), ApiError> {
    serde_json::to_writer(out, v).map_err(ApiError::internal)
}

/// Reads the plan's events a page at a time, writes each with its classification and tallies
/// its group, sending the report in chunks. Stops early (without error) when the receiver is
/// gone.
fn write_events(
    state: &SharedState,
    plan: Plan,
    tx: &mpsc::Sender<std::io::Result<Bytes>>,
) -> Result<(), ApiError> {
    let Plan { report, format, view, mut query, head, .. } = plan;
    let mut groups = Groups::new(report.dims(), report.classifies());
    let mut out = Vec::with_capacity(CHUNK_BYTES + 4096);
    match format {
        ReportFormat::Json => {
            let head = Value::Object(head).to_string();
            out.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
            out.extend_from_slice(b",\"events\":[");
        }
        ReportFormat::Csv => write_csv_header(report.csv_leading(), &mut out),
    }
    let mut written = 0u64;
    loop {
        let hits = state.index.search(&query);
        for &seq in &hits.seqs {
            state.with_stored(seq, |stored| {
                let f = Fields::parse(stored).map_err(ApiError::internal)?;
                let (accounted, organization) = if report.classifies() {
                    (accounting(&f.action, &f.purpose_of_use.codes()), f.organization())
                } else {
                    (Accounting::NotAccountable, None)
                };
                match format {
                    ReportFormat::Json => {
                        if written > 0 {
                            out.push(b',');
                        }
                        out.extend_from_slice(format!("{{\"seq\":{seq}").as_bytes());
                        if report.classifies() {
                            out.extend_from_slice(b",\"disclosure\":");
                            to_json(&accounted.is_disclosure(), &mut out)?;
                            out.extend_from_slice(b",\"disclosure_reason\":");
                            to_json(&accounted.reason(), &mut out)?;
                            out.extend_from_slice(b",\"organization\":");
                            to_json(&organization, &mut out)?;
                        }
                        out.extend_from_slice(b",\"event\":");
                        view.write_json(stored, &mut out)?;
                        out.push(b'}');
                    }
                    ReportFormat::Csv => {
                        let mut event: Value =
                            serde_json::from_slice(stored).map_err(ApiError::internal)?;
                        if !view.apply(&mut event) {
                            return Ok(());
                        }
                        let reason = accounted.reason().unwrap_or_default();
                        let yes_no = if accounted.is_disclosure() { "yes" } else { "no" };
                        let leading = [yes_no, &reason, organization.as_deref().unwrap_or("")];
                        write_csv_row(&leading[..report.csv_leading().len()], &event, &mut out);
                    }
                }
                groups.add(
                    report.key(&f, &organization),
                    accounted.is_disclosure(),
                    f.occurred_ms(),
                );
                written += 1;
                Ok(())
            })?;
            if out.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut out, Vec::with_capacity(CHUNK_BYTES + 4096));
                if tx.blocking_send(Ok(Bytes::from(full))).is_err() {
                    return Ok(());
                }
            }
        }
        match (hits.more, hits.seqs.last()) {
            (true, Some(&last)) => query.seqs.0 = last + 1,
            _ => break,
        }
    }
    if format == ReportFormat::Json {
        out.extend_from_slice(b"],\"groups\":");
        to_json(&groups.groups_json(), &mut out)?;
        out.extend_from_slice(b",\"totals\":");
        to_json(&groups.totals_json(), &mut out)?;
        out.push(b'}');
    }
    let _ = tx.blocking_send(Ok(Bytes::from(out)));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The routes

/// The JSON form of an event report. The CSV form is one row per event: the report's own
/// columns (for the patient access and user activity reports `disclosure` (`yes`/`no`),
/// `disclosure_reason` and `organization`), then the 31 columns of a CSV export.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventReport {
    /// `patient-access`, `user-activity`, `failed-access` or `security-changes`.
    pub report: String,
    /// This run's id, also in the log's `report.run` event of it (`context.run_id`).
    pub run_id: String,
    pub generated_at: String,
    /// The parameters, as given (`from`/`to` null when not given) and the format.
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// The signed checkpoint every event of the report is in: its origin, tree size, root hash
    /// (base64) and the signed note itself (C2SP), so the report names the log state it covers.
    pub checkpoint: ReportCheckpoint,
    /// Every matching event with a lower seq is in the report.
    pub indexed_through: u64,
    /// How many events follow (known before the first).
    pub events_total: u64,
    /// Oldest first (seq order).
    pub events: Vec<ReportEvent>,
    /// Events counted per combination of the report's group values (docs/reports.md), largest
    /// first; after the events so that the report streams.
    #[schema(value_type = Vec<Object>)]
    pub groups: Vec<Value>,
    /// `events`, `disclosures` (classifying reports), `groups`, `first_occurred_at`,
    /// `last_occurred_at`.
    #[schema(value_type = Object)]
    pub totals: Value,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportCheckpoint {
    pub origin: String,
    pub tree_size: u64,
    pub root_hash: String,
    pub signed_note: String,
}

/// One event of a report, with its classification in the patient access and user activity
/// reports.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReportEvent {
    pub seq: u64,
    /// Part of the accounting of disclosures (45 CFR 164.528): a purpose of use outside
    /// treatment, payment and health care operations, or a disclosure action without a
    /// purpose (docs/reports.md).
    #[serde(default)]
    pub disclosure: Option<bool>,
    /// Why it is a disclosure; null when it is not.
    #[serde(default)]
    pub disclosure_reason: Option<String>,
    /// The organisation the actor acted for, when the event names one.
    #[serde(default)]
    pub organization: Option<String>,
    /// The event as `GET /api/v1/events` shows it to the caller.
    pub event: StoredEvent,
}

macro_rules! report_route {
    ($fn_name:ident, $report:expr, $path:literal, $op:literal, $summary:literal, $desc:literal,
     [$(($pname:literal, $pdesc:literal)),*]) => {
        #[utoipa::path(
            get,
            path = $path,
            tag = "reports",
            operation_id = $op,
            summary = $summary,
            description = concat!($desc, "\n\n", "Streamed: JSON (the default, or `format=json`) is one object \
whose `events` come oldest first, each with its seq, followed by `groups` and `totals`; CSV \
(`format=csv`, or `Accept: text/csv`) is one row per event, the report's own columns then the \
31 columns of a CSV export (docs/api.md), formula injection neutralised. The events are those \
indexed when the report starts and in the signed checkpoint it names (published first if \
needed); `X-Report-Total` gives their number before the first byte. Patient identifiers are \
masked where the caller may not see them. Every run is recorded in the log as a `report.run` \
event (the report, run id, format, event count and tree size; the parameters in its request \
query). A failure after the first byte ends the body early without terminating the chunked \
encoding. docs/reports.md describes each report."),
            params(
                $(($pname = Option<String>, Query, description = $pdesc),)*
                ("from" = Option<String>, Query, format = DateTime, description = "Earliest `occurred_at`, inclusive (RFC 3339)."),
                ("to" = Option<String>, Query, format = DateTime, description = "Latest `occurred_at`, exclusive (RFC 3339)."),
                ("format" = Option<String>, Query, description = "`json` (the default) or `csv`."),
            ),
            responses(
                (status = 200, description = "The report: JSON (`application/json`) or CSV (`text/csv`).", body = EventReport,
                    headers(
                        ("X-Report-Total" = u64, description = "How many events the report holds."),
                        ("X-Report-Id" = String, description = "The run's id, as recorded in the log."),
                        ("X-Report-Tree-Size" = u64, description = "The size of the signed checkpoint the report's events are in."),
                    )),
                (status = 400, description = "`bad_query`, `invalid_parameter` (a missing or bad parameter; the message names it) or `unknown_parameter`.", body = ErrorBody),
                (status = 403, description = "`forbidden`: the report needs `reports:run`.", body = ErrorBody),
                (status = 500, description = "`internal`.", body = ErrorBody),
            )
        )]
        pub async fn $fn_name(
            State(state): State<SharedState>,
            axum::Extension(principal): axum::Extension<Principal>,
            headers: HeaderMap,
            RawQuery(raw): RawQuery,
        ) -> Result<Response, ApiError> {
            event_report(state, principal, headers, raw, $report).await
        }
    };
}

report_route!(
    patient_access,
    Report::PatientAccess,
    "/api/v1/reports/patient-access",
    "reports_patient_access",
    "Patient access report and accounting of disclosures",
    "Every access to one patient's data recorded in the log (exactly the events `GET \
/api/v1/events?patient=&from=&to=` finds), each marked `disclosure` when it belongs to the \
accounting of disclosures of 45 CFR 164.528: a purpose of use outside treatment, payment and \
health care operations (HL7 v3 PurposeOfUse; the codes counted as TPO are in \
docs/reports.md), or a disclosure action (`*.disclose`) with no purpose stated. Groups: user, \
organisation and purpose of use, with event and disclosure counts and the first and last \
access.",
    [("patient", "The patient's id (`patient.id`), required; matched as the search matches it.")]
);

report_route!(
    user_activity,
    Report::UserActivity,
    "/api/v1/reports/user-activity",
    "reports_user_activity",
    "User activity report",
    "Everything one user did (`actor.user_id`), in the applications that send events and in \
auditrail itself (its `repository` events: logins, searches, reads, changes), each classified \
for the accounting of disclosures as in the patient access report. Groups: category, action \
and outcome.",
    [("user", "The acting user (`actor.user_id`), required.")]
);

report_route!(
    failed_access,
    Report::FailedAccess,
    "/api/v1/reports/failed-access",
    "reports_failed_access",
    "Failed access attempts",
    "Every event whose outcome is `failure`: failed logins and MFA checks, denied access to \
patient data, and the requests auditrail itself refused (`access.denied`, failed `auth.login`). \
Groups: action, user and IP address.",
    []
);

report_route!(
    security_changes,
    Report::SecurityChanges,
    "/api/v1/reports/security-changes",
    "reports_security_changes",
    "Security configuration changes",
    "Changes to security and configuration: events of the categories `configuration`, \
`security` and `admin`, and the actions that change settings, governance, users, passwords, \
MFA, roles, permissions, API keys, alert rules, retention and break-glass (the patterns are in \
docs/reports.md), whoever recorded them (applications, or auditrail about itself). Groups: \
action and user.",
    []
);

/// The alert summary.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertReport {
    /// `alerts`.
    pub report: String,
    pub run_id: String,
    pub generated_at: String,
    #[schema(value_type = Object)]
    pub parameters: Value,
    /// The alert engine has evaluated every event with a lower seq.
    pub evaluated_through: u64,
    /// Alerts raised in the range.
    pub alerts_total: u64,
    /// Counts of those alerts per rule, per severity and per status.
    pub counts: AlertCounts,
    /// The alerts, newest first.
    pub alerts: Vec<Alert>,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertCounts {
    pub by_rule: std::collections::BTreeMap<String, u64>,
    /// Every severity, `low` to `critical`, zero included.
    pub by_severity: std::collections::BTreeMap<String, u64>,
    /// Every status, zero included.
    pub by_status: std::collections::BTreeMap<String, u64>,
}

/// The CSV columns of the alert summary, one row per alert.
pub const ALERT_CSV_COLUMNS: &[&str] = &[
    "id",
    "rule",
    "severity",
    "status",
    "subject",
    "summary",
    "occurrences",
    "first_occurred_at",
    "last_occurred_at",
    "raised_at",
    "updated_at",
    "acknowledged_by",
    "acknowledged_at",
    "resolved_by",
    "resolved_at",
    "seqs",
];

/// `GET /api/v1/reports/alerts`
#[utoipa::path(
    get,
    path = "/api/v1/reports/alerts",
    tag = "reports",
    operation_id = "reports_alerts",
    summary = "Alert summary",
    description = "The alerts raised in a range (by `raised_at`), counted per rule, severity \
and status, and listed newest first with their lifecycle, from the alert engine's state (which \
keeps the newest 10,000 alerts, so the report is bounded and is built whole before it is sent). \
Alerts are not limited to projects, so this report needs `reports:run` in every project. JSON \
(the default) or CSV (one row per alert). Recorded in the log as a `report.run` event.",
    params(
        ("from" = Option<String>, Query, format = DateTime, description = "Earliest `raised_at`, inclusive (RFC 3339)."),
        ("to" = Option<String>, Query, format = DateTime, description = "Latest `raised_at`, exclusive (RFC 3339)."),
        ("format" = Option<String>, Query, description = "`json` (the default) or `csv`."),
    ),
    responses(
        (status = 200, description = "The summary: JSON (`application/json`) or CSV (`text/csv`).", body = AlertReport,
            headers(
                ("X-Report-Total" = u64, description = "How many alerts the report lists."),
                ("X-Report-Id" = String, description = "The run's id, as recorded in the log."),
            )),
        (status = 400, description = "`bad_query`, `invalid_parameter` or `unknown_parameter`.", body = ErrorBody),
        (status = 403, description = "`forbidden`: the report needs `reports:run` in every project.", body = ErrorBody),
    )
)]
pub async fn alerts(
    State(state): State<SharedState>,
    axum::Extension(principal): axum::Extension<Principal>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    if principal.scope(crate::auth::roles::Permission::ReportsRun) != Scope::Everywhere {
        return Err(crate::auth::forbidden(
            "the alert summary covers every project: it needs reports:run in every project",
        ));
    }
    let params = Params::parse(raw.as_deref(), &headers, None)?;
    let (from, to) = params.occurred();
    let raised = |a: &Alert| auditrail_core::time::parse_rfc3339(&a.raised_at).unwrap_or(0);
    let alerts = state.alerts.list(|a| (from..to).contains(&raised(a)));
    let run_id = uuid::Uuid::now_v7().to_string();
    let body = match params.format {
        ReportFormat::Json => {
            let mut counts = AlertCountsOut::default();
            for s in crate::alerts::rules::Severity::ALL {
                counts.by_severity.insert(s.as_str().to_string(), 0);
            }
            for s in [Status::Open, Status::Acknowledged, Status::Resolved] {
                counts.by_status.insert(s.as_str().to_string(), 0);
            }
            for a in &alerts {
                *counts.by_rule.entry(a.rule.clone()).or_default() += 1;
                *counts.by_severity.entry(a.severity.as_str().to_string()).or_default() += 1;
                *counts.by_status.entry(a.status.as_str().to_string()).or_default() += 1;
            }
            json!({
                "report": "alerts",
                "run_id": run_id,
                "generated_at": auditrail_core::time::format_millis(state.auth.now_ms()),
                "parameters": params.json(None),
                "evaluated_through": state.alerts.cursor(),
                "alerts_total": alerts.len(),
                "counts": counts,
                "alerts": alerts,
            })
            .to_string()
            .into_bytes()
        }
        ReportFormat::Csv => alerts_csv(&alerts),
    };
    let detail = TraceDetail(json!({
        "report": "alerts", "run_id": run_id, "format": params.format.name(),
        "alerts": alerts.len(),
    }));
    let mut response = (
        [
            (header::CONTENT_TYPE, params.format.content_type().to_string()),
            (REPORT_TOTAL, alerts.len().to_string()),
            (REPORT_ID, run_id),
        ],
        body,
    )
        .into_response();
    response.extensions_mut().insert(detail);
    Ok(response)
}

#[derive(Debug, Default, serde::Serialize)]
struct AlertCountsOut {
    by_rule: std::collections::BTreeMap<String, u64>,
    by_severity: std::collections::BTreeMap<String, u64>,
    by_status: std::collections::BTreeMap<String, u64>,
}

fn alerts_csv(alerts: &[Alert]) -> Vec<u8> {
    let mut out = Vec::new();
    crate::export_format::write_csv_cells(ALERT_CSV_COLUMNS.iter().copied(), &mut out);
    for a in alerts {
        let t = |t: &Option<crate::alerts::Transition>| {
            t.as_ref().map_or((String::new(), String::new()), |t| (t.by.clone(), t.at.clone()))
        };
        let (ack_by, ack_at) = t(&a.acknowledged);
        let (res_by, res_at) = t(&a.resolved);
        let seqs: Vec<String> = a.seqs.iter().map(u64::to_string).collect();
        let cells = [
            a.id.clone(),
            a.rule.clone(),
            a.severity.as_str().to_string(),
            a.status.as_str().to_string(),
            a.subject.clone(),
            a.summary.clone(),
            a.occurrences.to_string(),
            a.first_occurred_at.clone(),
            a.last_occurred_at.clone(),
            a.raised_at.clone(),
            a.updated_at.clone(),
            ack_by,
            ack_at,
            res_by,
            res_at,
            seqs.join(";"),
        ];
        crate::export_format::write_csv_cells(cells.iter().map(String::as_str), &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_changes_are_the_changes_auditrail_records_and_not_its_reads() {
        for action in [
            "settings.governance.change",
            "user.create",
            "user.update",
            "user.password.reset",
            "user.password.change",
            "user.mfa.enrol.confirm",
            "user.mfa.remove",
            "user.mfa.reset",
            "user.unlock",
            "role.put",
            "role.delete",
            "api_key.create",
            "api_key.revoke",
            "project.create",
            "alerts.rule.change",
            "retention.hold.create",
            "retention.hold.release",
            "retention.purge",
            "auth.break_glass",
            "mfa.disable",
            "settings.update",
        ] {
            assert!(is_security_change(action), "{action}");
        }
        for action in [
            "read.settings.governance",
            "read.security.status",
            "read.reports.security_changes",
            "events.search",
            "events.export",
            "report.run",
            "auth.login",
            "login.failure",
            "patient.read",
            "alert.raised",
            "user.mfa.verify",
            "user.read",
            "fhir.update",
        ] {
            assert!(!is_security_change(action), "{action}");
        }
    }

    #[test]
    fn parameters_are_checked_with_stable_codes() {
        let h = HeaderMap::new();
        let code = |raw: &str, subject| Params::parse(Some(raw), &h, subject).unwrap_err();
        let e = code("", Some("patient"));
        assert_eq!((e.code, e.message.as_str()), ("invalid_parameter", "patient: is required"));
        assert_eq!(code("patient=a&patient=b", Some("patient")).code, "invalid_parameter");
        assert_eq!(code("patient=", Some("patient")).code, "invalid_parameter");
        assert_eq!(code("user=a", Some("patient")).code, "unknown_parameter");
        assert_eq!(code("limit=5", None).code, "unknown_parameter");
        assert_eq!(code("from=yesterday", None).code, "invalid_parameter");
        assert_eq!(code("format=xml", None).code, "invalid_parameter");
        let e = code("from=2026-02-01T00:00:00Z&to=2026-01-01T00:00:00Z", None);
        assert!(e.message.starts_with("from:"), "{}", e.message);
        let p = Params::parse(Some("patient=MRN%201&format=csv"), &h, Some("patient")).unwrap();
        assert_eq!((p.subject.as_deref(), p.format), (Some("MRN 1"), ReportFormat::Csv));
        assert_eq!(p.occurred(), (i64::MIN, i64::MAX));
        let mut accept = HeaderMap::new();
        accept.insert(header::ACCEPT, "text/csv".parse().unwrap());
        assert_eq!(Params::parse(None, &accept, None).unwrap().format, ReportFormat::Csv);
        assert_eq!(
            Params::parse(Some("format=json"), &accept, None).unwrap().format,
            ReportFormat::Json
        );
    }
}
