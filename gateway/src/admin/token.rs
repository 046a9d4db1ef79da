//! Admin API tokens: HS256 JWTs that carry a role, a bounded lifetime and an id.
//!
//! Owns: issuing and verifying tokens, and what each role may do. Must never: accept a
//! token without a valid signature, this gateway's issuer and audience, an `iat`, an
//! `nbf` that has passed, an unexpired `exp` no further than the maximum lifetime from its
//! `iat`, and a `jti` (revocation, checked against the store by [`super::revocation`]);
//! accept any algorithm but HS256 (no `none`, no algorithm confusion); or print the
//! signing secret (`Debug` redacts it).

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Issuer written into and required of every token.
pub const ISSUER: &str = "metering-gateway";
/// Audience written into and required of every token: tokens for other services signed
/// with a shared secret are refused.
pub const AUDIENCE: &str = "metering-gateway-admin";
/// The longest `exp - iat` accepted unless configured otherwise (one day).
pub const DEFAULT_MAX_LIFETIME_SECS: u64 = 86_400;
/// Clock skew tolerated on `exp`, `nbf` and `iat` (seconds).
pub const LEEWAY_SECS: u64 = 5;
/// Shortest signing secret accepted (bytes): HS256 wants at least its output size.
pub const MIN_SECRET_BYTES: usize = 32;

/// A signing secret. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into().trim().to_owned();
        if value.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the admin signing secret must be at least {MIN_SECRET_BYTES} bytes"
            ));
        }
        Ok(Self(value))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// The signing secret from a flag's value or a file, whichever is given (not both);
/// `None` when neither is.
pub fn resolve_secret(
    flag: Option<&Secret>,
    file: Option<&std::path::Path>,
) -> Result<Option<Secret>, String> {
    match (flag, file) {
        (Some(_), Some(_)) => {
            Err("give --admin-jwt-secret or --admin-jwt-secret-file, not both".into())
        }
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("reading the admin secret {}: {e}", path.display()))?;
            Secret::new(text).map(Some)
        }
        (None, None) => Ok(None),
    }
}

/// Who may do what on the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything.
    Admin,
    /// Runs the platform: tenants, plans, keys, usage, workers. No money.
    Operator,
    /// Closes periods: prices, usage, invoices, exports, reconciliation. No keys.
    Finance,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Self::Admin),
            "operator" => Ok(Self::Operator),
            "finance" => Ok(Self::Finance),
            _ => Err(format!("unknown role `{s}`: admin, operator or finance")),
        }
    }
}

/// An action on the admin API; each route needs exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Permission {
    /// List and read tenants, plans, keys (never secrets) and prices.
    ReadDirectory,
    /// Create tenants and plans, put tenants on plans.
    ManageTenants,
    /// Create, revoke and rotate keys.
    ManageKeys,
    /// Add price versions.
    ManagePrices,
    /// Usage series and leader boards.
    ReadUsage,
    /// Invoices: list, read, preview drafts.
    ReadInvoices,
    /// Finalise invoices.
    FinaliseInvoices,
    /// Usage and invoice exports, reconciliation.
    Export,
    /// Worker pool health and traffic (error rate, latency).
    ReadOperations,
    /// Revoke admin tokens by `jti`.
    RevokeTokens,
}

impl Permission {
    pub const ALL: [Permission; 10] = [
        Self::ReadDirectory,
        Self::ManageTenants,
        Self::ManageKeys,
        Self::ManagePrices,
        Self::ReadUsage,
        Self::ReadInvoices,
        Self::FinaliseInvoices,
        Self::Export,
        Self::ReadOperations,
        Self::RevokeTokens,
    ];
}

impl Role {
    /// Least privilege: each role gets what its job needs and nothing else.
    pub fn may(self, p: Permission) -> bool {
        use Permission::*;
        match self {
            Self::Admin => true,
            Self::Operator => matches!(
                p,
                ReadDirectory | ManageTenants | ManageKeys | ReadUsage | ReadOperations
            ),
            Self::Finance => matches!(
                p,
                ReadDirectory | ManagePrices | ReadUsage | ReadInvoices | FinaliseInvoices | Export
            ),
        }
    }

