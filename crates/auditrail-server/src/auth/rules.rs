//! Who may call which route: one declared rule per (method, path). The middleware looks the
//! matched route up here; a route without a rule is refused (and a test fails), so a new
//! endpoint is never open by accident.

use super::roles::Permission;
use axum::http::Method;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Anyone, without credentials: liveness, the OpenAPI document, FHIR's capability
    /// statement, login, and the transparency log (hashes and signatures, never event data).
    Public,
    /// Any authenticated principal, even one that must first change its password or enrol
    /// MFA: what it needs to do exactly that, see itself and log out.
    SelfService,
    /// Any authenticated principal without a pending restriction.
    Authenticated,
    /// Holders of this permission (in at least one project).
    Needs(Permission),
    /// Holders of any of these permissions.
    NeedsAny(&'static [Permission]),
}

/// The rule of `method` on the route pattern `path` (as axum matched it).
pub fn rule(method: &Method, path: &str) -> Option<Rule> {
    use Permission::*;
    use Rule::*;
    let m = method.as_str();
    Some(match (m, path) {
        ("GET", "/healthz" | "/readyz" | "/api/v1/openapi.json" | "/fhir/metadata") => Public,
        ("GET", "/log/checkpoint" | "/log/tile/{*path}") => Public,
        ("GET", "/api/v1/log/proof/inclusion" | "/api/v1/log/proof/consistency") => Public,
        ("GET", "/metrics") => Needs(SecurityRead),
        ("POST", "/api/v1/events" | "/api/v1/events/bulk" | "/fhir" | "/fhir/AuditEvent") => {
            Needs(EventsWrite)
        }
        ("GET", "/api/v1/events" | "/api/v1/events/stats" | "/api/v1/events/{id}") => {
            Needs(EventsRead)
        }
        ("GET", "/fhir/AuditEvent" | "/fhir/AuditEvent/{id}") => Needs(EventsRead),
        ("GET" | "POST", "/api/v1/events/export") => Needs(EventsExport),
        ("GET", "/api/v1/events/evidence") => Needs(EventsExport),
        (
            "GET",
            "/api/v1/reports/patient-access"
            | "/api/v1/reports/user-activity"
            | "/api/v1/reports/failed-access"
            | "/api/v1/reports/security-changes"
            | "/api/v1/reports/alerts",
        ) => Needs(ReportsRun),
        // Methods FHIR does not allow on AuditEvent, and unknown FHIR types: answered 405/404
        // by the handlers whoever asks; they do nothing.
        ("PUT" | "PATCH" | "DELETE", "/fhir/AuditEvent") => Public,
        ("POST" | "PUT" | "PATCH" | "DELETE", "/fhir/AuditEvent/{id}") => Public,
        (_, "/fhir/{*rest}") => Public,
        ("GET", "/api/v1/security/status") => Needs(SecurityRead),
        (
            "GET",
            "/api/v1/security/audit-log/integrity"
            | "/api/v1/security/audit-log/integrity/jobs/{id}",
        ) => NeedsAny(&[SecurityRead, IntegrityVerify]),
        ("POST", "/api/v1/security/audit-log/integrity") => Needs(IntegrityVerify),
        ("GET", "/api/v1/security/alerts" | "/api/v1/security/alerts/{id}") => {
            NeedsAny(&[SecurityRead, AlertsManage])
        }
        (
            "POST",
            "/api/v1/security/alerts/{id}/acknowledge" | "/api/v1/security/alerts/{id}/resolve",
        ) => Needs(AlertsManage),
        ("GET", "/api/v1/security/alert-rules") => NeedsAny(&[SecurityRead, AlertsManage]),
        ("PUT" | "DELETE", "/api/v1/security/alert-rules/{name}") => Needs(AlertsManage),
        ("GET", "/api/v1/retention") => NeedsAny(&[RetentionManage, SecurityRead, IntegrityVerify]),
        ("POST", "/api/v1/retention/purge" | "/api/v1/retention/holds") => Needs(RetentionManage),
        ("DELETE", "/api/v1/retention/holds/{id}") => Needs(RetentionManage),
        ("POST", "/api/v1/auth/login" | "/api/v1/auth/refresh") => Public,
        ("POST", "/api/v1/auth/logout" | "/api/v1/auth/password") => SelfService,
        ("GET", "/api/v1/auth/me") => SelfService,
        ("POST", "/api/v1/auth/mfa/totp" | "/api/v1/auth/mfa/totp/confirm") => SelfService,
        ("DELETE", "/api/v1/auth/mfa/totp") => Authenticated,
        ("POST", "/api/v1/auth/break-glass") => Needs(EmergencyAccess),
        ("GET" | "POST", "/api/v1/users") => Needs(UsersManage),
        ("GET" | "PATCH", "/api/v1/users/{id}") => Needs(UsersManage),
        ("POST", "/api/v1/users/{id}/password-reset" | "/api/v1/users/{id}/mfa-reset") => {
            Needs(UsersManage)
        }
        ("POST", "/api/v1/users/{id}/unlock") => Needs(UsersManage),
        ("GET", "/api/v1/sessions") => Needs(UsersManage),
        ("DELETE", "/api/v1/sessions/{id}") => Needs(UsersManage),
        ("GET", "/api/v1/roles") => Needs(UsersManage),
        ("PUT" | "DELETE", "/api/v1/roles/{name}") => Needs(UsersManage),
        ("GET" | "POST", "/api/v1/api-keys") => Needs(KeysManage),
        ("DELETE", "/api/v1/api-keys/{id}") => Needs(KeysManage),
        ("GET", "/api/v1/projects") => Authenticated,
        ("POST", "/api/v1/projects") => Needs(ProjectsCreate),
        ("GET", "/api/v1/settings/governance") => NeedsAny(&[SettingsManage, SecurityRead]),
        ("PUT", "/api/v1/settings/governance") => Needs(SettingsManage),
        _ => return None,
    })
}
