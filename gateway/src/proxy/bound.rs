//! What a body alone says of the most tokens a call can use: the pieces the one-pass read
//! and the whole parse share.
//!
//! Owns: the compact length of JSON text, `n` as the worker reads it, and the bound's shape.
//! Must never: bound a call below what the worker can let it use.

/// The length of valid JSON `text` written compactly (without the whitespace between
/// tokens), and the number of objects directly inside it (messages, for an array of them).
/// The length is never less than `serde_json::to_vec` of the same value makes, except where
/// a number is written shorter than serde writes it back, which no message text is.
pub(super) fn compact_len(text: &str) -> (i64, i64) {
    let (mut len, mut in_string, mut escaped) = (0i64, false, false);
    let (mut depth, mut objects) = (0u32, 0i64);
    for &b in text.as_bytes() {
        if in_string {
            len += 1;
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !b.is_ascii_whitespace() {
            len += 1;
            in_string = b == b'"';
            match b {
                b'{' | b'[' => {
                    depth += 1;
                    if b == b'{' && depth == 2 {
                        objects += 1;
                    }
                }
                b'}' | b']' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
    }
    (len, objects)
}

/// `n` as the worker reads it: absent or not a positive integer is one choice (the worker
/// refuses a bad `n`, so no more is generated).
pub(super) fn choices(n: Option<i64>) -> i64 {
    n.filter(|n| *n >= 1).unwrap_or(1)
}

/// The most tokens a call can use, from its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBound {
    pub prompt: i64,
    /// Per choice.
    pub completion: i64,
    pub choices: i64,
}
