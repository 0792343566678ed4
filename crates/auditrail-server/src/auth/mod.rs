//! Who may do what. [`Auth`] holds the accounts (sealed on disk), the sessions (in memory) and
//! the access-token key, and records every authenticated action as an event of category
//! `repository` in the log itself. It is synchronous and reads time only from its [`Clock`], so
//! lockouts, TOTP windows and session expiry are tested by moving a clock, not by sleeping.
//! `http` holds the middleware that applies the route table (`rules`) and the endpoints.

pub mod accounts;
pub mod http;
pub mod roles;
pub mod rules;
pub mod secrets;
pub mod tokens;

use crate::error::ApiError;
use accounts::{Accounts, AccountsFile, ApiKey, Grant, User};
use auditrail_store::Store;
use axum::http::StatusCode;
use roles::Permission;
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Time for the auth rules, in Unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now_ms(&self) -> i64;
}

#[derive(Debug)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        crate::now_ms()
    }
}

/// A clock tests move by hand.
#[derive(Debug)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(ms: i64) -> ManualClock {
        ManualClock(AtomicI64::new(ms))
    }

    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The rules of sessions and logins (from the configuration).
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub access_token_ttl_ms: i64,
    pub session_idle_timeout_ms: i64,
    pub session_lifetime_ms: i64,
    pub sessions_per_user_max: usize,
    pub lockout_failures: u32,
    pub lockout_duration_ms: i64,
    /// Roles whose holders must use MFA; `*` means everyone.
    pub mfa_required_roles: BTreeSet<String>,
    pub break_glass_duration_max_ms: i64,
    /// The issuer of access tokens (the log's origin).
    pub issuer: String,
}

impl Default for AuthSettings {
    fn default() -> AuthSettings {
        AuthSettings {
            access_token_ttl_ms: 5 * 60_000,
            session_idle_timeout_ms: 30 * 60_000,
            session_lifetime_ms: 12 * 3_600_000,
            sessions_per_user_max: 5,
            lockout_failures: 5,
            lockout_duration_ms: 30 * 60_000,
            mfa_required_roles: ["admin".to_string()].into(),
            break_glass_duration_max_ms: 4 * 3_600_000,
            issuer: "auditrail".into(),
        }
    }
}

/// Why an authenticated principal may only look after its own account for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restriction {
    MustChangePassword,
    MustEnrolMfa,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    User { session_id: String },
    ApiKey,
}

/// Who is asking, with what rights. Rights are resolved at each request from the accounts, so
/// a revoked grant or key stops working at once.
#[derive(Debug, Clone)]
pub struct Principal {
    pub kind: Kind,
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    grants: Vec<(BTreeSet<Permission>, Option<BTreeSet<String>>)>,
    pub restriction: Option<Restriction>,
    /// Break-glass until this time, with its reason.
    pub emergency: Option<(i64, String)>,
    pub ip: Option<IpAddr>,
}

/// Where a permission applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Everywhere,
    Projects(BTreeSet<String>),
    Nowhere,
}

impl Scope {
    /// Where both this scope and `projects` apply.
    pub fn within(&self, projects: &BTreeSet<String>) -> Scope {
        let set: BTreeSet<String> = match self {
            Scope::Everywhere => projects.clone(),
            Scope::Projects(mine) => mine.intersection(projects).cloned().collect(),
            Scope::Nowhere => BTreeSet::new(),
        };
        if set.is_empty() { Scope::Nowhere } else { Scope::Projects(set) }
    }
}

impl Principal {
    /// Whether the principal holds `p` anywhere (in at least one project).
    pub fn can(&self, p: Permission) -> bool {
        self.scope(p) != Scope::Nowhere
    }

    pub fn scope(&self, p: Permission) -> Scope {
        let mut projects = BTreeSet::new();
        let mut any = false;
        for (perms, on) in &self.grants {
            if !perms.contains(&p) {
                continue;
            }
            any = true;
            match on {
                None => return Scope::Everywhere,
                Some(set) => projects.extend(set.iter().cloned()),
            }
        }
        match (any, projects.is_empty()) {
            (false, _) | (true, true) => Scope::Nowhere,
            (true, false) => Scope::Projects(projects),
        }
    }

    pub fn session_id(&self) -> Option<&str> {
        match &self.kind {
            Kind::User { session_id } => Some(session_id),
            Kind::ApiKey => None,
        }
    }

    /// The `actor` of the repository events this principal causes.
    pub fn actor(&self) -> Value {
        let mut a = json!({"user_id": self.id, "name": self.name, "roles": self.roles});
        if let Some(ip) = self.ip {
            a["ip"] = ip.to_string().into();
        }
        match &self.kind {
            Kind::User { session_id } => a["session_id"] = session_id.clone().into(),
            Kind::ApiKey => a["client_id"] = self.id.clone().into(),
        }
        a
    }
}

#[derive(Debug, Clone)]
struct Session {
    user_id: String,
    created_ms: i64,
    last_seen_ms: i64,
    ip: Option<IpAddr>,
    refresh_digest: String,
    emergency: Option<(i64, String)>,
}

/// What a successful login or refresh hands back.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Tokens {
    pub access_token: String,
    pub token_type: &'static str,
    /// Seconds the access token is valid.
    pub expires_in: i64,
    /// Exchange at `POST /api/v1/auth/refresh` for a new access token; single use.
    pub refresh_token: String,
    pub session_id: String,
    pub must_change_password: bool,
    pub must_enrol_mfa: bool,
}

/// Login input.
#[derive(Debug, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
    /// The current TOTP code, once MFA is enrolled.
    #[serde(default)]
    pub totp_code: Option<String>,
    /// A one-time recovery code instead of a TOTP code.
    #[serde(default)]
    pub recovery_code: Option<String>,
}

pub const API_KEY_PREFIX: &str = "atk_";

pub struct Auth {
    pub settings: AuthSettings,
    clock: Arc<dyn Clock>,
    file: AccountsFile,
    accounts: RwLock<Accounts>,
    /// Serialises changes: read, change, save, then publish.
    writer: Mutex<()>,
    sessions: Mutex<HashMap<String, Session>>,
    tokens: tokens::TokenKeys,
    store: Arc<Store>,
    /// API keys' last use, kept here and written with the next save (at most once a minute).
    key_last_used: Mutex<(HashMap<String, i64>, i64)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth").field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn unauthenticated(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
}

fn invalid_credentials() -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
        "the user name, password or code is wrong",
    )
}

/// What a read's handler adds to the context of the read's trace (an object's members), as a
/// response extension: how many events an export held, say.
#[derive(Debug, Clone)]
pub struct TraceDetail(pub Value);

pub fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "conflict", message)
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::bad_request(code, message)
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::now_v7().simple())
}

fn ms_text(ms: i64) -> String {
    auditrail_core::time::format_millis(ms)
}

