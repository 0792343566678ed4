//! The HTTP side of access control: the middleware that authenticates each request, applies
//! the route's rule and leaves a trace of every read in the log, the login rate limit, and the
//! endpoints for sessions, one's own account, and the administration of users, roles, API keys,
//! projects and governance settings.

use super::accounts::{Governance, Grant};
use super::roles::Permission;
use super::rules::{self, Rule};
use super::{LoginRequest, Principal, Restriction, Tokens};
use crate::error::ApiError;
use crate::openapi::ErrorBody;
use crate::{SharedState, blocking};
use axum::body::Bytes;
use axum::extract::{MatchedPath, Path, RawQuery, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Mutex;

/// The client's address, as the connection gave it.
pub fn client_ip(
    extensions: &axum::http::Extensions,
    headers: &axum::http::HeaderMap,
    trusted_proxies: &[String],
) -> Option<IpAddr> {
    let peer = crate::tls::peer(extensions).map(|p| p.addr.ip()).or_else(|| {
        extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip())
    })?;
    Some(forwarded_client(peer, headers, trusted_proxies))
}

/// The client behind trusted proxies: `X-Forwarded-For` read from the right (each proxy
/// appends the address it received from), skipping trusted proxies; the first address that is
/// not one is the client. A header from an untrusted peer, or one that does not parse, is
/// ignored: the peer itself is the client.
fn forwarded_client(peer: IpAddr, headers: &axum::http::HeaderMap, trusted: &[String]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| super::accounts::network_contains(n, ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut hops = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else { return peer };
        for hop in text.split(',') {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else { return peer };
            hops.push(ip);
        }
    }
    let mut client = peer;
    for ip in hops.into_iter().rev() {
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

/// The action name of a read's trace.
fn read_action(path: &str) -> String {
    match path {
        "/api/v1/events" => "events.search".into(),
        "/api/v1/events/{id}" => "events.read".into(),
        "/api/v1/events/stats" => "events.stats".into(),
        // An evidence bundle is an export too (the route in the context tells them apart).
        "/api/v1/events/export" | "/api/v1/events/evidence" => "events.export".into(),
        // Every report run, whichever report (the route in the context tells them apart).
        r if r.starts_with("/api/v1/reports/") => "report.run".into(),
        "/fhir/AuditEvent" => "fhir.search".into(),
        "/fhir/AuditEvent/{id}" => "fhir.read".into(),
        other => {
            let parts: Vec<&str> = other
                .trim_start_matches("/api/v1/")
                .trim_start_matches('/')
                .split('/')
                .filter(|s| !s.starts_with('{') && !s.is_empty())
                .map(|s| s.trim_start_matches('*'))
                .collect();
            format!("read.{}", parts.join(".").replace('-', "_"))
        }
    }
}

/// Authenticates, applies the route's [`Rule`], and records what was read. Public routes pass
/// untouched; a route without a rule is refused.
pub async fn authorize(State(state): State<SharedState>, mut req: Request, next: Next) -> Response {
    let Some(path) = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string()) else {
        return next.run(req).await;
    };
    let fhir = path.starts_with("/fhir");
    let fail = |e: ApiError| -> Response {
        let unauthenticated = e.status == StatusCode::UNAUTHORIZED;
        let mut r = if fhir {
            crate::fhir_api::FhirError::from(e).into_response()
        } else {
            e.into_response()
        };
        if unauthenticated {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    };
    let method = req.method().clone();
    let Some(rule) = rules::rule(&method, &path) else {
        // A method the route does not answer (what the router would say), or a handler nobody
        // declared a rule for: either way it does not run.
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    };
    let ip = client_ip(req.extensions(), req.headers(), &state.config.trusted_proxies);
    req.extensions_mut().insert(ClientIp(ip));
    if rule == Rule::Public {
        return next.run(req).await;
    }
    // Mutual TLS for ingest clients: the certificate comes on top of the API key.
    let ingest = rule == Rule::Needs(Permission::EventsWrite);
    if ingest
        && state.config.tls_client_auth == crate::tls::ClientAuth::Ingest
        && crate::tls::peer(req.extensions()).and_then(|p| p.client_cert.as_ref()).is_none()
    {
        return fail(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            "sending events needs a TLS client certificate from the configured CA",
        ));
    }
    let Some(token) = bearer(req.headers()).map(str::to_string) else {
        return fail(super::unauthenticated(
            "send Authorization: Bearer <access token or API key>; log in at POST /api/v1/auth/login",
        ));
    };
    // Resolved on this thread unless it must write first (rare): a hand-off to a blocking
    // thread and back was a quarter of a patient lookup's time on a busy two-core machine.
    let principal = match state.auth.authenticate_in_memory(&token, ip) {
        Ok(Some(p)) => p,
        Ok(None) => {
            let s = state.clone();
            match blocking(move || s.auth.authenticate(&token, ip)).await {
                Ok(p) => p,
                Err(e) => return fail(e),
            }
        }
        Err(e) => return fail(e),
    };
    let query = req.uri().query().map(str::to_string);
    let allowed = match (rule, principal.restriction) {
        (Rule::SelfService, _) => Ok(()),
        (_, Some(Restriction::MustChangePassword)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "password_change_required",
            "change your password first: POST /api/v1/auth/password",
        )),
        (_, Some(Restriction::MustEnrolMfa)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "mfa_enrolment_required",
            "enrol a second factor first: POST /api/v1/auth/mfa/totp",
        )),
        (Rule::Authenticated, None) => Ok(()),
        (Rule::Needs(p), None) if principal.can(p) => Ok(()),
        (Rule::NeedsAny(ps), None) if ps.iter().any(|p| principal.can(*p)) => Ok(()),
        (Rule::Needs(p), None) => {
            Err(super::forbidden(format!("this needs the {} permission", p.as_str())))
        }
        _ => Err(super::forbidden("your roles do not allow this")),
    };
    let request = |status: u16| {
        // The route pattern, never the concrete path: an id may be a patient's identifier in a
        // FHIR reference. The query string carries the parameters (what was searched for is
        // the record; a credential a client put there is masked).
        let mut r = json!({"method": method.as_str(), "path": path, "status": status});
        if let Some(q) = &query {
            let q = state.privacy.mask_credentials(q).unwrap_or_else(|| q.clone());
            r["query"] = q.chars().take(4000).collect::<String>().into();
        }
        r
    };
    if let Err(e) = allowed {
        let mut event = super::repository_event(
            &principal.actor(),
            "access.denied",
            "failure",
            json!({"route": path, "reason": e.code}),
            vec![],
        );
        event["request"] = request(e.status.as_u16());
        if let Err(trace_error) = state.auth.trace(event) {
            return fail(trace_error);
        }
        return fail(e);
    }
    // Reads leave a trace before their answer leaves; writes and changes record themselves.
    let traced = method == axum::http::Method::GET;
    req.extensions_mut().insert(principal.clone());
    let response = next.run(req).await;
    if traced {
        let status = response.status();
        let outcome = if status.is_success() { "success" } else { "failure" };
        let mut context = json!({"route": path});
        if let Some(super::TraceDetail(serde_json::Value::Object(detail))) =
            response.extensions().get::<super::TraceDetail>()
        {
            context.as_object_mut().expect("an object").extend(detail.clone());
        }
        let mut event = super::repository_event(
            &principal.actor(),
            &read_action(&path),
            outcome,
            context,
            vec![],
        );
        event["request"] = request(status.as_u16());
        if let Err(e) = state.auth.trace(event) {
            return fail(e);
        }
    }
    response
}

