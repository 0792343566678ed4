//! The rules of logins and sessions, against a clock the tests move.

use super::*;

struct Fixture {
    auth: Auth,
    clock: Arc<ManualClock>,
    store: Arc<Store>,
    _dir: tempfile::TempDir,
    data: PathBuf,
}

const START: i64 = 1_795_000_000_000;
const PASSWORD: &str = "violet-anchor-sleeps-42-ways";

fn fixture(settings: AuthSettings) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    auditrail_store::init(&data, "test.auditrail.local/log").unwrap();
    let store = Arc::new(Store::open(&data, auditrail_store::Options::default()).unwrap());
    let clock = Arc::new(ManualClock::new(START));
    let (auth, bootstrap) = Auth::open(&data, store.clone(), settings, clock.clone()).unwrap();
    assert!(bootstrap.is_some());
    Fixture { auth, clock, store, _dir: dir, data }
}

/// The repository events in the log, as (action, outcome).
fn events(f: &Fixture) -> Vec<(String, String, Value)> {
    let end = f.store.stages().sequenced;
    f.store
        .read_events(0, end)
        .unwrap()
        .into_iter()
        .map(|(_, bytes)| {
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            (
                v["action"].as_str().unwrap().to_string(),
                v["outcome"].as_str().unwrap().to_string(),
                v,
            )
        })
        .collect()
}

fn login(
    f: &Fixture,
    name: &str,
    password: &str,
    totp: Option<String>,
) -> Result<Tokens, ApiError> {
    let req = LoginRequest {
        username: name.into(),
        password: password.into(),
        totp_code: totp,
        recovery_code: None,
    };
    f.auth.login(&req, Some("10.0.0.1".parse().unwrap()))
}

/// A user `alice` (viewer) with a password of our choosing, and MFA optional.
fn alice(f: &Fixture) -> String {
    let (user, one_time) = f
        .auth
        .create_user(
            &Auth::system(),
            "alice",
            "Alice",
            vec![Grant { role: "viewer".into(), projects: None }],
        )
        .unwrap();
    let t = login(f, "alice", &one_time, None).unwrap();
    assert!(t.must_change_password);
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert_eq!(p.restriction, Some(Restriction::MustChangePassword));
    f.auth.change_password(&p, &one_time, PASSWORD).unwrap();
    user["id"].as_str().unwrap().to_string()
}

fn no_mfa() -> AuthSettings {
    AuthSettings { mfa_required_roles: BTreeSet::new(), ..AuthSettings::default() }
}

#[test]
fn bootstrap_admin_must_change_password_and_enrol_totp() {
    let f = fixture(AuthSettings::default());
    let file = f.data.join(accounts::INITIAL_PASSWORD_PATH);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let one_time = std::fs::read_to_string(&file).unwrap().trim().to_string();
    let t = login(&f, "admin", &one_time, None).unwrap();
    assert!(t.must_change_password && t.must_enrol_mfa);
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert_eq!(p.restriction, Some(Restriction::MustChangePassword));
    let weak = f.auth.change_password(&p, &one_time, "password12345").unwrap_err();
    assert_eq!(weak.code, "weak_password");
    f.auth.change_password(&p, &one_time, PASSWORD).unwrap();
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert_eq!(p.restriction, Some(Restriction::MustEnrolMfa));
    let enrol = f.auth.totp_begin(&p).unwrap();
    assert!(enrol["otpauth_uri"].as_str().unwrap().starts_with("otpauth://totp/auditrail:admin?"));
    let secret = f.auth.read().user(&p.id).unwrap().totp.clone().unwrap().secret;
    let codes = f.auth.totp_confirm(&p, &secrets::totp_code(&secret, START)).unwrap();
    assert_eq!(codes.len(), 10);
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert_eq!(p.restriction, None);
    assert!(p.can(Permission::UsersManage));
    // From now on the password alone is not enough; a code is used once.
    f.clock.advance(60_000);
    assert_eq!(login(&f, "admin", PASSWORD, None).unwrap_err().code, "mfa_required");
    let code = secrets::totp_code(&secret, f.clock.now_ms());
    login(&f, "admin", PASSWORD, Some(code.clone())).unwrap();
    assert_eq!(login(&f, "admin", PASSWORD, Some(code)).unwrap_err().code, "invalid_credentials");
    // A recovery code works once.
    let req = LoginRequest {
        username: "admin".into(),
        password: PASSWORD.into(),
        totp_code: None,
        recovery_code: Some(codes[0].to_uppercase()),
    };
    f.auth.login(&req, None).unwrap();
    assert_eq!(f.auth.login(&req, None).unwrap_err().code, "invalid_credentials");
    let actions: Vec<String> = events(&f).into_iter().map(|e| format!("{}:{}", e.0, e.1)).collect();
    for expected in [
        "user.create:success",
        "auth.login:success",
        "user.password.change:success",
        "user.mfa.enrol:success",
        "auth.login:failure",
    ] {
        assert!(actions.contains(&expected.to_string()), "{expected} in {actions:?}");
    }
    // The password file holds no secret the accounts file shows in the clear.
    let sealed = std::fs::read(f.data.join(accounts::ACCOUNTS_PATH)).unwrap();
    assert!(!String::from_utf8_lossy(&sealed).contains("argon2id"));
}

