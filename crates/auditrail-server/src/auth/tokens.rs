//! Access tokens: JWTs signed with Ed25519 (`EdDSA`), audience `auditrail`, valid for minutes.
//! The signing key is made at each start and never leaves memory: a restart ends every session
//! anyway (sessions live in memory), and no key file can leak. Validation accepts only EdDSA, so
//! `alg: none` and a symmetric algorithm keyed with the public key are refused by construction;
//! expiry is checked against the server's own clock (which tests control), with no leeway.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

pub const AUDIENCE: &str = "auditrail";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user's id.
    pub sub: String,
    /// The session.
    pub sid: String,
    pub aud: String,
    pub iss: String,
    /// Issued and expiry times, Unix seconds.
    pub iat: i64,
    pub exp: i64,
}

pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    public: [u8; 32],
    issuer: String,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys").field("issuer", &self.issuer).finish_non_exhaustive()
    }
}

/// RFC 8410's PKCS#8 wrapping of an Ed25519 seed, the form `jsonwebtoken` reads.
fn pkcs8_ed25519(seed: &[u8; 32]) -> Vec<u8> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    [&PREFIX[..], &seed[..]].concat()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    /// Malformed, wrong algorithm, bad signature or wrong audience or issuer.
    Invalid,
    Expired,
}

impl TokenKeys {
    pub fn generate(issuer: &str) -> TokenKeys {
        let seed = super::secrets::random_bytes::<32>();
        let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = signing.verifying_key().to_bytes();
        TokenKeys {
            encoding: EncodingKey::from_ed_der(&pkcs8_ed25519(&seed)),
            decoding: DecodingKey::from_ed_der(&public),
            public,
            issuer: issuer.to_string(),
        }
    }

    /// The raw Ed25519 public key (tests use it to forge tokens that must be refused).
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    pub fn issue(&self, user_id: &str, session_id: &str, now_ms: i64, ttl_ms: i64) -> String {
        let claims = Claims {
            sub: user_id.to_string(),
            sid: session_id.to_string(),
            aud: AUDIENCE.to_string(),
            iss: self.issuer.clone(),
            iat: now_ms / 1000,
            exp: (now_ms + ttl_ms) / 1000,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &claims, &self.encoding)
            .expect("signing a JWT with a valid Ed25519 key cannot fail")
    }

    pub fn verify(&self, token: &str, now_ms: i64) -> Result<Claims, TokenError> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[AUDIENCE]);
        v.set_issuer(&[&self.issuer]);
        v.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        // Expiry against our clock, below.
        v.validate_exp = false;
        v.leeway = 0;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)
            .map_err(|_| TokenError::Invalid)?;
        if data.claims.exp * 1000 <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use hmac::{KeyInit as _, Mac as _};

    const NOW: i64 = 1_795_000_000_000;

    fn forge(header: &str, claims: &serde_json::Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(claims.to_string()));
        format!("{signing_input}.{}", B64.encode(sign(signing_input.as_bytes())))
    }

    fn claims(keys: &TokenKeys, exp: i64) -> serde_json::Value {
        serde_json::json!({"sub": "usr_1", "sid": "s1", "aud": AUDIENCE, "iss": keys.issuer, "iat": NOW / 1000, "exp": exp})
    }

    #[test]
    fn a_token_verifies_until_it_expires() {
        let keys = TokenKeys::generate("test");
        let t = keys.issue("usr_1", "s1", NOW, 300_000);
        let c = keys.verify(&t, NOW + 299_000).unwrap();
        assert_eq!((c.sub.as_str(), c.sid.as_str()), ("usr_1", "s1"));
        assert_eq!(keys.verify(&t, NOW + 300_000), Err(TokenError::Expired));
    }

    #[test]
    fn forged_and_altered_tokens_are_refused() {
        let keys = TokenKeys::generate("test");
        let good = claims(&keys, NOW / 1000 + 300);
        // alg: none, no signature.
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(good.to_string())
        );
        assert_eq!(keys.verify(&none, NOW), Err(TokenError::Invalid));
        // HS256 keyed with the public key (the classic algorithm confusion).
        let hs = forge(r#"{"alg":"HS256","typ":"JWT"}"#, &good, |m| {
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&keys.public_key()).unwrap();
            mac.update(m);
            mac.finalize().into_bytes().to_vec()
        });
        assert_eq!(keys.verify(&hs, NOW), Err(TokenError::Invalid));
        // Signed by another key.
        let other = TokenKeys::generate("test").issue("usr_1", "s1", NOW, 300_000);
        assert_eq!(keys.verify(&other, NOW), Err(TokenError::Invalid));
        // Wrong audience and wrong issuer, properly signed.
        let wrong_aud = {
            let mut c = good.clone();
            c["aud"] = "somebody-else".into();
            jsonwebtoken::encode(&Header::new(Algorithm::EdDSA), &c, &keys.encoding).unwrap()
        };
        assert_eq!(keys.verify(&wrong_aud, NOW), Err(TokenError::Invalid));
        let wrong_iss = TokenKeys { issuer: "elsewhere".into(), ..TokenKeys::generate("x") };
        let t = wrong_iss.issue("usr_1", "s1", NOW, 300_000);
        assert_eq!(keys.verify(&t, NOW), Err(TokenError::Invalid));
        // Altered payload: the user id changed after signing.
        let t = keys.issue("usr_1", "s1", NOW, 300_000);
        let parts: Vec<&str> = t.split('.').collect();
        let mut c: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        c["sub"] = "usr_admin".into();
        let altered = format!("{}.{}.{}", parts[0], B64.encode(c.to_string()), parts[2]);
        assert_eq!(keys.verify(&altered, NOW), Err(TokenError::Invalid));
        // Expired, properly signed.
        let t = keys.issue("usr_1", "s1", NOW - 600_000, 300_000);
        assert_eq!(keys.verify(&t, NOW), Err(TokenError::Expired));
        assert_eq!(keys.verify("garbage", NOW), Err(TokenError::Invalid));
    }
}