/// A fixed-window limit on login and refresh attempts per client address.
#[derive(Debug, Default)]
pub struct RateLimiter {
    windows: Mutex<HashMap<Option<IpAddr>, (i64, u32)>>,
}

impl RateLimiter {
    /// Counts an attempt; `Err(seconds to wait)` when over `per_minute`.
    pub fn check(&self, ip: Option<IpAddr>, now_ms: i64, per_minute: u32) -> Result<(), i64> {
        let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
        if w.len() > 100_000 {
            w.retain(|_, (start, _)| now_ms - *start < 60_000);
        }
        let entry = w.entry(ip).or_insert((now_ms, 0));
        if now_ms - entry.0 >= 60_000 {
            *entry = (now_ms, 0);
        }
        entry.1 += 1;
        if entry.1 > per_minute {
            return Err(((entry.0 + 60_000 - now_ms) / 1000).max(1));
        }
        Ok(())
    }
}

/// Counts a login or refresh attempt against the client address's limit.
fn count_attempt(state: &SharedState, ip: Option<IpAddr>) -> Result<(), ApiError> {
    let now = state.auth.now_ms();
    state
        .login_limiter
        .check(ip, now, state.config.auth_attempts_per_minute_max)
        .map_err(rate_limited)
}

fn rate_limited(seconds: i64) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        "too many authentication attempts from this address; wait and retry",
    );
    e.extra = Some(("retry_after_seconds", json!(seconds)));
    e
}

fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the body is not the expected JSON: {e}"))
    })
}

/// The client's address, put in the request by [`authorize`] for the handlers.
#[derive(Debug, Clone, Copy)]
pub struct ClientIp(pub Option<IpAddr>);

// ---- sessions ----

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "access", operation_id = "auth_login",
    summary = "Log in",
    description = "Checks the password (and, once enrolled, a TOTP or recovery code) and opens a \
session: a short-lived EdDSA access token to send as `Authorization: Bearer`, and a single-use \
refresh token. Five failures lock the account for 30 minutes (configurable). When \
`must_change_password` or `must_enrol_mfa` is true, the session may only do that first.",
    request_body(content = inline(LoginRequestDoc), content_type = "application/json"),
    responses(
        (status = 200, description = "Logged in.", body = inline(TokensDoc)),
        (status = 400, description = "`invalid_json`.", body = ErrorBody),
        (status = 401, description = "`invalid_credentials` or `mfa_required` (send `totp_code`).", body = ErrorBody),
        (status = 403, description = "`account_locked`, with `retry_after_seconds`.", body = ErrorBody),
        (status = 429, description = "`rate_limited`, with `Retry-After`.", body = ErrorBody),
    ))]
pub async fn login(
    State(state): State<SharedState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    body: Bytes,
) -> Result<Json<Tokens>, ApiError> {
    count_attempt(&state, ip)?;
    let req: LoginRequest = parse(&body)?;
    blocking(move || state.auth.login(&req, ip)).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshRequest {
    refresh_token: String,
}

#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "access", operation_id = "auth_refresh",
    summary = "Refresh the access token",
    description = "Exchanges the session's refresh token (single use) for a new access token and \
refresh token, unless the session was idle longer than the inactivity limit or is past its lifetime.",
    request_body(content = inline(RefreshDoc), content_type = "application/json"),
    responses(
        (status = 200, description = "New tokens.", body = inline(TokensDoc)),
        (status = 400, description = "`invalid_json`.", body = ErrorBody),
        (status = 401, description = "`unauthenticated`: the token is unknown, used, or the session ended.", body = ErrorBody),
        (status = 429, description = "`rate_limited`.", body = ErrorBody),
    ))]
pub async fn refresh(
    State(state): State<SharedState>,
    Extension(ClientIp(ip)): Extension<ClientIp>,
    body: Bytes,
) -> Result<Json<Tokens>, ApiError> {
    count_attempt(&state, ip)?;
    let req: RefreshRequest = parse(&body)?;
    blocking(move || state.auth.refresh(&req.refresh_token, ip)).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "access", operation_id = "auth_logout",
    summary = "Log out", description = "Ends the session of the access token.",
    responses((status = 204, description = "The session ended."), (status = 401, description = "`unauthenticated`.", body = ErrorBody)))]