#[test]
fn totp_window_is_one_step_either_way() {
    let f = fixture(no_mfa());
    alice(&f);
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    f.auth.totp_begin(&p).unwrap();
    let secret = f.auth.read().user(&p.id).unwrap().totp.clone().unwrap().secret;
    f.auth.totp_confirm(&p, &secrets::totp_code(&secret, START)).unwrap();
    for (offset, ok) in [(-30_000, true), (30_000, true), (-61_000, false), (61_000, false)] {
        f.clock.advance(300_000); // past every earlier step
        let now = f.clock.now_ms();
        let code = secrets::totp_code(&secret, now + offset);
        let r = login(&f, "alice", PASSWORD, Some(code));
        assert_eq!(r.is_ok(), ok, "a code from {offset} ms away");
    }
}

#[test]
fn five_failures_lock_for_thirty_minutes_and_the_lockout_is_an_event() {
    let f = fixture(no_mfa());
    alice(&f);
    for _ in 0..4 {
        assert_eq!(
            login(&f, "alice", "wrong password!!", None).unwrap_err().code,
            "invalid_credentials"
        );
    }
    let e = login(&f, "alice", "wrong password!!", None).unwrap_err();
    assert_eq!(e.code, "account_locked");
    // Locked: even the right password is refused, for 30 minutes.
    assert_eq!(login(&f, "alice", PASSWORD, None).unwrap_err().code, "account_locked");
    f.clock.advance(29 * 60_000);
    assert_eq!(login(&f, "alice", PASSWORD, None).unwrap_err().code, "account_locked");
    f.clock.advance(60_001);
    login(&f, "alice", PASSWORD, None).unwrap();
    let lockouts: Vec<Value> =
        events(&f).into_iter().filter(|e| e.0 == "auth.lockout").map(|e| e.2).collect();
    assert_eq!(lockouts.len(), 1);
    assert_eq!(lockouts[0]["context"]["severity"], "high");
    assert_eq!(lockouts[0]["actor"]["name"], "alice");
    // Unknown users fail the same way and leave a trace.
    assert_eq!(login(&f, "mallory", PASSWORD, None).unwrap_err().code, "invalid_credentials");
}

#[test]
fn sessions_end_after_inactivity_and_after_their_lifetime() {
    let f = fixture(no_mfa());
    alice(&f);
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    f.auth.refresh(&t.refresh_token, None).unwrap();
    assert!(f.auth.refresh(&t.refresh_token, None).is_err(), "a refresh token works once");
    // Active use keeps a session alive past 30 minutes...
    let mut tokens = login(&f, "alice", PASSWORD, None).unwrap();
    for _ in 0..3 {
        f.clock.advance(25 * 60_000);
        tokens = f.auth.refresh(&tokens.refresh_token, None).unwrap();
        f.auth.authenticate(&tokens.access_token, None).unwrap();
    }
    // ...but 30 idle minutes end it.
    f.clock.advance(30 * 60_000 + 1);
    let e = f.auth.refresh(&tokens.refresh_token, None).unwrap_err();
    assert!(e.message.contains("idle"), "{}", e.message);
    // The absolute lifetime (12 h) ends even a busy session.
    let mut tokens = login(&f, "alice", PASSWORD, None).unwrap();
    let mut ended = None;
    for i in 0..40 {
        f.clock.advance(20 * 60_000);
        match f.auth.refresh(&tokens.refresh_token, None) {
            Ok(t) => tokens = t,
            Err(e) => {
                ended = Some((i, e.message));
                break;
            }
        }
    }
    let (i, message) = ended.expect("the session ends");
    assert_eq!(i, 36, "12 hours of 20-minute steps");
    assert!(message.contains("lifetime"), "{message}");
    // An expired access token is refused even while its session lives.
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    f.clock.advance(5 * 60_000);
    assert!(f.auth.authenticate(&t.access_token, None).unwrap_err().message.contains("expired"));
    assert!(events(&f).iter().any(|e| e.0 == "auth.session.expire"));
}

