//! The OpenAPI 3.1 document of the HTTP API, generated from the handlers' `#[utoipa::path]`
//! annotations and the schemas below, served at `GET /api/v1/openapi.json` and checked in as
//! `docs/openapi.json` (a test fails when they differ; `UPDATE_OPENAPI=1` rewrites the file).
//!
//! The handlers build their JSON answers with `serde_json::json!`, so the schemas here are the
//! written form of those answers. They also derive `Deserialize` with `deny_unknown_fields`:
//! the tests parse real answers of a running server into them, so a field added to or dropped
//! from an answer without its schema fails a test.

use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::Value;
use std::sync::LazyLock;
use utoipa::openapi::path::{HttpMethod, Operation, OperationBuilder};
use utoipa::openapi::path::{Parameter, ParameterBuilder, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{Content, OpenApi as Document, Ref, Required, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

/// The FHIR media type, without the `charset` parameter `fhir_api` answers with.
const FHIR_MEDIA_TYPE: &str = "application/fhir+json";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "auditrail",
        version = env!("CARGO_PKG_VERSION"),
        description = "An audit-record repository: events are appended to a verifiable log \
(RFC 6962 Merkle tree, signed checkpoints, C2SP tlog-tiles), searchable within milliseconds, \
and served natively and as FHIR R4 AuditEvents (IHE BALP Audit Record Repository). \
The prose reference is docs/api.md; the event schema is schema/event.schema.json.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        crate::healthz,
        crate::readyz,
        crate::metrics,
        serve,
        crate::ingest::post_events,
        crate::ingest::post_bulk,
        crate::query::search,
        crate::query::stats,
        crate::export::export,
        crate::export::export_to_storage,
        crate::evidence::evidence,
        crate::query::get_event,
        crate::reports::patient_access,
        crate::reports::user_activity,
        crate::reports::failed_access,
        crate::reports::security_changes,
        crate::reports::alerts,
        crate::logapi::inclusion,
        crate::logapi::consistency,
        crate::security::status,
        crate::integrity::get_state,
        crate::integrity::start,
        crate::integrity::get_job,
        crate::alerts::http::list,
        crate::alerts::http::get_one,
        crate::alerts::http::acknowledge,
        crate::alerts::http::resolve,
        crate::alerts::http::list_rules,
        crate::alerts::http::put_rule,
        crate::alerts::http::delete_rule,
        crate::logapi::checkpoint,
        crate::logapi::tile,
        crate::fhir_api::bundle,
        crate::fhir_api::metadata,
        crate::fhir_api::create,
        crate::fhir_api::search,
        crate::fhir_api::read,
        crate::retention::get_state,
        crate::retention::post_purge,
        crate::retention::create_hold,
        crate::retention::release_hold,
        crate::auth::http::login,
        crate::auth::http::refresh,
        crate::auth::http::logout,
        crate::auth::http::me,
        crate::auth::http::change_password,
        crate::auth::http::totp_begin,
        crate::auth::http::totp_confirm,
        crate::auth::http::totp_remove,
        crate::auth::http::break_glass,
        crate::auth::http::list_users,
        crate::auth::http::create_user,
        crate::auth::http::get_user,
        crate::auth::http::update_user,
        crate::auth::http::reset_password,
        crate::auth::http::reset_mfa,
        crate::auth::http::unlock,
        crate::auth::http::list_sessions,
        crate::auth::http::revoke_session,
        crate::auth::http::list_roles,
        crate::auth::http::put_role,
        crate::auth::http::delete_role,
        crate::auth::http::list_keys,
        crate::auth::http::create_key,
        crate::auth::http::revoke_key,
        crate::auth::http::list_projects,
        crate::auth::http::create_project,
        crate::auth::http::get_governance,
        crate::auth::http::put_governance,
    ),
    components(schemas(ErrorBody, Event, StoredEvent)),
    modifiers(&FhirSearchParameters, &ImmutableAuditEvents, &AccessRules),
    tags(
        (name = "events", description = "Native ingest and search of audit events."),
        (name = "log", description = "The verifiable log: signed checkpoints, tiles (C2SP \
tlog-tiles) and Merkle proofs."),
        (name = "fhir", description = "FHIR R4 Audit Record Repository (IHE ITI-20, ITI-81). \
Every error is an OperationOutcome; any other path under /fhir answers 404 with one."),
        (name = "operations", description = "Health, readiness, metrics and this document."),
        (name = "access", description = "Logins, sessions, MFA, break-glass, and the \
administration of users, roles, API keys, projects and governance settings. Every other \
operation states the permission it needs; send `Authorization: Bearer` with an access token \
(from login) or an API key (`atk_…`)."),
        (name = "retention", description = "Retention, legal holds and purging (crypto-erasure \
of whole log segments; the tree and every proof stay)."),
        (name = "reports", description = "Compliance reports (docs/reports.md): patient \
access with the accounting of disclosures, user activity, failed access attempts, security \
configuration changes and the alert summary, as JSON or CSV. Each needs `reports:run`, and each \
run is recorded in the log."),
        (name = "security", description = "Alerts raised by rules evaluated on every new event, \
the rules themselves, and the log's integrity verification."),
    )
)]
pub struct ApiDoc;