pub async fn logout(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.logout(&p)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/auth/me", tag = "access", operation_id = "auth_me",
    summary = "Who am I", description = "The caller's identity, roles, effective permissions and pending obligations.",
    responses((status = 200, description = "The caller.", body = Object), (status = 401, description = "`unauthenticated`.", body = ErrorBody)))]
pub async fn me(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
) -> Json<Value> {
    Json(state.auth.me(&p))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    current_password: String,
    new_password: String,
}

#[utoipa::path(post, path = "/api/v1/auth/password", tag = "access", operation_id = "auth_password",
    summary = "Change one's password",
    description = "At least 12 characters and not guessable (common passwords, dictionary words and \
the user's own name are refused, with a reason).",
    request_body(content = inline(PasswordDoc), content_type = "application/json"),
    responses(
        (status = 204, description = "Changed."),
        (status = 400, description = "`invalid_json` or `weak_password` (the message says why).", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: the current password is wrong.", body = ErrorBody),
    ))]
pub async fn change_password(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: PasswordChange = parse(&body)?;
    blocking(move || state.auth.change_password(&p, &req.current_password, &req.new_password))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Code {
    code: String,
}

#[utoipa::path(post, path = "/api/v1/auth/mfa/totp", tag = "access", operation_id = "auth_totp_begin",
    summary = "Start TOTP enrolment",
    description = "A new TOTP secret and its `otpauth://` URI (RFC 6238: SHA-1, 6 digits, 30 s) for an \
authenticator app; it protects logins once confirmed.",
    responses((status = 200, description = "The secret and URI.", body = Object), (status = 409, description = "`conflict`: already enrolled.", body = ErrorBody)))]
pub async fn totp_begin(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || state.auth.totp_begin(&p)).await.map(Json)
}

#[utoipa::path(post, path = "/api/v1/auth/mfa/totp/confirm", tag = "access", operation_id = "auth_totp_confirm",
    summary = "Confirm TOTP enrolment",
    description = "Confirms with a current code; answers ten one-time recovery codes, shown only now.",
    request_body(content = inline(CodeDoc), content_type = "application/json"),
    responses(
        (status = 200, description = "Enrolled; `recovery_codes`.", body = Object),
        (status = 400, description = "`invalid_json`.", body = ErrorBody),
        (status = 401, description = "`invalid_credentials`: wrong code.", body = ErrorBody),
        (status = 409, description = "`conflict`: no enrolment pending.", body = ErrorBody),
    ))]
pub async fn totp_confirm(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: Code = parse(&body)?;
    blocking(move || state.auth.totp_confirm(&p, &req.code))
        .await
        .map(|codes| Json(json!({"recovery_codes": codes})))
}

#[utoipa::path(delete, path = "/api/v1/auth/mfa/totp", tag = "access", operation_id = "auth_totp_remove",
    summary = "Remove one's TOTP", description = "Proven with a current code; refused while the account's roles require MFA.",
    request_body(content = inline(CodeDoc), content_type = "application/json"),
    responses((status = 204, description = "Removed."), (status = 400, description = "`invalid_json`.", body = ErrorBody), (status = 401, description = "`invalid_credentials`.", body = ErrorBody), (status = 403, description = "`forbidden`: MFA is required.", body = ErrorBody), (status = 409, description = "`conflict`: none enrolled.", body = ErrorBody)))]
pub async fn totp_remove(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let req: Code = parse(&body)?;
    blocking(move || state.auth.totp_remove(&p, &req.code)).await.map(|_| StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BreakGlass {
    reason: String,
    minutes: u32,
}

#[utoipa::path(post, path = "/api/v1/auth/break-glass", tag = "access", operation_id = "auth_break_glass",
    summary = "Emergency access (break-glass)",
    description = "Adds reading events with patient identifiers and exporting them to this session for \
`minutes` (bounded by `break_glass_duration_max_ms`), for the `reason` given. Recorded as a \
high-severity `auth.break_glass` event.",
    request_body(content = inline(BreakGlassDoc), content_type = "application/json"),
    responses((status = 200, description = "Elevated until `emergency_until`.", body = Object), (status = 400, description = "`invalid_parameter`.", body = ErrorBody), (status = 403, description = "`forbidden`.", body = ErrorBody)))]
