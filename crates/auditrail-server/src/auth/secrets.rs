//! The secrets of accounts, each with the field's standard construction: passwords as Argon2id
//! PHC strings (OWASP parameters), TOTP per RFC 6238 (`totp-rs`), API keys and refresh tokens as
//! 256-bit random values stored only as SHA-256 digests, compared in constant time.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

pub const PASSWORD_CHARS_MIN: usize = 12;
pub const PASSWORD_BYTES_MAX: usize = 1024;

/// Argon2id with OWASP's first recommended configuration: 19 MiB, 2 passes, 1 lane.
fn argon2() -> Argon2<'static> {
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid Argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

pub fn hash_password(password: &str) -> String {
    argon2()
        .hash_password(password.as_bytes())
        .expect("Argon2 hashing with valid parameters cannot fail")
        .to_string()
}

pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => argon2().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// A hash to verify against when the user does not exist, so that an unknown name costs the
/// same time as a wrong password.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password("decoy password that matches no account"))
}

/// The password policy: at least 12 characters, at most 1 KiB, and not guessable (zxcvbn score
/// 3 or more, which rejects common passwords, dictionary words with substitutions, keyboard
/// walks and passwords built from the user's own name).
pub fn check_password_policy(password: &str, user_inputs: &[&str]) -> Result<(), String> {
    if password.chars().count() < PASSWORD_CHARS_MIN {
        return Err(format!("a password needs at least {PASSWORD_CHARS_MIN} characters"));
    }
    if password.len() > PASSWORD_BYTES_MAX {
        return Err(format!("a password has at most {PASSWORD_BYTES_MAX} bytes"));
    }
    let estimate = zxcvbn::zxcvbn(password, user_inputs);
    if u8::from(estimate.score()) < 3 {
        let mut why = String::from("the password is too easy to guess");
        if let Some(feedback) = estimate.feedback() {
            if let Some(w) = feedback.warning() {
                why.push_str(&format!(": {w}"));
            }
            if let Some(s) = feedback.suggestions().first() {
                why.push_str(&format!(" ({s})"));
            }
        }
        return Err(why);
    }
    Ok(())
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    auditrail_store::crypto::random()
}

/// A random token of 256 bits, URL-safe.
pub fn random_token() -> String {
    B64URL.encode(random_bytes::<32>())
}

/// A generated password for bootstrap and admin resets: 24 characters from a 57-symbol
/// alphabet without look-alikes (about 140 bits).
pub fn generated_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut out = String::with_capacity(24);
    while out.len() < 24 {
        for b in random_bytes::<32>() {
            // Rejection sampling keeps the choice uniform.
            let limit = 256 - 256 % ALPHABET.len();
            if (b as usize) < limit && out.len() < 24 {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    out
}

/// SHA-256 of a high-entropy secret (API key, refresh token, recovery code), hex. Such secrets
/// need no slow hash: guessing 256 (or 80) random bits is infeasible either way.
pub fn digest(secret: &str) -> String {
    Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares two digests without leaking where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// Ten recovery codes of 80 bits each (`xxxxx-xxxxx-xxxxx-xxxxx`, base32), shown once.
pub fn recovery_codes() -> Vec<String> {
    (0..10)
        .map(|_| {
            let raw = base32(&random_bytes::<10>()).to_ascii_lowercase();
            raw.as_bytes()
                .chunks(4)
                .map(|c| String::from_utf8_lossy(c))
                .collect::<Vec<_>>()
                .join("-")
        })
        .collect()
}

/// Recovery codes are compared after removing dashes and spaces and lowering case.
pub fn normalise_recovery_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_lowercase()).collect()
}

fn base32(bytes: &[u8]) -> String {
    totp_rs::Secret::from(bytes).to_base32()
}

/// A TOTP (RFC 6238: HMAC-SHA-1, 6 digits, 30-second steps, one step of skew either way, the
/// parameters every authenticator app supports) for a 160-bit secret.
pub fn totp(secret: &[u8], issuer: &str, account: &str) -> Result<totp_rs::Totp, String> {
    totp_rs::Builder::new()
        .with_secret(secret.to_vec())
        .with_issuer(Some(issuer))
        .with_account_name(account.replace(':', "_"))
        .build()
        .map_err(|e| e.to_string())
}

/// The step a TOTP code matches at `now_ms`, if any (the caller refuses a step used before).
pub fn totp_step(secret: &[u8], code: &str, now_ms: i64) -> Option<u64> {
    let code = code.trim();
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let t = totp(secret, "auditrail", "x").ok()?;
    t.check(code, (now_ms.max(0) / 1000) as u64)
}

#[cfg(test)]
pub fn totp_code(secret: &[u8], now_ms: i64) -> String {
    totp(secret, "auditrail", "x").unwrap().generate((now_ms / 1000) as u64).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery staple 9");
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse battery staple 9", &h));
        assert!(!verify_password("correct horse battery staple 8", &h));
        assert!(!verify_password("x", "not a hash"));
    }

    #[test]
    fn policy_rejects_short_common_and_personal_passwords() {
        assert!(check_password_policy("Tr0ub4dor&3", &[]).unwrap_err().contains("12"));
        for common in ["password1234", "qwertyuiop123", "123456789012", "iloveyou1234"] {
            assert!(check_password_policy(common, &[]).is_err(), "{common}");
        }
        assert!(check_password_policy("dr.alice.smith2026", &["dr.alice.smith"]).is_err());
        check_password_policy("violet-anchor-sleeps-42-ways", &[]).unwrap();
        check_password_policy(&generated_password(), &[]).unwrap();
    }

    #[test]
    fn totp_matches_rfc_6238_and_its_window() {
        // RFC 6238 appendix B, SHA-1, 8 digits truncated to our 6: T = 59 s gives 94287082.
        let secret = b"12345678901234567890";
        assert_eq!(totp_code(secret, 59_000), "287082");
        assert_eq!(totp_step(secret, "287082", 59_000), Some(1));
        // One step of skew either way, no more.
        assert_eq!(totp_step(secret, "287082", 59_000 + 30_000), Some(1));
        assert_eq!(totp_step(secret, "287082", 59_000 + 60_000), None);
        assert_eq!(totp_step(secret, "28708", 59_000), None);
        let uri = totp(secret, "auditrail", "alice").unwrap().to_url().unwrap();
        assert!(uri.starts_with("otpauth://totp/auditrail:alice?secret="), "{uri}");
    }

    #[test]
    fn recovery_codes_are_distinct_and_normalise() {
        let codes = recovery_codes();
        assert_eq!(codes.len(), 10);
        assert_eq!(codes.iter().collect::<std::collections::HashSet<_>>().len(), 10);
        let c = &codes[0];
        assert_eq!(normalise_recovery_code(&c.to_uppercase()), c.replace('-', ""));
        assert!(same(&digest("a"), &digest("a")) && !same(&digest("a"), &digest("b")));
    }
}