/// The document as served and checked in: pretty-printed, with a trailing newline.
pub fn document() -> String {
    let mut text =
        ApiDoc::openapi().to_pretty_json().expect("an OpenAPI document always serialises to JSON");
    text.push('\n');
    text
}

static DOCUMENT: LazyLock<String> = LazyLock::new(document);

#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi",
    summary = "This OpenAPI document",
    description = "The OpenAPI 3.1 description of every endpoint; also checked in as docs/openapi.json.",
    responses((status = 200, description = "The OpenAPI document.", body = Object, content_type = "application/json"))
)]
pub async fn serve() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

// ---------------------------------------------------------------------------------------------
// Schemas of the native API

/// `GET /api/v1/security/status`: one object per safeguard.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecurityStatus {
    pub backup: crate::backup::BackupStatus,
    /// The forwarders shipping the log to Elasticsearch/OpenSearch and syslog: how far each
    /// has delivered, its lag and its failures.
    pub forwarding: auditrail_forward::ForwardingStatus,
    pub retention: RetentionSection,
    pub service: ServiceSection,
    pub log: LogSection,
    pub alerts: AlertsSection,
    pub integrity: IntegritySection,
    pub access: AccessSection,
    pub tls: TlsSection,
    pub keys: KeysSection,
}

/// The repository's own accounts: MFA coverage, lockouts, failed logins.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AccessSection {
    /// Enabled user accounts.
    pub users: u64,
    /// Users with a confirmed TOTP second factor.
    pub mfa_enrolled: u64,
    /// `mfa_enrolled / users` (1 with no users).
    pub mfa_coverage: f64,
    /// Roles whose holders must use MFA (`*`: everyone).
    pub mfa_required_roles: Vec<String>,
    /// Users who must use MFA and have not enrolled yet (they can only enrol until they do).
    pub mfa_required_but_not_enrolled: u64,
    /// Accounts locked out now after failed logins.
    pub locked_now: u64,
    /// `auth.login` failures recorded in the last 24 hours.
    pub failed_logins_24h: u64,
    /// Accounts locked out (`auth.lockout`) in the last 24 hours.
    pub lockouts_24h: u64,
}

/// TLS as this server terminates it (a proxy in front is not seen from here).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub enabled: bool,
    /// `1.3` or `1.2`; null without TLS.
    pub min_version: Option<String>,
    /// `off`, `ingest` or `all`.
    pub client_auth: String,
    /// The development certificate `tls_self_signed` made.
    pub self_signed: bool,
    pub cert_file: Option<String>,
}