pub async fn break_glass(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: BreakGlass = parse(&body)?;
    blocking(move || state.auth.break_glass(&p, &req.reason, req.minutes)).await.map(Json)
}

// ---- users, sessions, roles, keys, projects, governance ----

#[utoipa::path(get, path = "/api/v1/users", tag = "access", operation_id = "users_list", summary = "List users",
    responses((status = 200, description = "`users`: never a secret.", body = Object)))]
pub async fn list_users(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({"users": state.auth.users()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    grants: Vec<Grant>,
}

#[utoipa::path(post, path = "/api/v1/users", tag = "access", operation_id = "users_create",
    summary = "Create a user",
    description = "Answers the user and a one-time password (shown only now) that must be changed at first login.",
    request_body(content = inline(NewUserDoc), content_type = "application/json"),
    responses((status = 201, description = "Created: `user` and `one_time_password`.", body = Object), (status = 400, description = "`invalid_json` or `invalid_parameter`.", body = ErrorBody), (status = 409, description = "`conflict`: the name is taken.", body = ErrorBody)))]
pub async fn create_user(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewUser = parse(&body)?;
    let (user, password) =
        blocking(move || state.auth.create_user(&p, &req.username, &req.display_name, req.grants))
            .await?;
    Ok((StatusCode::CREATED, Json(json!({"user": user, "one_time_password": password}))))
}

#[utoipa::path(get, path = "/api/v1/users/{id}", tag = "access", operation_id = "users_get", summary = "Read a user",
    params(("id" = String, Path, description = "The user's id.")),
    responses((status = 200, description = "The user.", body = Object), (status = 404, description = "`not_found`.", body = ErrorBody)))]
pub async fn get_user(
    State(state): State<SharedState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.auth.user(&id).map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserChange {
    display_name: Option<String>,
    grants: Option<Vec<Grant>>,
    disabled: Option<bool>,
}

#[utoipa::path(patch, path = "/api/v1/users/{id}", tag = "access", operation_id = "users_update",
    summary = "Change a user's name, grants or disabled flag",
    description = "Recorded as `user.update` with each changed field before and after. Disabling ends the user's sessions.",
    params(("id" = String, Path, description = "The user's id.")),
    request_body(content = inline(UserChangeDoc), content_type = "application/json"),
    responses((status = 200, description = "The user after the change.", body = Object), (status = 400, description = "`invalid_json` or `invalid_parameter`.", body = ErrorBody), (status = 403, description = "`forbidden`: not on yourself.", body = ErrorBody), (status = 404, description = "`not_found`.", body = ErrorBody), (status = 409, description = "`conflict`: the last administrator.", body = ErrorBody)))]
pub async fn update_user(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: UserChange = parse(&body)?;
    blocking(move || state.auth.update_user(&p, &id, req.display_name, req.grants, req.disabled))
        .await
        .map(Json)
}

#[utoipa::path(post, path = "/api/v1/users/{id}/password-reset", tag = "access", operation_id = "users_password_reset",
    summary = "Reset a user's password", description = "A new one-time password (shown only now) to be changed at the next login; the user's sessions end.",
    params(("id" = String, Path, description = "The user's id.")),
    responses((status = 200, description = "`one_time_password`.", body = Object), (status = 404, description = "`not_found`.", body = ErrorBody)))]
pub async fn reset_password(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    blocking(move || state.auth.reset_password(&p, &id))
        .await
        .map(|pw| Json(json!({"one_time_password": pw})))
}