impl Auth {
    /// Loads the accounts, or on a new data directory creates the bootstrap `admin` with a
    /// one-time password written to `auth/initial-admin-password` (mode 0600) and never
    /// printed: its path is returned so the caller can say where it is.
    pub fn open(
        data: &Path,
        store: Arc<Store>,
        settings: AuthSettings,
        clock: Arc<dyn Clock>,
    ) -> Result<(Auth, Option<PathBuf>), String> {
        let file = AccountsFile::new(data, store.master_keys().clone());
        let (accounts, bootstrap) = match file.load()? {
            Some(a) => (a, None),
            None => {
                let password = secrets::generated_password();
                let now = clock.now_ms();
                let admin = User {
                    id: new_id("usr_"),
                    username: "admin".into(),
                    display_name: "Administrator".into(),
                    password_hash: secrets::hash_password(&password),
                    must_change_password: true,
                    grants: vec![Grant { role: "admin".into(), projects: None }],
                    totp: None,
                    recovery_codes: Vec::new(),
                    failed_logins: 0,
                    locked_until_ms: 0,
                    disabled: false,
                    created_ms: now,
                    password_changed_ms: now,
                };
                let accounts = Accounts { users: vec![admin], ..Accounts::default() };
                let path = data.join(accounts::INITIAL_PASSWORD_PATH);
                accounts::write_private_file(&path, format!("{password}\n").as_bytes())?;
                file.save(&accounts)?;
                (accounts, Some(path))
            }
        };
        let auth = Auth {
            tokens: tokens::TokenKeys::generate(&settings.issuer),
            settings,
            clock,
            file,
            accounts: RwLock::new(accounts),
            writer: Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            store,
            key_last_used: Mutex::new((HashMap::new(), 0)),
        };
        if bootstrap.is_some() {
            let admin = auth.read().users[0].clone();
            auth.record(
                &json!({"user_id": "auditrail", "name": "auditrail"}),
                "user.create",
                "success",
                json!({"reason": "bootstrap: the first administrator"}),
                vec![change("user", Value::Null, admin.public())],
            )
            .map_err(|e| e.message)?;
        }
        Ok((auth, bootstrap))
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Saves what is only in memory (API keys' last use), at shutdown.
    pub fn flush(&self) {
        let pending = !lock(&self.key_last_used).0.is_empty();
        if pending && let Err(e) = self.update(|_| Ok(())) {
            eprintln!("auditrail: cannot save API key use times: {}", e.message);
        }
    }

    /// The server itself as a principal: for what the operator does from the command line
    /// (provisioning API keys before the first start), with every permission.
    pub fn system() -> Principal {
        Principal {
            kind: Kind::ApiKey,
            id: "auditrail".into(),
            name: "auditrail (command line)".into(),
            roles: vec!["admin".into()],
            grants: vec![(Permission::ALL.iter().copied().collect(), None)],
            restriction: None,
            emergency: None,
            ip: None,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Accounts> {
        self.accounts.read().unwrap_or_else(|e| e.into_inner())
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        lock(&self.sessions)
    }

    /// Applies `f` to a copy of the accounts, saves the copy, then makes it current. A failed
    /// save changes nothing.
    fn update<T>(
        &self,
        f: impl FnOnce(&mut Accounts) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let _w = lock(&self.writer);
        let mut next = self.read().clone();
        let out = f(&mut next)?;
        self.merge_last_used(&mut next, true);
        self.file.save(&next).map_err(ApiError::internal)?;
        *self.accounts.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(out)
    }

    /// Folds the API keys' last-use times kept in memory into `accounts`; `taken` when they
    /// are about to be saved (they are then no longer pending).
    fn merge_last_used(&self, accounts: &mut Accounts, taken: bool) {
        let mut used = lock(&self.key_last_used);
        for k in &mut accounts.api_keys {
            if let Some(&t) = used.0.get(&k.id) {
                k.last_used_ms = k.last_used_ms.max(t);
            }
        }
        if taken {
            used.0.clear();
            used.1 = self.now_ms();
        }
    }

    /// Appends a repository event and waits until it is durable: account changes and logins
    /// are never acknowledged without their record.
    pub fn record(
        &self,
        actor: &Value,
        action: &str,
        outcome: &str,
        context: Value,
        changes: Vec<Value>,
    ) -> Result<(), ApiError> {
        let event = repository_event(actor, action, outcome, context, changes);
        let prepared = auditrail_store::retention::repository_event(event)?;
        self.store.append(vec![prepared])?;
        Ok(())
    }

    /// Queues a repository event for the next group commit without waiting (the trace of a
    /// read). If the log cannot take it, the read is refused: no read goes unrecorded.
    pub fn trace(&self, event: Value) -> Result<(), ApiError> {
        let prepared = auditrail_store::retention::repository_event(event)?;
        self.store.submit(vec![prepared])?;
        Ok(())
    }

    fn mfa_required_for(&self, user: &User) -> bool {
        let required = &self.settings.mfa_required_roles;
        required.contains("*") || user.grants.iter().any(|g| required.contains(&g.role))
    }

    fn principal_for_user(
        &self,
        accounts: &Accounts,
        user: &User,
        session_id: &str,
        session: &Session,
        ip: Option<IpAddr>,
    ) -> Principal {
        let now = self.now_ms();
        let emergency = session.emergency.clone().filter(|(until, _)| *until > now);
        let mut grants = accounts.resolve(&user.grants);
        if emergency.is_some() {
            grants.push((roles::EMERGENCY_GRANTS.iter().copied().collect(), None));
        }
        let restriction = if user.must_change_password {
            Some(Restriction::MustChangePassword)
        } else if self.mfa_required_for(user) && !user.mfa_enrolled() {
            Some(Restriction::MustEnrolMfa)
        } else {
            None
        };
        Principal {
            kind: Kind::User { session_id: session_id.to_string() },
            id: user.id.clone(),
            name: user.username.clone(),
            roles: user.role_names(),
            grants,
            restriction,
            emergency,
            ip,
        }
    }

    // ---- logins and sessions ----

    /// Checks a password (and the second factor once enrolled); counts failures and locks the
    /// account after `lockout_failures` of them.
    pub fn login(&self, req: &LoginRequest, ip: Option<IpAddr>) -> Result<Tokens, ApiError> {
        let now = self.now_ms();
        let attempt = |name: &str| {
            let mut a = json!({"user_id": name, "name": name});
            if let Some(ip) = ip {
                a["ip"] = ip.to_string().into();
            }
            a
        };
        let user = self.read().user_by_name(&req.username).cloned();
        let Some(user) = user.filter(|u| !u.disabled) else {
            // The same work as a real check, so timing does not tell which names exist.
            secrets::verify_password(&req.password, secrets::decoy_hash());
            self.record(
                &attempt(&req.username),
                "auth.login",
                "failure",
                json!({"reason": "unknown or disabled user"}),
                vec![],
            )?;
            return Err(invalid_credentials());
        };
        let actor = attempt(&user.username);
        if user.locked_until_ms > now {
            self.record(
                &actor,
                "auth.login",
                "failure",
                json!({"reason": "account locked"}),
                vec![],
            )?;
            return Err(locked(user.locked_until_ms - now));
        }
        let password_ok = secrets::verify_password(&req.password, &user.password_hash);
        let second_factor = if !password_ok {
            Err("wrong password")
        } else if !user.mfa_enrolled() {
            Ok(None)
        } else if let Some(code) = req.totp_code.as_deref() {
            let totp = user.totp.as_ref().expect("enrolled");
            match secrets::totp_step(&totp.secret, code, now) {
                Some(step) if step > totp.last_step => Ok(Some(SecondFactor::Totp(step))),
                Some(_) => Err("TOTP code already used"),
                None => Err("wrong TOTP code"),
            }
        } else if let Some(code) = req.recovery_code.as_deref() {
            let d = secrets::digest(&secrets::normalise_recovery_code(code));
            match user.recovery_codes.iter().position(|c| secrets::same(c, &d)) {
                Some(i) => Ok(Some(SecondFactor::Recovery(i))),
                None => Err("wrong recovery code"),
            }
        } else {
            self.record(
                &actor,
                "auth.login",
                "failure",
                json!({"reason": "second factor missing"}),
                vec![],
            )?;
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "mfa_required",
                "this account uses a second factor: send totp_code or recovery_code",
            ));
        };
        let factor = match second_factor {
            Ok(f) => f,
            Err(reason) => return Err(self.login_failed(&user.id, &actor, reason)),
        };
        let user = self.update(|a| {
            let u = a.user_mut(&user.id).ok_or_else(invalid_credentials)?;
            u.failed_logins = 0;
            u.locked_until_ms = 0;
            match factor {
                Some(SecondFactor::Totp(step)) => {
                    if let Some(t) = u.totp.as_mut() {
                        t.last_step = step;
                    }
                }
                Some(SecondFactor::Recovery(i)) => {
                    u.recovery_codes.remove(i);
                }
                None => {}
            }
            Ok(u.clone())
        })?;
        let (session_id, tokens, evicted) = self.new_session(&user, ip, now);
        for old in evicted {
            self.record(
                &actor,
                "auth.session.revoke",
                "success",
                json!({"session": old, "reason": "concurrent session limit"}),
                vec![],
            )?;
        }
        let mut ctx = json!({"session": session_id});
        if matches!(factor, Some(SecondFactor::Recovery(_))) {
            ctx["second_factor"] = "recovery code".into();
        }
        let mut actor = actor;
        actor["user_id"] = user.id.clone().into();
        actor["session_id"] = session_id.into();
        actor["roles"] = json!(user.role_names());
        self.record(&actor, "auth.login", "success", ctx, vec![])?;
        Ok(tokens)
    }

    /// Counts a failed login; the one that reaches the limit locks the account (an event of
    /// its own).
    fn login_failed(&self, user_id: &str, actor: &Value, reason: &str) -> ApiError {
        let now = self.now_ms();
        let limit = self.settings.lockout_failures;
        let until = now + self.settings.lockout_duration_ms;
        let locked_now = self.update(|a| {
            let u = a.user_mut(user_id).ok_or_else(invalid_credentials)?;
            u.failed_logins += 1;
            if u.failed_logins >= limit {
                u.failed_logins = 0;
                u.locked_until_ms = until;
                return Ok(true);
            }
            Ok(false)
        });
        let result = self
            .record(actor, "auth.login", "failure", json!({"reason": reason}), vec![])
            .and_then(|_| match locked_now {
                Ok(true) => self
                    .record(
                        actor,
                        "auth.lockout",
                        "success",
                        json!({"severity": "high", "failures": limit.to_string(), "locked_until": ms_text(until)}),
                        vec![],
                    )
                    .map(|_| Some(locked(until - now))),
                Ok(false) => Ok(None),
                Err(e) => Err(e),
            });
        match result {
            Ok(Some(e)) => e,
            Ok(None) => invalid_credentials(),
            Err(e) => e,
        }
    }

    fn new_session(
        &self,
        user: &User,
        ip: Option<IpAddr>,
        now: i64,
    ) -> (String, Tokens, Vec<String>) {
        let session_id = new_id("ses_");
        let refresh = secrets::random_token();
        let mut sessions = self.sessions();
        let mut evicted = Vec::new();
        loop {
            let mine: Vec<(&String, &Session)> =
                sessions.iter().filter(|(_, s)| s.user_id == user.id).collect();
            if mine.len() < self.settings.sessions_per_user_max.max(1) {
                break;
            }
            let oldest = mine
                .iter()
                .min_by_key(|(id, s)| (s.created_ms, (*id).clone()))
                .map(|(id, _)| (*id).clone());
            let Some(oldest) = oldest else { break };
            sessions.remove(&oldest);
            evicted.push(oldest);
        }
        sessions.insert(
            session_id.clone(),
            Session {
                user_id: user.id.clone(),
                created_ms: now,
                last_seen_ms: now,
                ip,
                refresh_digest: secrets::digest(&refresh),
                emergency: None,
            },
        );
        let tokens = self.tokens_for(user, &session_id, refresh, now);
        (session_id, tokens, evicted)
    }

    /// A new access token for the session, with its (new) refresh token and what the user
    /// must do first.
    fn tokens_for(&self, user: &User, session_id: &str, refresh: String, now: i64) -> Tokens {
        let ttl = self.settings.access_token_ttl_ms;
        Tokens {
            access_token: self.tokens.issue(&user.id, session_id, now, ttl),
            token_type: "Bearer",
            expires_in: ttl / 1000,
            refresh_token: refresh,
            session_id: session_id.to_string(),
            must_change_password: user.must_change_password,
            must_enrol_mfa: self.mfa_required_for(user) && !user.mfa_enrolled(),
        }
    }

    /// Ends a session that is idle too long or past its lifetime; says why.
    fn expired(&self, s: &Session, now: i64) -> Option<&'static str> {
        if now - s.last_seen_ms > self.settings.session_idle_timeout_ms {
            Some("idle timeout")
        } else if now - s.created_ms > self.settings.session_lifetime_ms {
            Some("session lifetime reached")
        } else {
            None
        }
    }

    /// Resolves `Authorization: Bearer <token>`: an API key (`atk_…`) or an access token.
    /// May wait for the log or the disk (see [`Auth::authenticate_in_memory`]).
    pub fn authenticate(&self, bearer: &str, ip: Option<IpAddr>) -> Result<Principal, ApiError> {
        let resolved = self.resolve(bearer, ip, Writes::MayWait)?;
        Ok(resolved.expect("a resolution that may wait always finishes"))
    }

    /// [`Auth::authenticate`] for an async thread: never waits. `Ok(None)` when this request
    /// must write first (a session that ended or changed address is recorded in the log; API
    /// key use times are saved once a minute); nothing has changed then, and
    /// [`Auth::authenticate`] on a blocking thread does it all. Nearly every request is
    /// resolved here, without handing it to another thread and back.
    pub fn authenticate_in_memory(
        &self,
        bearer: &str,
        ip: Option<IpAddr>,
    ) -> Result<Option<Principal>, ApiError> {
        self.resolve(bearer, ip, Writes::MustNotWait)
    }

    fn resolve(
        &self,
        bearer: &str,
        ip: Option<IpAddr>,
        writes: Writes,
    ) -> Result<Option<Principal>, ApiError> {
        if let Some(rest) = bearer.strip_prefix(API_KEY_PREFIX) {
            return self.authenticate_key(rest, ip, writes);
        }
        let now = self.now_ms();
        let claims = match self.tokens.verify(bearer, now) {
            Ok(c) => c,
            Err(tokens::TokenError::Expired) => {
                return Err(unauthenticated("the access token expired; refresh it or log in"));
            }
            Err(tokens::TokenError::Invalid) => {
                return Err(unauthenticated("the access token is not valid"));
            }
        };
        let (session, ended, moved) = {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(&claims.sid) else {
                return Err(unauthenticated("the session has ended; log in again"));
            };
            if s.user_id != claims.sub {
                return Err(unauthenticated("the access token is not valid"));
            }
            let ended = self.expired(s, now);
            let moved = (ip.is_some() && s.ip != ip).then_some((s.ip, ip));
            if (ended.is_some() || moved.is_some()) && writes == Writes::MustNotWait {
                // Both are recorded in the log: left, unchanged, to a caller that may wait.
                return Ok(None);
            }
            if let Some(why) = ended {
                let s = sessions.remove(&claims.sid).expect("present");
                (s, Some(why), None)
            } else {
                s.last_seen_ms = now;
                if moved.is_some() {
                    s.ip = ip;
                }
                (s.clone(), None, moved)
            }
        };
        let accounts = self.read();
        let user = accounts.user(&claims.sub).filter(|u| !u.disabled).cloned();
        drop(accounts);
        let actor = json!({"user_id": claims.sub, "session_id": claims.sid});
        if let Some(why) = ended {
            self.record(&actor, "auth.session.expire", "success", json!({"reason": why}), vec![])?;
            return Err(unauthenticated(&format!("the session ended ({why}); log in again")));
        }
        let Some(user) = user else {
            self.end_session(&claims.sid);
            return Err(unauthenticated("the account is disabled"));
        };
        let principal = self.principal_for_user(&self.read(), &user, &claims.sid, &session, ip);
        if let Some((before, after)) = moved {
            let show = |ip: Option<IpAddr>| ip.map_or(Value::Null, |i| i.to_string().into());
            self.record(
                &principal.actor(),
                "auth.session.ip_change",
                "success",
                json!({"severity": "medium"}),
                vec![change("ip", show(before), show(after))],
            )?;
        }
        Ok(Some(principal))
    }

    fn authenticate_key(
        &self,
        rest: &str,
        ip: Option<IpAddr>,
        writes: Writes,
    ) -> Result<Option<Principal>, ApiError> {
        let bad_key = || unauthenticated("the API key is not valid");
        let (id, secret) = rest.split_once('_').ok_or_else(bad_key)?;
        let key = self.read().api_keys.iter().find(|k| k.id == id).cloned().ok_or_else(bad_key)?;
        if !secrets::same(&key.digest, &secrets::digest(secret)) || key.revoked_ms != 0 {
            return Err(bad_key());
        }
        if !key.networks.is_empty()
            && !ip.is_some_and(|ip| key.networks.iter().any(|n| accounts::network_contains(n, ip)))
        {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "network_forbidden",
                "this API key may not be used from this address",
            ));
        }
        let now = self.now_ms();
        let flush = {
            let mut used = lock(&self.key_last_used);
            let flush = now - used.1 > 60_000;
            if flush && writes == Writes::MustNotWait {
                return Ok(None);
            }
            used.0.insert(key.id.clone(), now);
            flush
        };
        if flush {
            // Written at most once a minute; a failure here must not fail the request.
            if let Err(e) = self.update(|_| Ok(())) {
                eprintln!("auditrail: cannot save API key use times: {}", e.message);
            }
        }
        Ok(Some(Principal {
            kind: Kind::ApiKey,
            id: format!("key_{}", key.id),
            name: key.name.clone(),
            roles: Vec::new(),
            grants: vec![(key.scopes.clone(), key.projects.clone())],
            restriction: None,
            emergency: None,
            ip,
        }))
    }

    fn end_session(&self, id: &str) -> bool {
        self.sessions().remove(id).is_some()
    }

    pub fn refresh(&self, refresh_token: &str, ip: Option<IpAddr>) -> Result<Tokens, ApiError> {
        let now = self.now_ms();
        let digest = secrets::digest(refresh_token);
        let (session_id, session, ended) = {
            let mut sessions = self.sessions();
            let found = sessions
                .iter()
                .find(|(_, s)| secrets::same(&s.refresh_digest, &digest))
                .map(|(id, s)| (id.clone(), s.clone()));
            let Some((id, s)) = found else {
                return Err(unauthenticated("the refresh token is not valid (each works once)"));
            };
            match self.expired(&s, now) {
                Some(why) => {
                    sessions.remove(&id);
                    (id, s, Some(why))
                }
                None => (id, s, None),
            }
        };
        let actor = json!({"user_id": session.user_id, "session_id": session_id});
        if let Some(why) = ended {
            self.record(&actor, "auth.session.expire", "success", json!({"reason": why}), vec![])?;
            return Err(unauthenticated(&format!("the session ended ({why}); log in again")));
        }
        let user = self.read().user(&session.user_id).filter(|u| !u.disabled).cloned();
        let Some(user) = user else {
            self.end_session(&session_id);
            return Err(unauthenticated("the account is disabled"));
        };
        let refresh = secrets::random_token();
        {
            let mut sessions = self.sessions();
            let Some(s) = sessions.get_mut(&session_id) else {
                return Err(unauthenticated("the session has ended; log in again"));
            };
            s.refresh_digest = secrets::digest(&refresh);
            s.last_seen_ms = now;
        }
        let principal = self.principal_for_user(&self.read(), &user, &session_id, &session, ip);
        self.record(&principal.actor(), "auth.token.refresh", "success", json!({}), vec![])?;
        Ok(self.tokens_for(&user, &session_id, refresh, now))
    }

    pub fn logout(&self, p: &Principal) -> Result<(), ApiError> {
        if let Some(sid) = p.session_id() {
            self.end_session(sid);
        }
        self.record(&p.actor(), "auth.logout", "success", json!({}), vec![])
    }

    /// The sessions of one user, or of everyone.
    pub fn list_sessions(&self, user_id: Option<&str>) -> Vec<Value> {
        let now = self.now_ms();
        let sessions = self.sessions();
        let mut out: Vec<(i64, Value)> = sessions
            .iter()
            .filter(|(_, s)| user_id.is_none_or(|u| s.user_id == u) && self.expired(s, now).is_none())
            .map(|(id, s)| {
                (
                    s.created_ms,
                    json!({
                        "id": id,
                        "user_id": s.user_id,
                        "created_at": ms_text(s.created_ms),
                        "last_seen_at": ms_text(s.last_seen_ms),
                        "ip": s.ip.map(|i| i.to_string()),
                        "emergency_until": s.emergency.as_ref().filter(|e| e.0 > now).map(|e| ms_text(e.0)),
                    }),
                )
            })
            .collect();
        out.sort_by_key(|(t, _)| *t);
        out.into_iter().map(|(_, v)| v).collect()
    }

    pub fn revoke_session(&self, by: &Principal, id: &str) -> Result<(), ApiError> {
        let owner = {
            let mut sessions = self.sessions();
            sessions.remove(id).map(|s| s.user_id)
        };
        let Some(owner) = owner else {
            return Err(ApiError::not_found(format!("no active session {id:?}")));
        };
        self.record(
            &by.actor(),
            "auth.session.revoke",
            "success",
            json!({"session": id, "user": owner, "reason": "revoked by an administrator"}),
            vec![],
        )
    }

    // ---- one's own account ----

    pub fn me(&self, p: &Principal) -> Value {
        let mut me = json!({
            "id": p.id,
            "name": p.name,
            "kind": match p.kind { Kind::User { .. } => "user", Kind::ApiKey => "api_key" },
            "roles": p.roles,
            "permissions": Permission::ALL.iter().filter(|x| p.can(**x)).map(|x| x.as_str()).collect::<Vec<_>>(),
            "must_change_password": p.restriction == Some(Restriction::MustChangePassword),
            "must_enrol_mfa": p.restriction == Some(Restriction::MustEnrolMfa),
            "session_id": p.session_id(),
            "emergency_until": p.emergency.as_ref().map(|e| ms_text(e.0)),
        });
        if let Some(u) = self.read().user(&p.id) {
            me["mfa_enrolled"] = u.mfa_enrolled().into();
        }
        me
    }

    fn own_user(&self, p: &Principal) -> Result<User, ApiError> {
        if p.kind == Kind::ApiKey {
            return Err(forbidden("API keys have no password or second factor"));
        }
        self.read().user(&p.id).cloned().ok_or_else(|| unauthenticated("the account is gone"))
    }

    pub fn change_password(&self, p: &Principal, current: &str, new: &str) -> Result<(), ApiError> {
        let user = self.own_user(p)?;
        if !secrets::verify_password(current, &user.password_hash) {
            self.record(
                &p.actor(),
                "user.password.change",
                "failure",
                json!({"reason": "wrong current password"}),
                vec![],
            )?;
            return Err(invalid_credentials());
        }
        if current == new {
            return Err(ApiError::bad_request(
                "weak_password",
                "the new password must differ from the current one",
            ));
        }
        secrets::check_password_policy(new, &[&user.username, &user.display_name])
            .map_err(|m| ApiError::bad_request("weak_password", m))?;
        let hash = secrets::hash_password(new);
        let now = self.now_ms();
        self.update(|a| {
            let u = user_mut(a, &user.id)?;
            u.password_hash = hash;
            u.must_change_password = false;
            u.password_changed_ms = now;
            Ok(())
        })?;
        self.record(
            &p.actor(),
            "user.password.change",
            "success",
            json!({}),
            vec![change("must_change_password", user.must_change_password.into(), false.into())],
        )?;
        Ok(())
    }

    /// Starts TOTP enrolment: a new secret (not yet protecting logins) and its `otpauth://` URI.
    pub fn totp_begin(&self, p: &Principal) -> Result<Value, ApiError> {
        let user = self.own_user(p)?;
        if user.mfa_enrolled() {
            return Err(conflict(
                "TOTP is already enrolled; remove it first to enrol a new device",
            ));
        }
        let secret = secrets::random_bytes::<20>().to_vec();
        let totp =
            secrets::totp(&secret, "auditrail", &user.username).map_err(ApiError::internal)?;
        let uri = totp.to_url().map_err(ApiError::internal)?;
        let b32 = totp.secret().to_base32();
        self.update(|a| {
            let u = user_mut(a, &user.id)?;
            u.totp = Some(accounts::Totp { secret, confirmed: false, last_step: 0 });
            Ok(())
        })?;
        self.record(&p.actor(), "user.mfa.enrol.start", "success", json!({}), vec![])?;
        Ok(
            json!({"secret": b32, "otpauth_uri": uri, "digits": 6, "period": 30, "algorithm": "SHA1"}),
        )
    }

    /// Confirms enrolment with a first code; answers the recovery codes, shown this once.
    pub fn totp_confirm(&self, p: &Principal, code: &str) -> Result<Vec<String>, ApiError> {
        let user = self.own_user(p)?;
        let Some(totp) = user.totp.as_ref().filter(|t| !t.confirmed) else {
            return Err(conflict("no TOTP enrolment is pending; start one first"));
        };
        let Some(step) = secrets::totp_step(&totp.secret, code, self.now_ms()) else {
            self.record(
                &p.actor(),
                "user.mfa.enrol.confirm",
                "failure",
                json!({"reason": "wrong code"}),
                vec![],
            )?;
            return Err(invalid_credentials());
        };
        let codes = secrets::recovery_codes();
        let digests: Vec<String> =
            codes.iter().map(|c| secrets::digest(&secrets::normalise_recovery_code(c))).collect();
        self.update(|a| {
            let u = user_mut(a, &user.id)?;
            if let Some(t) = u.totp.as_mut() {
                t.confirmed = true;
                t.last_step = step;
            }
            u.recovery_codes = digests;
            Ok(())
        })?;
        self.record(
            &p.actor(),
            "user.mfa.enrol",
            "success",
            json!({}),
            vec![change("mfa_enrolled", false.into(), true.into())],
        )?;
        Ok(codes)
    }

    /// Removes one's own TOTP, proven with a current code (refused while MFA is required).
    pub fn totp_remove(&self, p: &Principal, code: &str) -> Result<(), ApiError> {
        let user = self.own_user(p)?;
        let Some(totp) = user.totp.as_ref().filter(|t| t.confirmed) else {
            return Err(conflict("no TOTP is enrolled"));
        };
        if self.mfa_required_for(&user) {
            return Err(forbidden("MFA is required for this account's roles"));
        }
        if secrets::totp_step(&totp.secret, code, self.now_ms()).is_none() {
            return Err(invalid_credentials());
        }
        self.update(|a| {
            let u = user_mut(a, &user.id)?;
            u.totp = None;
            u.recovery_codes.clear();
            Ok(())
        })?;
        self.record(
            &p.actor(),
            "user.mfa.remove",
            "success",
            json!({}),
            vec![change("mfa_enrolled", true.into(), false.into())],
        )
    }

    /// Break-glass: adds [`roles::EMERGENCY_GRANTS`] to this session for a bounded time.
    pub fn break_glass(
        &self,
        p: &Principal,
        reason: &str,
        minutes: u32,
    ) -> Result<Value, ApiError> {
        let Some(sid) = p.session_id() else {
            return Err(forbidden("break-glass is for people, in a session"));
        };
        let reason = reason.trim();
        if reason.chars().count() < 10 {
            return Err(bad("invalid_parameter", "reason: say why, in at least 10 characters"));
        }
        if reason.len() > 1000 {
            return Err(bad("invalid_parameter", "reason: at most 1000 bytes"));
        }
        let duration = i64::from(minutes) * 60_000;
        if minutes == 0 || duration > self.settings.break_glass_duration_max_ms {
            return Err(bad(
                "invalid_parameter",
                format!(
                    "minutes: must be 1 to {}",
                    self.settings.break_glass_duration_max_ms / 60_000
                ),
            ));
        }
        let until = self.now_ms() + duration;
        {
            let mut sessions = self.sessions();
            let s =
                sessions.get_mut(sid).ok_or_else(|| unauthenticated("the session has ended"))?;
            s.emergency = Some((until, reason.to_string()));
        }
        let granted: Vec<&str> = roles::EMERGENCY_GRANTS.iter().map(|g| g.as_str()).collect();
        self.record(
            &p.actor(),
            "auth.break_glass",
            "success",
            json!({"severity": "high", "reason": reason, "until": ms_text(until), "granted": granted.join(" ")}),
            vec![],
        )?;
        Ok(json!({"emergency_until": ms_text(until), "granted": granted}))
    }

    // ---- administration ----

    /// Accounts at a glance, for the security status: how many use MFA, how many that must
    /// do not, how many are locked out now.
    pub fn account_summary(&self) -> Value {
        let now = self.now_ms();
        let accounts = self.read();
        let active: Vec<&User> = accounts.users.iter().filter(|u| !u.disabled).collect();
        let enrolled = active.iter().filter(|u| u.mfa_enrolled()).count();
        let required_without =
            active.iter().filter(|u| self.mfa_required_for(u) && !u.mfa_enrolled()).count();
        let locked = active.iter().filter(|u| u.locked_until_ms > now).count();
        let coverage = match active.len() {
            0 => 1.0,
            n => enrolled as f64 / n as f64,
        };
        json!({
            "users": active.len(),
            "mfa_enrolled": enrolled,
            "mfa_coverage": (coverage * 1000.0).round() / 1000.0,
            "mfa_required_roles": self.settings.mfa_required_roles,
            "mfa_required_but_not_enrolled": required_without,
            "locked_now": locked,
        })
    }

    pub fn users(&self) -> Vec<Value> {
        self.read().users.iter().map(User::public).collect()
    }

    pub fn user(&self, id: &str) -> Result<Value, ApiError> {
        self.read()
            .user(id)
            .map(User::public)
            .ok_or_else(|| ApiError::not_found(format!("no user {id:?}")))
    }

    fn check_grants(accounts: &Accounts, grants: &[Grant]) -> Result<(), ApiError> {
        for g in grants {
            if accounts.role_permissions(&g.role).is_none() {
                return Err(bad("invalid_parameter", format!("grants: no role {:?}", g.role)));
            }
            if let Some(projects) = &g.projects {
                if projects.is_empty() {
                    return Err(bad(
                        "invalid_parameter",
                        "grants: projects, when given, names at least one",
                    ));
                }
                if let Some(p) = projects.iter().find(|p| !roles::valid_name(p)) {
                    return Err(bad(
                        "invalid_parameter",
                        format!("grants: {p:?} is not a project name"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Creates a user with a one-time password (returned once) that must be changed at first
    /// login.
    pub fn create_user(
        &self,
        by: &Principal,
        username: &str,
        display_name: &str,
        grants: Vec<Grant>,
    ) -> Result<(Value, String), ApiError> {
        let ok_name = (1..=64).contains(&username.len())
            && username.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !ok_name {
            return Err(bad(
                "invalid_parameter",
                "username: 1 to 64 letters, digits, '.', '_', '-' or '@'",
            ));
        }
        if display_name.len() > 256 {
            return Err(bad("invalid_parameter", "display_name: at most 256 bytes"));
        }
        let password = secrets::generated_password();
        let hash = secrets::hash_password(&password);
        let now = self.now_ms();
        let user = self.update(|a| {
            if a.user_by_name(username).is_some() {
                return Err(conflict(format!("a user named {username:?} exists")));
            }
            Self::check_grants(a, &grants)?;
            let user = User {
                id: new_id("usr_"),
                username: username.to_string(),
                display_name: display_name.to_string(),
                password_hash: hash,
                must_change_password: true,
                grants,
                totp: None,
                recovery_codes: Vec::new(),
                failed_logins: 0,
                locked_until_ms: 0,
                disabled: false,
                created_ms: now,
                password_changed_ms: now,
            };
            a.users.push(user.clone());
            Ok(user)
        })?;
        self.record(
            &by.actor(),
            "user.create",
            "success",
            json!({"user": user.id}),
            vec![change("user", Value::Null, user.public())],
        )?;
        Ok((user.public(), password))
    }

    /// Changes a user's display name, grants or disabled flag; the event holds before and after.
    pub fn update_user(
        &self,
        by: &Principal,
        id: &str,
        display_name: Option<String>,
        grants: Option<Vec<Grant>>,
        disabled: Option<bool>,
    ) -> Result<Value, ApiError> {
        if by.id == id && (disabled == Some(true) || grants.is_some()) {
            return Err(forbidden("you cannot disable yourself or change your own grants"));
        }
        let (before, after) = self.update(|a| {
            if let Some(g) = &grants {
                Self::check_grants(a, g)?;
            }
            let u = user_mut(a, id)?;
            let before = u.public();
            if let Some(d) = display_name {
                if d.len() > 256 {
                    return Err(bad("invalid_parameter", "display_name: at most 256 bytes"));
                }
                u.display_name = d;
            }
            if let Some(g) = grants {
                u.grants = g;
            }
            if let Some(d) = disabled {
                u.disabled = d;
            }
            let after = u.public();
            let admins_left = a
                .users
                .iter()
                .filter(|u| {
                    !u.disabled
                        && u.grants.iter().any(|g| g.role == "admin" && g.projects.is_none())
                })
                .count();
            if admins_left == 0 {
                return Err(conflict("the last administrator cannot lose the admin role"));
            }
            Ok((before, after))
        })?;
        if disabled == Some(true) {
            self.sessions().retain(|_, s| s.user_id != id);
        }
        self.record(
            &by.actor(),
            "user.update",
            "success",
            json!({"user": id}),
            diff(&before, &after),
        )?;
        Ok(after)
    }

    /// Sets a new one-time password (returned once) that must be changed at the next login, and
    /// ends the user's sessions.
    pub fn reset_password(&self, by: &Principal, id: &str) -> Result<String, ApiError> {
        let password = secrets::generated_password();
        let hash = secrets::hash_password(&password);
        self.update(|a| {
            let u = user_mut(a, id)?;
            u.password_hash = hash;
            u.must_change_password = true;
            u.failed_logins = 0;
            u.locked_until_ms = 0;
            Ok(())
        })?;
        self.sessions().retain(|_, s| s.user_id != id);
        self.record(
            &by.actor(),
            "user.password.reset",
            "success",
            json!({"user": id}),
            vec![change("must_change_password", Value::Null, true.into())],
        )?;
        Ok(password)
    }

    /// Removes a user's second factor (a lost device); they must enrol again if required.
    pub fn reset_mfa(&self, by: &Principal, id: &str) -> Result<(), ApiError> {
        self.update(|a| {
            let u = user_mut(a, id)?;
            u.totp = None;
            u.recovery_codes.clear();
            Ok(())
        })?;
        self.sessions().retain(|_, s| s.user_id != id);
        self.record(
            &by.actor(),
            "user.mfa.reset",
            "success",
            json!({"user": id}),
            vec![change("mfa_enrolled", Value::Null, false.into())],
        )
    }

    pub fn unlock(&self, by: &Principal, id: &str) -> Result<(), ApiError> {
        let before = self.update(|a| {
            let u = user_mut(a, id)?;
            let before = u.locked_until_ms;
            u.locked_until_ms = 0;
            u.failed_logins = 0;
            Ok(before)
        })?;
        let before = (before > 0).then(|| ms_text(before));
        self.record(
            &by.actor(),
            "user.unlock",
            "success",
            json!({"user": id}),
            vec![change("locked_until", json!(before), Value::Null)],
        )
    }

    pub fn roles(&self) -> Vec<Value> {
        let a = self.read();
        let perms = |p: &BTreeSet<Permission>| p.iter().map(|x| x.as_str()).collect::<Vec<_>>();
        roles::BUILTIN_ROLES
            .iter()
            .map(|r| json!({"name": r, "builtin": true, "permissions": perms(&a.role_permissions(r).unwrap_or_default())}))
            .chain(a.roles.iter().map(|r| json!({"name": r.name, "builtin": false, "description": r.description, "permissions": perms(&r.permissions)})))
            .collect()
    }

    pub fn put_role(
        &self,
        by: &Principal,
        name: &str,
        description: String,
        permissions: BTreeSet<Permission>,
    ) -> Result<Value, ApiError> {
        if roles::builtin(name).is_some() {
            return Err(forbidden(format!("{name} is a built-in role and cannot be changed")));
        }
        if !roles::valid_name(name) {
            return Err(bad(
                "invalid_parameter",
                "name: 1 to 64 lowercase letters, digits, '_', '-' or '.'",
            ));
        }
        if description.len() > 1000 {
            return Err(bad("invalid_parameter", "description: at most 1000 bytes"));
        }
        let role = accounts::CustomRole { name: name.to_string(), description, permissions };
        let before = self.update(|a| {
            let before = a.roles.iter().position(|r| r.name == name).map(|i| a.roles.remove(i));
            a.roles.push(role.clone());
            a.roles.sort_by(|x, y| x.name.cmp(&y.name));
            Ok(before)
        })?;
        let show = |r: &accounts::CustomRole| json!({"name": r.name, "description": r.description, "permissions": r.permissions});
        let after = show(&role);
        self.record(
            &by.actor(),
            "role.put",
            "success",
            json!({"role": name}),
            vec![change("role", before.as_ref().map_or(Value::Null, show), after.clone())],
        )?;
        Ok(after)
    }

    pub fn delete_role(&self, by: &Principal, name: &str) -> Result<(), ApiError> {
        if roles::builtin(name).is_some() {
            return Err(forbidden(format!("{name} is a built-in role and cannot be deleted")));
        }
        let before = self.update(|a| {
            if a.users.iter().any(|u| u.grants.iter().any(|g| g.role == name)) {
                return Err(conflict(format!(
                    "role {name:?} is still granted; remove the grants first"
                )));
            }
            let i = a
                .roles
                .iter()
                .position(|r| r.name == name)
                .ok_or_else(|| ApiError::not_found(format!("no role {name:?}")))?;
            Ok(a.roles.remove(i))
        })?;
        self.record(
            &by.actor(),
            "role.delete",
            "success",
            json!({"role": name}),
            vec![change(
                "role",
                json!({"name": before.name, "permissions": before.permissions}),
                Value::Null,
            )],
        )
    }

    pub fn api_keys(&self) -> Vec<Value> {
        let mut a = self.read().clone();
        self.merge_last_used(&mut a, false);
        a.api_keys.iter().map(ApiKey::public).collect()
    }

    /// Creates an API key; the secret is in the answer only.
    pub fn create_api_key(
        &self,
        by: &Principal,
        name: &str,
        scopes: BTreeSet<Permission>,
        projects: Option<BTreeSet<String>>,
        networks: Vec<String>,
    ) -> Result<(Value, String), ApiError> {
        if name.trim().is_empty() || name.len() > 128 {
            return Err(bad("invalid_parameter", "name: 1 to 128 bytes"));
        }
        if scopes.is_empty() {
            return Err(bad("invalid_parameter", "scopes: name at least one permission"));
        }
        if scopes.contains(&Permission::EmergencyAccess) {
            return Err(bad(
                "invalid_parameter",
                "scopes: emergency:access is for people, not keys",
            ));
        }
        if let Some(p) = &projects
            && (p.is_empty() || p.iter().any(|n| !roles::valid_name(n)))
        {
            return Err(bad(
                "invalid_parameter",
                "projects: project names, at least one when given",
            ));
        }
        if let Some(n) = networks.iter().find(|n| accounts::parse_network(n).is_none()) {
            return Err(bad(
                "invalid_parameter",
                format!("networks: {n:?} is not an address or CIDR"),
            ));
        }
        let id = uuid::Uuid::now_v7().simple().to_string();
        let secret = secrets::random_token().replace('_', "-");
        let key = ApiKey {
            id: id.clone(),
            name: name.to_string(),
            digest: secrets::digest(&secret),
            scopes,
            projects,
            networks,
            created_ms: self.now_ms(),
            created_by: by.id.clone(),
            revoked_ms: 0,
            last_used_ms: 0,
        };
        self.update(|a| {
            a.api_keys.push(key.clone());
            Ok(())
        })?;
        self.record(
            &by.actor(),
            "api_key.create",
            "success",
            json!({"api_key": id}),
            vec![change("api_key", Value::Null, key.public())],
        )?;
        Ok((key.public(), format!("{API_KEY_PREFIX}{id}_{secret}")))
    }

    pub fn revoke_api_key(&self, by: &Principal, id: &str) -> Result<(), ApiError> {
        let now = self.now_ms();
        let (before, after) = self.update(|a| {
            let k = a
                .api_keys
                .iter_mut()
                .find(|k| k.id == id)
                .ok_or_else(|| ApiError::not_found(format!("no API key {id:?}")))?;
            if k.revoked_ms != 0 {
                return Err(conflict("the key is already revoked"));
            }
            let before = k.public();
            k.revoked_ms = now;
            Ok((before, k.public()))
        })?;
        self.record(
            &by.actor(),
            "api_key.revoke",
            "success",
            json!({"api_key": id}),
            diff(&before, &after),
        )
    }

    pub fn projects(&self) -> Vec<Value> {
        self.read().projects.iter().map(|p| json!({"name": p.name, "created_at": ms_text(p.created_ms), "created_by": p.created_by})).collect()
    }

    pub fn create_project(&self, by: &Principal, name: &str) -> Result<Value, ApiError> {
        if !roles::valid_name(name) {
            return Err(bad(
                "invalid_parameter",
                "name: 1 to 64 lowercase letters, digits, '_', '-' or '.'",
            ));
        }
        let only_admins = self.read().governance.only_admins_create_projects;
        if only_admins && !by.roles.iter().any(|r| r == "admin") {
            return Err(forbidden(
                "only administrators may create projects (governance setting only_admins_create_projects)",
            ));
        }
        let project = accounts::Project {
            name: name.to_string(),
            created_ms: self.now_ms(),
            created_by: by.id.clone(),
        };
        self.update(|a| {
            if a.projects.iter().any(|p| p.name == name) {
                return Err(conflict(format!("project {name:?} exists")));
            }
            a.projects.push(project.clone());
            Ok(())
        })?;
        let v =
            json!({"name": name, "created_at": ms_text(project.created_ms), "created_by": by.id});
        self.record(
            &by.actor(),
            "project.create",
            "success",
            json!({"project": name}),
            vec![change("project", Value::Null, v.clone())],
        )?;
        Ok(v)
    }

    pub fn governance(&self) -> accounts::Governance {
        self.read().governance.clone()
    }

    pub fn set_governance(
        &self,
        by: &Principal,
        next: accounts::Governance,
    ) -> Result<(), ApiError> {
        let before = self.update(|a| Ok(std::mem::replace(&mut a.governance, next.clone())))?;
        let to = |g: &accounts::Governance| serde_json::to_value(g).unwrap_or_default();
        self.record(
            &by.actor(),
            "settings.governance.change",
            "success",
            json!({}),
            diff(&to(&before), &to(&next)),
        )
    }
}

enum SecondFactor {
    Totp(u64),
    Recovery(usize),
}

/// A stored user to change, or 404.
fn user_mut<'a>(accounts: &'a mut Accounts, id: &str) -> Result<&'a mut User, ApiError> {
    accounts.user_mut(id).ok_or_else(|| ApiError::not_found(format!("no user {id:?}")))
}

/// Locks a mutex; a panic elsewhere while holding it leaves data that is still consistent
/// here (each critical section is a single map update), so poisoning is ignored.
/// Whether authenticating a request may wait to write (an event in the log, the accounts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    MayWait,
    MustNotWait,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn locked(remaining_ms: i64) -> ApiError {
    let mut e = ApiError::new(
        StatusCode::FORBIDDEN,
        "account_locked",
        format!(
            "the account is locked after repeated failed logins; try again in {} minutes or ask an administrator",
            (remaining_ms + 59_999) / 60_000
        ),
    );
    e.extra = Some(("retry_after_seconds", json!((remaining_ms + 999) / 1000)));
    e
}

/// One entry of an event's `changes`.
pub fn change(field: &str, before: Value, after: Value) -> Value {
    let mut c = json!({"field": field});
    if !before.is_null() {
        c["before"] = before;
    }
    if !after.is_null() {
        c["after"] = after;
    }
    c
}

/// The fields of two JSON objects that differ, as `changes`.
pub fn diff(before: &Value, after: &Value) -> Vec<Value> {
    let keys: BTreeSet<&String> =
        before.as_object().into_iter().chain(after.as_object()).flat_map(|m| m.keys()).collect();
    keys.into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| {
            change(
                k,
                before.get(k).cloned().unwrap_or(Value::Null),
                after.get(k).cloned().unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// A repository event: `context` values become strings (the event schema's rule).
pub fn repository_event(
    actor: &Value,
    action: &str,
    outcome: &str,
    context: Value,
    changes: Vec<Value>,
) -> Value {
    let mut ctx = serde_json::Map::new();
    if let Value::Object(m) = context {
        for (k, v) in m {
            let s = match v {
                Value::String(s) => s,
                Value::Null => continue,
                other => other.to_string(),
            };
            // Context values are bounded by the schema; long parameter lists are cut.
            ctx.insert(k, Value::String(s.chars().take(1000).collect()));
        }
    }
    let mut e = json!({"action": action, "outcome": outcome, "actor": actor});
    if !ctx.is_empty() {
        e["context"] = Value::Object(ctx);
    }
    if !changes.is_empty() {
        e["changes"] = Value::Array(changes);
    }
    e
}

/// How a principal may see events: in which projects, and where patient identifiers unmasked.
#[derive(Debug, Clone)]
pub struct EventView {
    read: Scope,
    identifiers: Scope,
}

impl EventView {
    pub fn of(p: &Principal) -> EventView {
        EventView {
            read: p.scope(Permission::EventsRead),
            identifiers: p.scope(Permission::PatientIdentifiers),
        }
    }

    /// What an export shows: the events where the caller may export, masked as for reading.
    pub fn for_export(p: &Principal) -> EventView {
        EventView {
            read: p.scope(Permission::EventsExport),
            identifiers: p.scope(Permission::PatientIdentifiers),
        }
    }

    /// What a report shows: the events where the caller may run reports, masked as for
    /// reading.
    pub fn for_reports(p: &Principal) -> EventView {
        EventView {
            read: p.scope(Permission::ReportsRun),
            identifiers: p.scope(Permission::PatientIdentifiers),
        }
    }

    /// The projects the view is limited to, given a `project` the caller asked for; `None`:
    /// every project.
    pub fn projects(&self, requested: Option<&str>) -> Option<BTreeSet<String>> {
        match (&self.read, requested) {
            (_, Some(p)) => Some(BTreeSet::from([p.to_string()])),
            (Scope::Projects(set), None) => Some(set.clone()),
            (Scope::Nowhere, None) => Some(BTreeSet::new()),
            (Scope::Everywhere, None) => None,
        }
    }

    /// Appends a stored event (canonical JSON) to an answer as this view shows it: copied as
    /// it is when nothing needs masking, else parsed and masked. The query has already been
    /// limited to the view's projects.
    pub fn write_json(&self, stored: &[u8], out: &mut Vec<u8>) -> Result<(), ApiError> {
        if self.is_unrestricted() {
            out.extend_from_slice(stored);
            return Ok(());
        }
        let mut event: Value = serde_json::from_slice(stored).map_err(ApiError::internal)?;
        self.apply(&mut event);
        serde_json::to_writer(out, &event).map_err(ApiError::internal)
    }

    /// Everything, unmasked: answers can be copied from the log as they are.
    pub fn is_unrestricted(&self) -> bool {
        self.read == Scope::Everywhere && self.identifiers == Scope::Everywhere
    }

    pub fn reads_everywhere(&self) -> bool {
        self.read == Scope::Everywhere
    }

    /// The projects a search must be limited to (`None`: no limit). Asking for a project
    /// outside the caller's is refused rather than silently answered empty.
    pub fn project_filter(&self, requested: Option<&str>) -> Result<Option<Vec<String>>, ApiError> {
        match (&self.read, requested) {
            (Scope::Everywhere, _) => Ok(None),
            (Scope::Projects(set), Some(p)) if set.contains(p) => Ok(None),
            (Scope::Projects(set), None) => Ok(Some(set.iter().cloned().collect())),
            _ => Err(forbidden("you may not read events of this project")),
        }
    }

    /// Whether `event` may be shown; masks its patient identifiers when the caller may not see
    /// them in its project.
    pub fn apply(&self, event: &mut Value) -> bool {
        let project = event.get("project").and_then(Value::as_str).map(str::to_string);
        let within = |scope: &Scope| match scope {
            Scope::Everywhere => true,
            Scope::Projects(set) => project.as_ref().is_some_and(|p| set.contains(p)),
            Scope::Nowhere => false,
        };
        if !within(&self.read) {
            return false;
        }
        if !within(&self.identifiers) {
            auditrail_core::fhir::mask_patient(event);
        }
        true
    }
}

impl Auth {
    /// A ready session for a new user holding `grants` (no password change or MFA pending),
    /// for tests that exercise what roles may do rather than how one logs in.
    #[cfg(test)]
    pub fn test_session(&self, username: &str, grants: Vec<Grant>) -> String {
        let now = self.now_ms();
        let user = self
            .update(|a| {
                let existing = a.user_by_name(username).map(|u| u.id.clone());
                let id = existing.unwrap_or_else(|| new_id("usr_"));
                if a.user(&id).is_none() {
                    a.users.push(User {
                        id: id.clone(),
                        username: username.into(),
                        display_name: String::new(),
                        password_hash: secrets::decoy_hash().to_string(),
                        must_change_password: false,
                        grants,
                        totp: Some(accounts::Totp {
                            secret: vec![1; 20],
                            confirmed: true,
                            last_step: 0,
                        }),
                        recovery_codes: Vec::new(),
                        failed_logins: 0,
                        locked_until_ms: 0,
                        disabled: false,
                        created_ms: now,
                        password_changed_ms: now,
                    });
                }
                Ok(a.user(&id).cloned().expect("just added"))
            })
            .expect("saved");
        self.new_session(&user, None, now).1.access_token
    }
}

#[cfg(test)]
mod tests;