/// The keys in use and their age, from their files' modification times (a key file is
/// rewritten only when a key is added).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct KeysSection {
    /// The checkpoint signing key: `modified_at`, `age_days`.
    #[schema(value_type = Object)]
    pub signing_key: serde_json::Value,
    /// `from` (where they were read), `versions`, `current_version` (new segments are wrapped
    /// with it) and `file` (`modified_at`, `age_days`; null when they come from the
    /// environment).
    #[schema(value_type = Object)]
    pub master_keys: serde_json::Value,
}

/// Verification of the log (details: `GET /api/v1/security/audit-log/integrity`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IntegritySection {
    /// The size of the prefix of the log verified so far.
    pub verified_through: u64,
    /// The newest full and incremental verifications: `id`, `status` (`passed`, `failed`,
    /// `error`), `finished_at`, `tree_size`, `problem_count`; null before the first.
    #[schema(value_type = Option<Object>)]
    pub last_full: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub last_incremental: Option<serde_json::Value>,
    /// Whether a verification is running.
    pub running: bool,
    pub incremental_interval_ms: u64,
    pub full_interval_ms: u64,
}

/// The running server.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    pub version: String,
    pub started_at: String,
    pub uptime_seconds: u64,
}

/// The log and the index's progress through it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Events in the log (durable).
    pub size: u64,
    /// The size of the latest signed checkpoint.
    pub checkpoint_size: u64,
    pub indexed_through: u64,
    /// Events the index has yet to read.
    pub index_lag_events: u64,
}

/// Alerting: unresolved alerts by severity, the engine's progress, webhook deliveries.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    pub enabled: bool,
    /// The next seq the engine reads; it has evaluated everything before.
    pub next_seq: u64,
    /// Open and acknowledged alerts: `low`, `medium`, `high`, `critical`.
    #[schema(value_type = Object)]
    pub unresolved: serde_json::Value,
    /// Per webhook: `name`, `delivered`, `pending`, `failed`, `last_error`.
    #[schema(value_type = Vec<Object>)]
    pub webhooks: Vec<serde_json::Value>,
}

/// Retention: the policy in force and what it has purged (details: `GET /api/v1/retention`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    pub default_days: u32,
    /// How often the server purges on its own (0: only on request).
    pub check_interval_ms: u64,
    /// Legal holds in force.
    pub holds: u64,
    pub purged_events: u64,
    pub purged_segments: u64,
}

/// One audit event as a client sends it: a JSON object. Its schema is the JSON Schema
/// `schema/event.schema.json` (draft 2020-12, `$id` https://auditrail.dev/schema/event/v1):
/// `action` and `outcome` are required, unknown fields are rejected, `seq`, `recorded_at` and
/// `redactions` are assigned by the server, and `id` (an idempotency key) is assigned when
/// absent. Before validation the privacy filter masks secrets and identifiers in free text
/// (docs/privacy.md), so what is stored never holds them.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct Event(pub Value);

/// A stored event: the object the client sent (see `schema/event.schema.json`) as the privacy
/// filter masked it, plus the server-assigned `id` (when the client gave none), `seq` (its
/// position in the log), `recorded_at` (RFC 3339, when the server stored it) and, when the
/// filter masked anything, `redactions`: `[{"rule": "ssn", "field": "context.note"}, ...]`,
/// each rule that fired and where, never the value (`$defs/redactions` of the schema).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct StoredEvent(pub Value);

/// `POST /api/v1/events` takes one event or an array of events (all or nothing).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum EventOrEvents {
    One(Event),
    Many(Vec<Event>),
}

/// The receipt of a stored event, sent only once the event is durable (fsynced).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Receipt {
    /// The event's id: the client's, or the UUIDv7 the server assigned.
    pub id: String,
    /// The event's position in the log, from 0.
    pub seq: u64,
    /// The event's RFC 6962 leaf hash, 64 hex digits.
    pub leaf_hash: String,
    /// The id was already stored: nothing was appended and this is the original's receipt.
    pub duplicate: bool,
}

/// The receipts of an array of events, in the order given.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Receipts {
    pub receipts: Vec<Receipt>,
}