#[utoipa::path(post, path = "/api/v1/users/{id}/mfa-reset", tag = "access", operation_id = "users_mfa_reset",
    summary = "Remove a user's second factor", description = "For a lost device; the user enrols again (at once, if MFA is required). Their sessions end.",
    params(("id" = String, Path, description = "The user's id.")),
    responses((status = 204, description = "Removed."), (status = 404, description = "`not_found`.", body = ErrorBody)))]
pub async fn reset_mfa(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.reset_mfa(&p, &id)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/api/v1/users/{id}/unlock", tag = "access", operation_id = "users_unlock",
    summary = "Unlock a locked account",
    params(("id" = String, Path, description = "The user's id.")),
    responses((status = 204, description = "Unlocked."), (status = 404, description = "`not_found`.", body = ErrorBody)))]
pub async fn unlock(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.unlock(&p, &id)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/sessions", tag = "access", operation_id = "sessions_list",
    summary = "List active sessions",
    params(("user" = Option<String>, Query, description = "Only this user's sessions.")),
    responses((status = 200, description = "`sessions`, oldest first.", body = Object), (status = 400, description = "`unknown_parameter`.", body = ErrorBody)))]
pub async fn list_sessions(
    State(state): State<SharedState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let mut user = None;
    for (k, v) in crate::query::pairs(raw.as_deref())? {
        match k.as_str() {
            "user" => user = Some(v),
            _ => return Err(ApiError::unknown_parameter(&k)),
        }
    }
    Ok(Json(json!({"sessions": state.auth.list_sessions(user.as_deref())})))
}

#[utoipa::path(delete, path = "/api/v1/sessions/{id}", tag = "access", operation_id = "sessions_revoke",
    summary = "Revoke a session", description = "Its access and refresh tokens stop working at once.",
    params(("id" = String, Path, description = "The session's id.")),
    responses((status = 204, description = "Revoked."), (status = 404, description = "`not_found`.", body = ErrorBody)))]
pub async fn revoke_session(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.revoke_session(&p, &id)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/roles", tag = "access", operation_id = "roles_list",
    summary = "List roles and permissions", description = "The built-in roles, the custom ones, and every permission with what it allows.",
    responses((status = 200, description = "`roles` and `permissions`.", body = Object)))]
pub async fn list_roles(State(state): State<SharedState>) -> Json<Value> {
    let permissions: Vec<Value> = Permission::ALL
        .iter()
        .map(|p| json!({"name": p.as_str(), "description": p.describe()}))
        .collect();
    Json(json!({"roles": state.auth.roles(), "permissions": permissions}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoleBody {
    #[serde(default)]
    description: String,
    permissions: BTreeSet<Permission>,
}

#[utoipa::path(put, path = "/api/v1/roles/{name}", tag = "access", operation_id = "roles_put",
    summary = "Create or replace a custom role",
    params(("name" = String, Path, description = "The role's name (lowercase).")),
    request_body(content = inline(RoleDoc), content_type = "application/json"),
    responses((status = 200, description = "The role.", body = Object), (status = 400, description = "`invalid_json` (an unknown permission) or `invalid_parameter`.", body = ErrorBody), (status = 403, description = "`forbidden`: a built-in role.", body = ErrorBody)))]
pub async fn put_role(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let req: RoleBody = parse(&body)?;
    blocking(move || state.auth.put_role(&p, &name, req.description, req.permissions))
        .await
        .map(Json)
}

#[utoipa::path(delete, path = "/api/v1/roles/{name}", tag = "access", operation_id = "roles_delete",
    summary = "Delete a custom role", description = "Refused while any user holds it.",
    params(("name" = String, Path, description = "The role's name.")),
    responses((status = 204, description = "Deleted."), (status = 403, description = "`forbidden`: a built-in role.", body = ErrorBody), (status = 404, description = "`not_found`.", body = ErrorBody), (status = 409, description = "`conflict`: still granted.", body = ErrorBody)))]