    pub fn permissions(self) -> Vec<Permission> {
        Permission::ALL
            .into_iter()
            .filter(|p| self.may(*p))
            .collect()
    }
}

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who holds it (a person or a service), for audit logs.
    pub sub: String,
    pub role: Role,
    pub iss: String,
    pub aud: String,
    /// Unix seconds when it was issued; `exp - iat` is at most the maximum lifetime.
    pub iat: u64,
    /// Unix seconds before which the token is refused.
    pub nbf: u64,
    /// Unix seconds after which the token is refused.
    pub exp: u64,
    /// The token's id, by which it is revoked.
    pub jti: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
    #[error("the token has been revoked")]
    Revoked,
    #[error("a token may live at most {0} seconds")]
    TooLong(u64),
}

/// Issues and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    max_lifetime_secs: u64,
}

impl fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenAuthority([redacted])")
    }
}

impl TokenAuthority {
    pub fn new(secret: &Secret) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        // Only HS256: a token naming any other algorithm is refused before its signature
        // is looked at, so a public key can never be used as an HMAC secret.
        validation.algorithms = vec![Algorithm::HS256];
        // `iat` and `jti` are required by `Claims` itself (a token without them does
        // not deserialise).
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
            max_lifetime_secs: DEFAULT_MAX_LIFETIME_SECS,
        }
    }

    /// The same authority with another maximum lifetime (`exp - iat`, seconds).
    pub fn with_max_lifetime(mut self, secs: u64) -> Self {
        self.max_lifetime_secs = secs;
        self
    }

    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime_secs
    }

    /// A token for `sub` with `role`, valid for `ttl_secs` from now (at most the maximum
    /// lifetime), with a fresh random `jti`.
    pub fn issue(&self, sub: &str, role: Role, ttl_secs: u64) -> Result<String, TokenError> {
        if ttl_secs == 0 || ttl_secs > self.max_lifetime_secs {
            return Err(TokenError::TooLong(self.max_lifetime_secs));
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            nbf: now,
            exp: now + ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| TokenError::Invalid)
    }

    /// The claims of a token this authority would have issued, not yet expired. Whether
    /// its `jti` has been revoked is the store's to say ([`super::revocation`]).
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let claims = match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => data.claims,
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                return Err(TokenError::Expired)
            }
            Err(_) => return Err(TokenError::Invalid),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let lifetime_ok = claims.exp >= claims.iat
            && claims.exp - claims.iat <= self.max_lifetime_secs
            && claims.iat <= now.saturating_add(LEEWAY_SECS);
        if !lifetime_ok || claims.jti.is_empty() {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn authority() -> TokenAuthority {
        TokenAuthority::new(&Secret::new(SECRET).unwrap())
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    }

    #[test]
    fn issued_tokens_verify_with_their_role() {
        let a = authority();
        let t = a.issue("alice", Role::Finance, 60).unwrap();
        let c = a.verify(&t).unwrap();
        assert_eq!((c.sub.as_str(), c.role), ("alice", Role::Finance));
    }

    #[test]
    fn alg_none_is_refused() {
        let claims = valid_claims();
        for alg in ["none", "None", "NONE"] {
            let token = format!(
                "{}.{}.",
                b64(&serde_json::json!({"alg": alg, "typ": "JWT"})),
                b64(&claims)
            );
            assert_eq!(
                authority().verify(&token),
                Err(TokenError::Invalid),
                "{alg}"
            );
        }
    }

    const SECRET: &str = "ssssssssssssssssssssssssssssssssssssssss";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    /// Claims that pass every check: each test below changes exactly one.
    fn valid_claims() -> serde_json::Value {
        let now = now();
        serde_json::json!({"sub": "m", "role": "admin", "iss": ISSUER,
            "aud": "metering-gateway-admin", "iat": now, "nbf": now, "exp": now + 600,
            "jti": "0190f0c8-5c6e-7bb1-8a33-6f1d4c1e2a10"})
    }

    fn signed(alg: Algorithm, claims: &serde_json::Value, secret: &str) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn other_secret_and_other_algorithms_are_refused() {
        assert!(authority()
            .verify(&signed(Algorithm::HS256, &valid_claims(), SECRET))
            .is_ok());
        let other = signed(Algorithm::HS256, &valid_claims(), &"t".repeat(40));
        assert_eq!(authority().verify(&other), Err(TokenError::Invalid));
        // Same secret, another HMAC: refused because the algorithm is pinned.
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = signed(alg, &valid_claims(), SECRET);
            assert_eq!(authority().verify(&t), Err(TokenError::Invalid), "{alg:?}");
        }
    }

    /// Key confusion: the token names RS256 but carries an HMAC-SHA256 made with the
    /// verifier's own key bytes as the HMAC secret (what an attacker does with a public
    /// key). Its signature is right — checked below — so only the algorithm policy can
    /// refuse it.
    #[test]
    fn an_rs256_header_over_a_correct_hmac_is_refused() {
        for alg in ["RS256", "ES256", "PS256"] {
            let head = b64(&serde_json::json!({"alg": alg, "typ": "JWT"}));
            let input = format!("{head}.{}", b64(&valid_claims()));
            let key = EncodingKey::from_secret(SECRET.as_bytes());
            let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
            let dkey = DecodingKey::from_secret(SECRET.as_bytes());
            assert!(
                jsonwebtoken::crypto::verify(&sig, input.as_bytes(), &dkey, Algorithm::HS256)
                    .unwrap(),
                "the confusion token's HMAC is valid"
            );
            let token = format!("{input}.{sig}");
            assert_eq!(
                authority().verify(&token),
                Err(TokenError::Invalid),
                "{alg}"
            );
            // The same claims and HMAC under the HS256 header pass: the header is all
            // that differs.
            let honest = format!(
                "{}.{}",
                b64(&serde_json::json!({"alg": "HS256", "typ": "JWT"})),
                b64(&valid_claims())
            );
            let sig =
                jsonwebtoken::crypto::sign(honest.as_bytes(), &key, Algorithm::HS256).unwrap();
            assert!(authority().verify(&format!("{honest}.{sig}")).is_ok());
        }
    }

    /// A change to one claim.
    type Change = Box<dyn Fn(&mut serde_json::Map<String, serde_json::Value>)>;

    /// Each case changes one claim of a token that is otherwise valid.
    #[test]
    fn each_claim_is_checked() {
        let now = now();
        let cases: Vec<(&str, Change)> = vec![
            (
                "wrong issuer",
                Box::new(|c| {
                    c.insert("iss".into(), "someone-else".into());
                }),
            ),
            (
                "no issuer",
                Box::new(|c| {
                    c.remove("iss");
                }),
            ),
            (
                "wrong audience",
                Box::new(|c| {
                    c.insert("aud".into(), "metering-gateway".into());
                }),
            ),
            (
                "no audience",
                Box::new(|c| {
                    c.remove("aud");
                }),
            ),
            (
                "not yet valid",
                Box::new(move |c| {
                    c.insert("nbf".into(), (now + 120).into());
                }),
            ),
            (
                "no nbf",
                Box::new(|c| {
                    c.remove("nbf");
                }),
            ),
            (
                "no iat",
                Box::new(|c| {
                    c.remove("iat");
                }),
            ),
            (
                "issued in the future",
                Box::new(move |c| {
                    c.insert("iat".into(), (now + 3_600).into());
                    c.insert("exp".into(), (now + 4_000).into());
                }),
            ),
            (
                "lifetime over the maximum",
                Box::new(move |c| {
                    c.insert("exp".into(), (now + DEFAULT_MAX_LIFETIME_SECS + 60).into());
                }),
            ),
            (
                "issued long ago, lifetime over the maximum",
                Box::new(move |c| {
                    c.insert("iat".into(), (now - 10 * DEFAULT_MAX_LIFETIME_SECS).into());
                    c.insert("nbf".into(), (now - 10 * DEFAULT_MAX_LIFETIME_SECS).into());
                }),
            ),
            (
                "exp before iat",
                Box::new(move |c| {
                    c.insert("iat".into(), (now + 700).into());
                }),
            ),
            (
                "no jti",
                Box::new(|c| {
                    c.remove("jti");
                }),
            ),
            (
                "empty jti",
                Box::new(|c| {
                    c.insert("jti".into(), "".into());
                }),
            ),
            (
                "no sub",
                Box::new(|c| {
                    c.remove("sub");
                }),
            ),
        ];
        let accepted: Vec<&str> = cases
            .into_iter()
            .filter(|(_, change)| {
                let mut claims = valid_claims();
                change(claims.as_object_mut().unwrap());
                authority()
                    .verify(&signed(Algorithm::HS256, &claims, SECRET))
                    .is_ok()
            })
            .map(|(what, _)| what)
            .collect();
        assert!(accepted.is_empty(), "accepted: {accepted:?}");
    }

    #[test]
    fn issued_tokens_carry_every_claim_within_the_lifetime() {
        let long = authority().with_max_lifetime(60);
        assert!(long
            .verify(&signed(Algorithm::HS256, &valid_claims(), SECRET))
            .is_err());
        assert!(long.issue("x", Role::Admin, 61).is_err());
        let t = long.issue("x", Role::Admin, 60).unwrap();
        let c = long.verify(&t).unwrap();
        assert_eq!(
            (c.aud.as_str(), c.exp - c.iat, c.nbf),
            (AUDIENCE, 60, c.iat)
        );
        assert!(!c.jti.is_empty());
        assert_ne!(
            long.issue("x", Role::Admin, 60)
                .map(|t| long.verify(&t).unwrap().jti),
            Ok(c.jti)
        );
    }

    #[test]
    fn roles_follow_least_privilege() {
        assert!(!Role::Finance.may(Permission::ManageKeys));
        assert!(!Role::Operator.may(Permission::FinaliseInvoices));
        assert!(!Role::Operator.may(Permission::Export));
        assert!(Role::Finance.may(Permission::FinaliseInvoices));
        assert!(Role::Operator.may(Permission::ManageKeys));
        assert_eq!(Role::Admin.permissions().len(), Permission::ALL.len());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let s = Secret::new("x".repeat(40)).unwrap();
        assert!(!format!("{s:?}").contains("xxxx"));
        assert!(Secret::new("short").is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn config() -> ProptestConfig {
            ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2_000),
            )
        }

        fn b64_bytes(b: &[u8]) -> String {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        }

        /// JSON-ish headers: the fields a JWT header may carry, with hostile values.
        fn header() -> impl Strategy<Value = serde_json::Value> {
            let alg = prop_oneof![
                Just("HS256".to_owned()),
                Just("none".to_owned()),
                Just("RS256".to_owned()),
                Just("HS512".to_owned()),
                Just("hs256".to_owned()),
                "\\PC{0,12}",
            ];
            (
                alg,
                proptest::option::of("\\PC{0,16}"),
                proptest::option::of("\\PC{0,16}"),
                proptest::option::of(any::<i64>()),
            )
                .prop_map(|(alg, typ, kid, extra)| {
                    let mut h = serde_json::json!({"alg": alg});
                    if let Some(t) = typ {
                        h["typ"] = t.into();
                    }
                    if let Some(k) = kid {
                        h["kid"] = k.into();
                    }
                    if let Some(x) = extra {
                        h["crit"] = serde_json::json!([x.to_string()]);
                        h["jku"] = x.into();
                    }
                    h
                })
        }

        proptest! {
            #![proptest_config(config())]

            /// Arbitrary text, dots included: never a panic, never a token.
            #[test]
            fn arbitrary_strings_never_authenticate(
                s in "[A-Za-z0-9_\\-.=+/ ]{0,200}|\\PC{0,120}",
            ) {
                prop_assert!(authority().verify(&s).is_err());
            }

            /// Three base64url parts of random bytes: never a panic, never a token.
            #[test]
            fn random_token_shapes_never_authenticate(
                a in proptest::collection::vec(any::<u8>(), 0..120),
                b in proptest::collection::vec(any::<u8>(), 0..200),
                c in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let token = format!("{}.{}.{}", b64_bytes(&a), b64_bytes(&b), b64_bytes(&c));
                prop_assert!(authority().verify(&token).is_err());
            }

            /// Any header over valid claims, with a random signature or none: refused.
            /// With the correct HS256 HMAC, accepted only if the header says HS256.
            #[test]
            fn any_header_never_authenticates_without_the_hmac(
                h in header(),
                sig in proptest::collection::vec(any::<u8>(), 0..64),
            ) {
                let input = format!("{}.{}", b64(&h), b64(&valid_claims()));
                let forged = format!("{input}.{}", b64_bytes(&sig));
                prop_assert!(authority().verify(&forged).is_err());
                let key = EncodingKey::from_secret(SECRET.as_bytes());
                let hmac =
                    jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::HS256).unwrap();
                let accepted = authority().verify(&format!("{input}.{hmac}")).is_ok();
                prop_assert!(!accepted || h["alg"] == "HS256", "accepted header {}", h);
            }
        }
    }
}