/// The answer to `POST /api/v1/events`: a receipt for one event, receipts for an array.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ReceiptOrReceipts {
    One(Receipt),
    Many(Receipts),
}

/// A native error.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorInfo,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(description = crate::error::ERROR_CODES)]
pub struct ErrorInfo {
    /// A stable machine-readable code (listed in this schema's description).
    pub code: String,
    /// What went wrong and what to do, for people.
    pub message: String,
    /// With `invalid_event`: one entry per problem, in document order.
    #[serde(default)]
    pub details: Vec<FieldError>,
    /// With `purged`: the proof that the event existed.
    #[serde(default)]
    pub purged: Option<PurgedInfo>,
}

/// What remains of an event retention purged: its place in the log and the proof of it.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgedInfo {
    pub seq: u64,
    /// When its segment was purged.
    pub purged_at: String,
    /// Its `recorded_at`, from the leaf entry.
    pub recorded_at: String,
    /// Its RFC 6962 leaf hash, base64.
    pub leaf_hash: String,
    pub segment: SeqRange,
    pub proof: InclusionProof,
}

/// Seqs `[first_seq, end_seq)`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SeqRange {
    pub first_seq: u64,
    pub end_seq: u64,
}

/// `GET /api/v1/retention`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetentionState {
    /// Days events are kept, counted from `recorded_at`.
    pub default_days: u32,
    /// Per-project overrides, in days.
    pub projects: std::collections::BTreeMap<String, u32>,
    /// How often the server purges on its own (0: only on request).
    pub check_interval_ms: u64,
    pub holds: Vec<HoldInfo>,
    pub purged_events: u64,
    pub purged_segments: Vec<PurgedSegmentInfo>,
}

/// A purged segment.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgedSegmentInfo {
    pub first_seq: u64,
    pub end_seq: u64,
    pub events: u64,
    pub oldest_recorded_at: String,
    pub newest_recorded_at: String,
    pub purged_at: String,
}

/// A new legal hold: a reason and at least one criterion; every criterion given must match.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewHold {
    pub reason: String,
    pub project: Option<String>,
    /// A `patient.id` (any system); kept only as a keyed token.
    pub patient: Option<String>,
    /// RFC 3339; events that occurred or were recorded from then on...
    pub from: Option<String>,
    /// ...and before then.
    pub to: Option<String>,
}

/// A legal hold.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HoldInfo {
    pub id: String,
    pub reason: String,
    pub created_at: String,
    #[serde(default)]
    pub project: Option<String>,
    /// The keyed token of the held patient's id.
    #[serde(default)]
    pub patient_token: Option<String>,
    #[serde(default)]
    pub from: Option<String>,
    #[serde(default)]
    pub to: Option<String>,
}

/// The answer of `POST /api/v1/retention/purge`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeResult {
    pub dry_run: bool,
    /// What went (when not a dry run).
    #[serde(default)]
    pub purged: Vec<PurgedSegmentInfo>,
    /// The decision for each segment old enough to be considered (dry run).
    #[serde(default)]
    pub segments: Vec<PurgeDecision>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurgeDecision {
    pub first_seq: u64,
    pub end_seq: u64,
    pub oldest_recorded_at: String,
    pub newest_recorded_at: String,
    /// When every event in it is past its project's retention.
    pub expires_at: String,
    /// Ids of the holds that keep it.
    pub held_by: Vec<String>,
    pub purge: bool,
}

/// One problem with one field of an event.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FieldError {
    /// The field's JSON path, such as `actor.ip` or `entities[2].type`; in an array request
    /// prefixed with the event's position, such as `[3].actor.ip`.
    pub field: String,
    /// `required`, `unknown_field`, `wrong_type`, `too_long`, `too_many`, `invalid_format`,
    /// `invalid_value`, `server_assigned` or `too_large`.
    pub code: String,
    pub message: String,
}

/// The answer to a bulk request that was read to its end.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkResult {
    /// Time the server spent on the request, in milliseconds.
    pub took_ms: u64,
    /// Some line was not stored.
    pub errors: bool,
    /// One result per non-blank line, in order.
    pub items: Vec<BulkItem>,
}