pub async fn delete_role(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.delete_role(&p, &name)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/api-keys", tag = "access", operation_id = "api_keys_list",
    summary = "List API keys", description = "Never the secret; with `last_used_at` (updated at most once a minute).",
    responses((status = 200, description = "`api_keys`.", body = Object)))]
pub async fn list_keys(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({"api_keys": state.auth.api_keys()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    name: String,
    scopes: BTreeSet<Permission>,
    #[serde(default)]
    projects: Option<BTreeSet<String>>,
    #[serde(default)]
    networks: Vec<String>,
}

#[utoipa::path(post, path = "/api/v1/api-keys", tag = "access", operation_id = "api_keys_create",
    summary = "Create an API key",
    description = "For a system (an application sending events, a SIEM reading them). `scopes` are \
permissions (e.g. only `events:write`); `projects` and `networks` (CIDR) restrict it further. The \
key (`atk_…`) is in this answer only; it is stored as a SHA-256 digest.",
    request_body(content = inline(NewKeyDoc), content_type = "application/json"),
    responses((status = 201, description = "`api_key` and `key` (the secret, shown once).", body = Object), (status = 400, description = "`invalid_json` or `invalid_parameter`.", body = ErrorBody)))]
pub async fn create_key(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewKey = parse(&body)?;
    let (key, secret) = blocking(move || {
        state.auth.create_api_key(&p, &req.name, req.scopes, req.projects, req.networks)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(json!({"api_key": key, "key": secret}))))
}

#[utoipa::path(delete, path = "/api/v1/api-keys/{id}", tag = "access", operation_id = "api_keys_revoke",
    summary = "Revoke an API key", description = "It stops working at once; the record stays.",
    params(("id" = String, Path, description = "The key's id.")),
    responses((status = 204, description = "Revoked."), (status = 404, description = "`not_found`.", body = ErrorBody), (status = 409, description = "`conflict`: already revoked.", body = ErrorBody)))]
pub async fn revoke_key(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    blocking(move || state.auth.revoke_api_key(&p, &id)).await.map(|_| StatusCode::NO_CONTENT)
}

#[utoipa::path(get, path = "/api/v1/projects", tag = "access", operation_id = "projects_list", summary = "List projects",
    responses((status = 200, description = "`projects`.", body = Object)))]
pub async fn list_projects(State(state): State<SharedState>) -> Json<Value> {
    Json(json!({"projects": state.auth.projects()}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
}

#[utoipa::path(post, path = "/api/v1/projects", tag = "access", operation_id = "projects_create",
    summary = "Create a project", description = "Needs `projects:create`; while the governance setting `only_admins_create_projects` is on, also the `admin` role.",
    request_body(content = inline(NewProjectDoc), content_type = "application/json"),
    responses((status = 201, description = "The project.", body = Object), (status = 400, description = "`invalid_parameter`.", body = ErrorBody), (status = 403, description = "`forbidden`.", body = ErrorBody), (status = 409, description = "`conflict`: it exists.", body = ErrorBody)))]
pub async fn create_project(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let req: NewProject = parse(&body)?;
    blocking(move || state.auth.create_project(&p, &req.name))
        .await
        .map(|v| (StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/api/v1/settings/governance", tag = "access", operation_id = "governance_get", summary = "Governance settings",
    responses((status = 200, description = "The settings.", body = Governance)))]
pub async fn get_governance(State(state): State<SharedState>) -> Json<Governance> {
    Json(state.auth.governance())
}

#[utoipa::path(put, path = "/api/v1/settings/governance", tag = "access", operation_id = "governance_put",
    summary = "Change governance settings", description = "All fields, replaced together; recorded with each changed field before and after.",
    request_body(content = Governance, content_type = "application/json"),
    responses((status = 200, description = "The settings now.", body = Governance), (status = 400, description = "`invalid_json` (every field is required).", body = ErrorBody)))]
