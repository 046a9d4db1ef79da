//! Admin API tokens: HS256 JWTs that carry a role and an expiry.
//!
//! Owns: issuing and verifying tokens, and what each role may do. Must never: accept a
//! token without a valid signature and an unexpired `exp`, accept any algorithm but HS256
//! (no `none`, no algorithm confusion), or print the signing secret (`Debug` redacts it).

use std::fmt;
use std::str::FromStr;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Issuer written into and required of every token.
pub const ISSUER: &str = "metering-gateway";
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
}

impl Permission {
    pub const ALL: [Permission; 9] = [
        Self::ReadDirectory,
        Self::ManageTenants,
        Self::ManageKeys,
        Self::ManagePrices,
        Self::ReadUsage,
        Self::ReadInvoices,
        Self::FinaliseInvoices,
        Self::Export,
        Self::ReadOperations,
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
    pub iat: u64,
    /// Unix seconds after which the token is refused.
    pub exp: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("missing bearer token")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid")]
    Invalid,
}

/// Issues and verifies tokens with one HS256 secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        validation.set_issuer(&[ISSUER]);
        validation.leeway = 5;
        validation.validate_exp = true;
        Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        }
    }

    /// A token for `sub` with `role`, valid for `ttl_secs` from now.
    pub fn issue(&self, sub: &str, role: Role, ttl_secs: u64) -> Result<String, TokenError> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            iss: ISSUER.to_owned(),
            iat: now,
            exp: now + ttl_secs,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map_err(|_| TokenError::Invalid)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        match jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation) {
            Ok(data) => Ok(data.claims),
            Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(TokenError::Expired)
            }
            Err(_) => Err(TokenError::Invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn authority() -> TokenAuthority {
        TokenAuthority::new(&Secret::new("s".repeat(40)).unwrap())
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
        let claims = serde_json::json!({"sub": "x", "role": "admin", "iss": ISSUER,
            "iat": 0, "exp": jsonwebtoken::get_current_timestamp() + 60});
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

    #[test]
    fn other_secret_and_other_algorithms_are_refused() {
        let other = TokenAuthority::new(&Secret::new("t".repeat(40)).unwrap());
        let t = other.issue("mallory", Role::Admin, 60).unwrap();
        assert_eq!(authority().verify(&t), Err(TokenError::Invalid));
        // Same secret, another HMAC: refused because the algorithm is pinned.
        let claims = Claims {
            sub: "m".into(),
            role: Role::Admin,
            iss: ISSUER.into(),
            iat: 0,
            exp: jsonwebtoken::get_current_timestamp() + 60,
        };
        let key = EncodingKey::from_secret("s".repeat(40).as_bytes());
        let hs384 = jsonwebtoken::encode(&Header::new(Algorithm::HS384), &claims, &key).unwrap();
        assert_eq!(authority().verify(&hs384), Err(TokenError::Invalid));
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
}