/// A bulk request that failed part way: the error, and the result of every line read before
/// the failure (lines stored before it are durable and carry their receipts). `items` is absent
/// when the request failed before any line was read.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkFailure {
    pub error: ErrorInfo,
    #[serde(default)]
    pub items: Vec<BulkItem>,
}

/// The result of one NDJSON line.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum BulkItem {
    Stored(BulkStored),
    Rejected(BulkRejected),
}

/// A stored line: its receipt.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkStored {
    /// The line number, from 1 (blank lines count but get no item).
    pub line: u64,
    /// 201, or 200 when the id was already stored.
    pub status: u16,
    pub id: String,
    pub seq: u64,
    /// The event's RFC 6962 leaf hash, 64 hex digits.
    pub leaf_hash: String,
    pub duplicate: bool,
}

/// A line that was not stored, with the status it would have had alone.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BulkRejected {
    /// The line number, from 1.
    pub line: u64,
    pub status: u16,
    pub error: ErrorInfo,
}

/// A page of search results, newest first unless `order=asc`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchPage {
    #[schema(value_type = Vec<StoredEvent>)]
    pub events: Vec<Value>,
    /// Pass as `cursor` for the next page; null on the last page.
    #[schema(required = true)]
    pub next_cursor: Option<String>,
    /// Every event with a lower `seq` is searchable.
    pub indexed_through: u64,
}

/// One event, with an inclusion proof when asked for.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventAnswer {
    #[schema(value_type = StoredEvent)]
    pub event: Value,
    /// Every event with a lower `seq` is searchable.
    pub indexed_through: u64,
    /// With `proof=inclusion`.
    #[serde(default)]
    #[schema(value_type = InclusionProof)]
    pub proof: Option<InclusionProof>,
}

/// An RFC 6962 inclusion proof of one leaf in a published tree, with that tree's checkpoint.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    /// The event's `seq`.
    pub leaf_index: u64,
    pub tree_size: u64,
    /// The audit path, base64, leaf to root.
    pub hashes: Vec<String>,
    /// The signed checkpoint (a C2SP signed note) of `tree_size`.
    pub checkpoint: String,
}

/// An RFC 6962 consistency proof between two published trees, with the larger one's checkpoint.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyProof {
    pub from: u64,
    pub to: u64,
    /// The proof, base64.
    pub hashes: Vec<String>,
    /// The signed checkpoint (a C2SP signed note) of `to`.
    pub checkpoint: String,
}

/// Event counts per value of one field, largest first.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    pub groups: Vec<StatsGroup>,
    /// The sum of the counts.
    pub total: u64,
    /// Every event with a lower `seq` is counted.
    pub indexed_through: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatsGroup {
    pub key: String,
    pub count: u64,
}

/// A tile of the C2SP tlog-tiles layout: up to 256 32-byte hashes of one tree level, or an
/// entry bundle (each entry a big-endian u16 length and the event's 41-byte leaf entry, which
/// holds a commitment, never event data; docs/format.md).
#[derive(ToSchema)]
#[schema(value_type = String, content_media_type = "application/octet-stream")]
pub struct Tile(pub Vec<u8>);

/// An evidence bundle: a POSIX tar archive of one directory, `auditrail-evidence-<UTC time>/`,
/// holding `README.md`, `bundle.json`, `log.vkey`, `checkpoint`, optionally `consistency/`,
/// `events/<seq>/` (`event.json`, `salt`, `leaf`, `proof.tlog-proof`) per event, and
/// `SHA256SUMS` (docs/api.md, "Evidence bundles").
#[derive(ToSchema)]
#[schema(value_type = String, content_media_type = "application/x-tar")]
pub struct EvidenceBundle(pub Vec<u8>);

// ---------------------------------------------------------------------------------------------
// Schemas of the FHIR API: resources are FHIR R4 JSON, described by the FHIR specification.