pub async fn put_governance(
    State(state): State<SharedState>,
    Extension(p): Extension<Principal>,
    body: Bytes,
) -> Result<Json<Governance>, ApiError> {
    let next: Governance = parse(&body)?;
    for name in next.local_export_exceptions.iter().chain(&next.local_import_exceptions) {
        if !super::roles::valid_name(name) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                format!("{name:?} is not a project name"),
            ));
        }
    }
    let s = state.clone();
    blocking(move || s.auth.set_governance(&p, next)).await?;
    Ok(Json(state.auth.governance()))
}

// ---- request bodies, for the OpenAPI document ----

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct LoginRequestDoc {
    username: String,
    password: String,
    /// The current TOTP code, once MFA is enrolled.
    totp_code: Option<String>,
    /// A one-time recovery code instead of a TOTP code.
    recovery_code: Option<String>,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct TokensDoc {
    access_token: String,
    token_type: String,
    expires_in: i64,
    refresh_token: String,
    session_id: String,
    must_change_password: bool,
    must_enrol_mfa: bool,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct RefreshDoc {
    refresh_token: String,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct PasswordDoc {
    current_password: String,
    new_password: String,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct CodeDoc {
    code: String,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct BreakGlassDoc {
    /// Why, in at least 10 characters.
    reason: String,
    minutes: u32,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct NewUserDoc {
    username: String,
    display_name: Option<String>,
    grants: Option<Vec<Grant>>,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct UserChangeDoc {
    display_name: Option<String>,
    grants: Option<Vec<Grant>>,
    disabled: Option<bool>,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct RoleDoc {
    description: Option<String>,
    /// Permission names, as `GET /api/v1/roles` lists them.
    permissions: Vec<String>,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct NewKeyDoc {
    name: String,
    /// Permission names, e.g. `["events:write"]`.
    scopes: Vec<String>,
    projects: Option<Vec<String>>,
    /// CIDR blocks or addresses the key may be used from.
    networks: Option<Vec<String>>,
}

#[allow(dead_code)]
#[derive(utoipa::ToSchema)]
struct NewProjectDoc {
    name: String,
}

#[cfg(test)]
mod tests {
    use super::forwarded_client;
    use axum::http::{HeaderMap, HeaderValue};

    fn client(peer: &str, forwarded: &[&str], trusted: &[&str]) -> String {
        let mut headers = HeaderMap::new();
        for f in forwarded {
            headers.append("x-forwarded-for", HeaderValue::from_str(f).unwrap());
        }
        let trusted: Vec<String> = trusted.iter().map(|t| t.to_string()).collect();
        forwarded_client(peer.parse().unwrap(), &headers, &trusted).to_string()
    }

    #[test]
    fn x_forwarded_for_counts_only_from_trusted_proxies() {
        let lb = ["10.0.0.0/8"];
        // No trusted proxies, or an untrusted peer: the header is the client's own claim.
        assert_eq!(client("203.0.113.9", &["198.51.100.1"], &[]), "203.0.113.9");
        assert_eq!(client("203.0.113.9", &["198.51.100.1"], &lb), "203.0.113.9");
        // Through the load balancer: the address it received from.
        assert_eq!(client("10.1.1.1", &["198.51.100.1"], &lb), "198.51.100.1");
        // A client that forges a first hop is still named by what the proxy saw.
        assert_eq!(client("10.1.1.1", &["1.2.3.4, 198.51.100.1"], &lb), "198.51.100.1");
        // Two trusted proxies in a row, the header split over two lines.
        assert_eq!(client("10.1.1.1", &["198.51.100.1", "10.2.2.2"], &lb), "198.51.100.1");
        // Only proxies: the farthest one. Garbage or no header: the peer.
        assert_eq!(client("10.1.1.1", &["10.3.3.3, 10.2.2.2"], &lb), "10.3.3.3");
        assert_eq!(client("10.1.1.1", &["unknown"], &lb), "10.1.1.1");
        assert_eq!(client("10.1.1.1", &[], &lb), "10.1.1.1");
        assert_eq!(client("10.1.1.1", &["2001:db8::7"], &lb), "2001:db8::7");
    }
}