#[test]
fn the_session_limit_ends_the_oldest_and_revocation_is_immediate() {
    let f = fixture(AuthSettings { sessions_per_user_max: 2, ..no_mfa() });
    alice(&f);
    let first = login(&f, "alice", PASSWORD, None).unwrap();
    f.clock.advance(1000);
    let second = login(&f, "alice", PASSWORD, None).unwrap();
    f.clock.advance(1000);
    let third = login(&f, "alice", PASSWORD, None).unwrap();
    assert!(f.auth.authenticate(&first.access_token, None).is_err());
    f.auth.authenticate(&second.access_token, None).unwrap();
    let p = f.auth.authenticate(&third.access_token, None).unwrap();
    assert_eq!(f.auth.list_sessions(Some(&p.id)).len(), 2);
    f.auth.revoke_session(&Auth::system(), &second.session_id).unwrap();
    assert!(f.auth.authenticate(&second.access_token, None).unwrap_err().message.contains("ended"));
    f.auth.logout(&p).unwrap();
    assert!(f.auth.authenticate(&third.access_token, None).is_err());
    let revokes = events(&f).iter().filter(|e| e.0 == "auth.session.revoke").count();
    // The limit ended two (the setup's login and `first`), the administrator one.
    assert_eq!(revokes, 3);
}

#[test]
fn an_ip_change_within_a_session_is_recorded() {
    let f = fixture(no_mfa());
    alice(&f);
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    f.auth.authenticate(&t.access_token, Some("10.0.0.1".parse().unwrap())).unwrap();
    f.auth.authenticate(&t.access_token, Some("192.0.2.7".parse().unwrap())).unwrap();
    let changes: Vec<Value> =
        events(&f).into_iter().filter(|e| e.0 == "auth.session.ip_change").map(|e| e.2).collect();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0]["changes"][0]["before"], "10.0.0.1");
    assert_eq!(changes[0]["changes"][0]["after"], "192.0.2.7");
}

#[test]
fn break_glass_is_bounded_and_high_severity() {
    let f = fixture(no_mfa());
    alice(&f);
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert!(!p.can(Permission::PatientIdentifiers));
    assert_eq!(f.auth.break_glass(&p, "why", 30).unwrap_err().code, "invalid_parameter");
    assert_eq!(
        f.auth.break_glass(&p, "patient crashed in ER", 600).unwrap_err().code,
        "invalid_parameter"
    );
    f.auth.break_glass(&p, "patient crashed in ER, chart needed", 30).unwrap();
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert!(p.can(Permission::PatientIdentifiers) && p.emergency.is_some());
    f.clock.advance(20 * 60_000);
    let t = f.auth.refresh(&t.refresh_token, None).unwrap();
    assert!(f.auth.authenticate(&t.access_token, None).unwrap().emergency.is_some());
    f.clock.advance(10 * 60_000 + 1);
    let t = f.auth.refresh(&t.refresh_token, None).unwrap();
    let p = f.auth.authenticate(&t.access_token, None).unwrap();
    assert!(!p.can(Permission::PatientIdentifiers), "the elevation ended");
    let e = events(&f).into_iter().find(|e| e.0 == "auth.break_glass").unwrap().2;
    assert_eq!(e["context"]["severity"], "high");
    assert_eq!(e["context"]["reason"], "patient crashed in ER, chart needed");
}

#[test]
fn api_keys_are_scoped_hashed_revocable_and_network_bound() {
    let f = fixture(no_mfa());
    let (_, key) = f
        .auth
        .create_api_key(
            &Auth::system(),
            "ehr",
            [Permission::EventsWrite].into(),
            Some(["cardiology".to_string()].into()),
            vec!["10.0.0.0/8".into()],
        )
        .unwrap();
    assert!(key.starts_with("atk_"));
    let sealed = std::fs::read(f.data.join(accounts::ACCOUNTS_PATH)).unwrap();
    assert!(!sealed.windows(key.len()).any(|w| w == key.as_bytes()));
    let p = f.auth.authenticate(&key, Some("10.1.2.3".parse().unwrap())).unwrap();
    assert!(p.can(Permission::EventsWrite) && !p.can(Permission::EventsRead));
    assert_eq!(
        p.scope(Permission::EventsWrite),
        Scope::Projects(["cardiology".to_string()].into())
    );
    let e = f.auth.authenticate(&key, Some("192.0.2.1".parse().unwrap())).unwrap_err();
    assert_eq!(e.code, "network_forbidden");
    let mut altered = key.clone();
    altered.pop();
    assert_eq!(f.auth.authenticate(&altered, None).unwrap_err().code, "unauthenticated");
    let id = key.trim_start_matches(API_KEY_PREFIX).split('_').next().unwrap().to_string();
    f.auth.revoke_api_key(&Auth::system(), &id).unwrap();
    assert_eq!(
        f.auth.authenticate(&key, Some("10.1.2.3".parse().unwrap())).unwrap_err().code,
        "unauthenticated"
    );
}