/// A FHIR R4 AuditEvent (http://hl7.org/fhir/R4/auditevent.html), stored as received; the
/// mapping to native events is docs/fhir.md.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct AuditEvent(pub Value);

/// A FHIR R4 Bundle: `batch` or `transaction` of AuditEvent creates in a request; `searchset`,
/// `batch-response` or `transaction-response` in an answer.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct Bundle(pub Value);

/// A FHIR R4 OperationOutcome: every FHIR error, and the warnings an AuditEvent was stored with.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct OperationOutcome(pub Value);

/// A FHIR R4 CapabilityStatement (IHE BALP Audit Record Repository).
#[derive(Debug, Deserialize, ToSchema)]
#[schema(value_type = Object)]
pub struct CapabilityStatement(pub Value);

/// `POST /fhir/AuditEvent` answers with the stored resource or with an OperationOutcome.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum AuditEventOrOutcome {
    Stored(AuditEvent),
    Outcome(OperationOutcome),
}

// ---------------------------------------------------------------------------------------------
// Parts of the document built in code

/// The AuditEvent search parameters, taken from the CapabilityStatement (which the parser in
/// `auditrail_core::fhir` agrees with), plus paging.
struct FhirSearchParameters;

impl Modify for FhirSearchParameters {
    fn modify(&self, doc: &mut Document) {
        let capability = auditrail_core::fhir::capability_statement("", "");
        let declared = capability
            .pointer("/rest/0/resource/0/searchParam")
            .and_then(Value::as_array)
            .expect("the CapabilityStatement declares its search parameters");
        let mut parameters: Vec<Parameter> = declared
            .iter()
            .map(|p| {
                let name = p["name"].as_str().expect("a search parameter has a name");
                let kind = p["type"].as_str().expect("a search parameter has a type");
                let mut description = format!("FHIR search parameter of type {kind}");
                if let Some(d) = p.get("definition").and_then(Value::as_str) {
                    description.push_str(&format!(" ({d})"));
                }
                if let Some(d) = p.get("documentation").and_then(Value::as_str) {
                    description.push_str(&format!(": {d}"));
                }
                description.push('.');
                query_parameter(name, &description)
            })
            .collect();
        parameters.push(query_parameter(
            "_cursor",
            "Paging: the opaque cursor from a `next` link (`_page` is accepted as a synonym).",
        ));
        let search = doc
            .paths
            .paths
            .get_mut("/fhir/AuditEvent")
            .and_then(|item| item.get.as_mut())
            .expect("GET /fhir/AuditEvent is annotated");
        search.parameters.get_or_insert_with(Vec::new).extend(parameters);
    }
}

fn query_parameter(name: &str, description: &str) -> Parameter {
    ParameterBuilder::new()
        .name(name)
        .parameter_in(ParameterIn::Query)
        .required(Required::False)
        .description(Some(description))
        .schema(Some(ObjectBuilder::new().schema_type(Type::String)))
        .build()
}

/// The methods that would change a stored AuditEvent, answered 405 (`fhir_api::not_allowed`):
/// one handler serves seven operations, so they are written here rather than annotated.
struct ImmutableAuditEvents;

/// Writes each operation's access rule (`auth::rules`) into the document: its security
/// requirement (none for public operations) and the permission it needs.
struct AccessRules;

