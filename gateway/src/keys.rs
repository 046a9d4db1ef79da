//! API keys: format, generation, hashing and verification.
//!
//! A key reads `sk-gw-<public id>-<secret><checksum>`: the public id finds the row, the
//! secret is 190 bits from the OS generator, and the checksum (CRC-32 of everything before
//! it) lets us reject mistyped keys without touching the store. Only the SHA-256 of the
//! whole key is stored, compared in constant time. The plaintext exists once, at creation.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub const KEY_PREFIX: &str = "sk-gw-";
const ID_LEN: usize = 16;
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A full key in plaintext. `Debug` never prints the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct PlaintextKey(String);

impl PlaintextKey {
    /// Generates a fresh key from the OS random generator.
    pub fn generate() -> Self {
        let id = random_base62(ID_LEN);
        let secret = random_base62(SECRET_LEN);
        let body = format!("{KEY_PREFIX}{id}-{secret}");
        let mut key = body.clone();
        key.extend(checksum(&body).map(char::from));
        Self(key)
    }

    /// Wraps a presented key after checking its shape and checksum.
    pub fn parse(raw: &str) -> Option<Self> {
        PresentedKey::parse(raw).map(|k| Self(k.raw.to_owned()))
    }

    /// The key as presented, to check against its stored hash.
    pub fn presented(&self) -> PresentedKey<'_> {
        PresentedKey {
            raw: &self.0,
            id: parse_parts(&self.0).map_or("", |(id, _)| id),
        }
    }

    pub fn public_id(&self) -> &str {
        self.presented().public_id()
    }

    /// The value stored in the database.
    pub fn hash(&self) -> String {
        hash_key(&self.0)
    }

    /// The plaintext, for the one moment it is shown.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlaintextKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PlaintextKey({KEY_PREFIX}{}-[redacted])",
            self.public_id()
        )
    }
}

/// A key as a caller presented it, borrowed from the request: its shape and checksum are
/// right; whether it is a key we issued is [`PresentedKey::matches`]. Not copied anywhere,
/// so the plaintext lives only in the request. `Debug` never prints the secret.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a> {
    raw: &'a str,
    id: &'a str,
}

impl<'a> PresentedKey<'a> {
    pub fn parse(raw: &'a str) -> Option<Self> {
        let (id, _) = parse_parts(raw)?;
        Some(Self { raw, id })
    }

    pub fn public_id(&self) -> &'a str {
        self.id
    }

    /// Constant-time comparison of this key's hash with the stored one (hex SHA-256).
    pub fn matches(&self, stored_hash: &str) -> bool {
        hash_hex(self.raw).ct_eq(stored_hash.as_bytes()).into()
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PresentedKey({KEY_PREFIX}{}-[redacted])", self.id)
    }
}

/// Splits a key into (public id, secret+checksum) if its shape and checksum are right.
fn parse_parts(raw: &str) -> Option<(&str, &str)> {
    let rest = raw.strip_prefix(KEY_PREFIX)?;
    let (id, tail) = rest.split_once('-')?;
    if id.len() != ID_LEN || tail.len() != SECRET_LEN + CHECKSUM_LEN {
        return None;
    }
    if !id
        .bytes()
        .chain(tail.bytes())
        .all(|b| b.is_ascii_alphanumeric())
    {
        return None;
    }
    let (body, sum) = raw.split_at(raw.len() - CHECKSUM_LEN);
    if checksum(body).ct_eq(sum.as_bytes()).unwrap_u8() != 1 {
        return None;
    }
    Some((id, tail))
}

pub fn hash_key(raw: &str) -> String {
    String::from_utf8_lossy(&hash_hex(raw)).into_owned()
}

/// The stored form of a key's hash: SHA-256 of the whole key, in lowercase hex.
fn hash_hex(raw: &str) -> [u8; 64] {
    let mut hex = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(Sha256::digest(raw.as_bytes()), &mut hex);
    hex
}

/// The checksum's characters (base62 of the CRC-32 of `body`).
fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes()) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