#[test]
fn admin_changes_record_before_and_after() {
    let f = fixture(no_mfa());
    let id = alice(&f);
    let grants =
        vec![Grant { role: "auditor".into(), projects: Some(["oncology".to_string()].into()) }];
    f.auth.update_user(&Auth::system(), &id, None, Some(grants), None).unwrap();
    let e = events(&f).into_iter().rev().find(|e| e.0 == "user.update").unwrap().2;
    let change = &e["changes"][0];
    assert_eq!(change["field"], "grants");
    assert_eq!(change["before"][0]["role"], "viewer");
    assert_eq!(change["after"][0]["role"], "auditor");
    assert_eq!(change["after"][0]["projects"][0], "oncology");
    // The last administrator keeps the role.
    let admin = f.auth.read().user_by_name("admin").unwrap().id.clone();
    let e = f.auth.update_user(&Auth::system(), &admin, None, Some(vec![]), None).unwrap_err();
    assert_eq!(e.code, "conflict");
}

/// What an async thread may resolve without waiting, and that it leaves every case that must
/// write (a session ending or moving, API key use times due) untouched for `authenticate`.
#[test]
fn authenticating_in_memory_defers_every_request_that_must_write() {
    let f = fixture(no_mfa());
    alice(&f);
    let here = Some("10.0.0.1".parse().unwrap());
    let t = login(&f, "alice", PASSWORD, None).unwrap();
    let p = f.auth.authenticate_in_memory(&t.access_token, here).unwrap().expect("resolved");
    assert_eq!(p.id, f.auth.authenticate(&t.access_token, here).unwrap().id);
    // Invalid credentials are refused here as they are there.
    let e = f.auth.authenticate_in_memory("not-a-token", here).unwrap_err();
    assert_eq!(e.code, "unauthenticated");

    // A new address is recorded in the log: deferred, and the session still has the old one.
    let there = Some("10.9.9.9".parse().unwrap());
    let recorded = |action: &str| events(&f).iter().filter(|e| e.0 == action).count();
    assert!(f.auth.authenticate_in_memory(&t.access_token, there).unwrap().is_none());
    assert!(f.auth.authenticate_in_memory(&t.access_token, there).unwrap().is_none());
    assert_eq!(recorded("auth.session.ip_change"), 0);
    f.auth.authenticate(&t.access_token, there).unwrap();
    assert_eq!(recorded("auth.session.ip_change"), 1);
    assert!(f.auth.authenticate_in_memory(&t.access_token, there).unwrap().is_some());

    // An idle session ends with a record: deferred until a caller may wait, which ends it.
    f.clock.advance(30 * 60_000 + 1);
    let fresh = f.auth.tokens.issue(&p.id, &t.session_id, f.clock.now_ms(), 60_000);
    assert!(f.auth.authenticate_in_memory(&fresh, there).unwrap().is_none());
    assert_eq!(recorded("auth.session.expire"), 0);
    let e = f.auth.authenticate(&fresh, there).unwrap_err();
    assert!(e.message.contains("idle"), "{}", e.message);
    assert_eq!(recorded("auth.session.expire"), 1);

    // An API key's use times are saved once a minute, by a caller that may wait.
    let (_, key) = f
        .auth
        .create_api_key(&Auth::system(), "ehr", [Permission::EventsRead].into(), None, vec![])
        .unwrap();
    assert!(f.auth.authenticate_in_memory(&key, here).unwrap().is_some());
    f.clock.advance(60_001);
    assert!(f.auth.authenticate_in_memory(&key, here).unwrap().is_none());
    f.auth.authenticate(&key, here).unwrap();
    assert!(f.auth.authenticate_in_memory(&key, here).unwrap().is_some());
}