impl Modify for AccessRules {
    fn modify(&self, doc: &mut Document) {
        use crate::auth::rules::Rule;
        use utoipa::openapi::security::{
            HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("an EdDSA JWT access token, or an API key atk_…")
                    .description(Some("From POST /api/v1/auth/login, or an API key."))
                    .build(),
            ),
        );
        for (path, item) in doc.paths.paths.iter_mut() {
            let slots = [
                ("GET", &mut item.get),
                ("POST", &mut item.post),
                ("PUT", &mut item.put),
                ("PATCH", &mut item.patch),
                ("DELETE", &mut item.delete),
            ];
            for (method, slot) in slots {
                let Some(op) = slot.as_mut() else { continue };
                let method = axum::http::Method::from_bytes(method.as_bytes()).expect("a method");
                let Some(rule) = crate::auth::rules::rule(&method, path) else { continue };
                let note = match rule {
                    Rule::Public => "Public: no credentials.".to_string(),
                    Rule::SelfService => "Any authenticated caller, even one that must first change its password or enrol MFA.".into(),
                    Rule::Authenticated => "Any authenticated caller.".into(),
                    Rule::Needs(p) => format!("Needs the `{}` permission.", p.as_str()),
                    Rule::NeedsAny(ps) => format!(
                        "Needs one of the permissions {}.",
                        ps.iter().map(|p| format!("`{}`", p.as_str())).collect::<Vec<_>>().join(", ")
                    ),
                };
                // An empty requirement object means "no credentials" in OpenAPI.
                let requirement = match rule {
                    Rule::Public => SecurityRequirement::default(),
                    _ => SecurityRequirement::new("bearer", Vec::<String>::new()),
                };
                op.security = Some(vec![requirement]);
                if rule != Rule::Public {
                    let error = |text: &str| {
                        ResponseBuilder::new()
                            .description(text)
                            .content(
                                "application/json",
                                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                            )
                            .build()
                    };
                    let responses = &mut op.responses.responses;
                    responses.entry("401".into()).or_insert_with(|| {
                        error("`unauthenticated`: no valid access token or API key (`WWW-Authenticate: Bearer`).").into()
                    });
                    responses.entry("403".into()).or_insert_with(|| {
                        error("`forbidden`, `password_change_required`, `mfa_enrolment_required` or `network_forbidden`.").into()
                    });
                }
                let description = op.description.get_or_insert_with(String::new);
                if !description.is_empty() {
                    description.push_str("\n\n");
                }
                description.push_str(&note);
            }
        }
    }
}

impl Modify for ImmutableAuditEvents {
    fn modify(&self, doc: &mut Document) {
        use HttpMethod::{Delete, Patch, Post, Put};
        let operations = [
            ("/fhir/AuditEvent", Put, "fhir_audit_event_type_put"),
            ("/fhir/AuditEvent", Patch, "fhir_audit_event_type_patch"),
            ("/fhir/AuditEvent", Delete, "fhir_audit_event_type_delete"),
            ("/fhir/AuditEvent/{id}", Post, "fhir_audit_event_instance_post"),
            ("/fhir/AuditEvent/{id}", Put, "fhir_audit_event_instance_put"),
            ("/fhir/AuditEvent/{id}", Patch, "fhir_audit_event_instance_patch"),
            ("/fhir/AuditEvent/{id}", Delete, "fhir_audit_event_instance_delete"),
        ];
        for (path, method, operation_id) in operations {
            let item = doc.paths.paths.get_mut(path).expect("the AuditEvent paths are annotated");
            let slot = match method {
                Post => &mut item.post,
                Put => &mut item.put,
                Patch => &mut item.patch,
                Delete => &mut item.delete,
                _ => unreachable!("only the methods listed above"),
            };
            assert!(slot.is_none(), "{operation_id}: the method is documented twice");
            *slot = Some(not_allowed(operation_id, path));
        }
    }
}

fn not_allowed(operation_id: &str, path: &str) -> Operation {
    let outcome = Content::new(Some(Ref::from_schema_name("OperationOutcome")));
    let mut builder = OperationBuilder::new()
        .tag("fhir")
        .operation_id(Some(operation_id))
        .summary(Some("Refused: AuditEvents are immutable"))
        .description(Some(
            "An audit repository never changes or removes what it stored: always 405 with an \
             OperationOutcome (`not-supported`).",
        ))
        .response(
            "405",
            ResponseBuilder::new()
                .description("Not supported: AuditEvents are immutable.")
                .content(FHIR_MEDIA_TYPE, outcome),
        );
    if path.contains("{id}") {
        builder = builder.parameter(
            ParameterBuilder::new()
                .name("id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The AuditEvent's id."))
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    builder.build()
}

#[cfg(test)]
mod tests;