fn random_base62(len: usize) -> String {
    let mut rng = rand::rng();
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut byte = [0u8; 1];
        rng.fill_bytes(&mut byte);
        // Rejection sampling keeps every character equally likely.
        if (byte[0] as usize) < 62 * 4 {
            out.push(BASE62[byte[0] as usize % 62] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash_consistently() {
        let key = PlaintextKey::generate();
        let parsed = PlaintextKey::parse(key.expose()).unwrap();
        assert_eq!(parsed.public_id(), key.public_id());
        assert_eq!(key.public_id().len(), ID_LEN);
        assert!(parsed.presented().matches(&key.hash()));
        let secret = &key.expose()[KEY_PREFIX.len() + ID_LEN + 1..];
        assert!(!format!("{key:?}").contains(secret));
        let presented = PresentedKey::parse(key.expose()).unwrap();
        assert_eq!(presented.public_id(), key.public_id());
        assert!(!format!("{presented:?}").contains(secret));
        assert!(format!("{presented:?}").contains(key.public_id()));
    }

    #[test]
    fn a_key_matches_its_own_hash_only() {
        let (a, b) = (PlaintextKey::generate(), PlaintextKey::generate());
        assert!(a.presented().matches(&a.hash()));
        assert!(!a.presented().matches(&b.hash()));
        assert!(!a.presented().matches(&a.hash().to_uppercase()));
        assert!(!a.presented().matches(&a.hash()[..63]));
        assert!(!a.presented().matches(""));
        assert_eq!(a.hash(), hash_key(a.expose()));
    }

    #[test]
    fn a_changed_character_fails_the_checksum() {
        let key = PlaintextKey::generate();
        let mut raw = key.expose().to_owned();
        let i = raw.len() - CHECKSUM_LEN - 3;
        let c = if &raw[i..=i] == "a" { "b" } else { "a" };
        raw.replace_range(i..=i, c);
        assert!(PlaintextKey::parse(&raw).is_none());
        assert!(PlaintextKey::parse("sk-gw-short").is_none());
        assert!(PlaintextKey::parse("").is_none());
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Cases per property in `cargo test`; PROPTEST_CASES raises it for a longer run.
        fn config() -> ProptestConfig {
            ProptestConfig::with_cases(
                std::env::var("PROPTEST_CASES")
                    .ok()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(2_000),
            )
        }

        proptest! {
            #![proptest_config(config())]

            /// Any bytes (lossily decoded, as a header value would be) parse or are
            /// refused; they never panic, and what parses has the key's shape.
            #[test]
            fn any_bytes_parse_or_are_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..80),
            ) {
                let raw = String::from_utf8_lossy(&bytes);
                if let Some(k) = PresentedKey::parse(&raw) {
                    prop_assert_eq!(k.public_id().len(), ID_LEN);
                    prop_assert!(raw.starts_with(KEY_PREFIX));
                }
            }

            /// Strings shaped like keys, with any characters in each part.
            #[test]
            fn key_shaped_strings_never_panic(
                id in "\\PC{0,20}",
                tail in "\\PC{0,42}",
            ) {
                let raw = format!("{KEY_PREFIX}{id}-{tail}");
                let _ = PlaintextKey::parse(&raw).map(|k| k.hash());
            }

            /// One changed character of a generated key is refused (checksum or shape)
            /// or, if it still parses, hashes differently: it never matches the original.
            #[test]
            fn generated_keys_round_trip_and_edits_never_match(
                at in 0usize..60,
                c in any::<char>(),
            ) {
                let key = PlaintextKey::generate();
                let parsed = PlaintextKey::parse(key.expose());
                prop_assert_eq!(
                    parsed.as_ref().map(PlaintextKey::public_id),
                    Some(key.public_id())
                );
                prop_assert!(parsed.map(|p| p.presented().matches(&key.hash())) == Some(true));
                let mut chars: Vec<char> = key.expose().chars().collect();
                let at = at % chars.len();
                prop_assume!(chars[at] != c);
                chars[at] = c;
                let edited: String = chars.into_iter().collect();
                if let Some(p) = PresentedKey::parse(&edited) {
                    prop_assert!(!p.matches(&key.hash()));
                }
            }
        }
    }
}
