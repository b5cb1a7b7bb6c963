//! Reversible escaping of caller-supplied identifiers (conversation ids, agent keys, worker ids,
//! secret refs) into a single NATS subject token that is also a valid KV key.
//!
//! `[A-Za-z0-9_-]` pass through; every other byte becomes `=XX` (upper-case hex). The result never
//! contains `.`, `*`, `>` or whitespace, so one id is always exactly one subject token.

/// Escapes `id` into one subject token / KV key segment. Empty ids map to `=`.
pub fn escape(id: &str) -> String {
    if id.is_empty() {
        return "=".to_string();
    }
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push('=');
            out.push(char::from_digit((b >> 4) as u32, 16).unwrap_or('0').to_ascii_uppercase());
            out.push(char::from_digit((b & 0xf) as u32, 16).unwrap_or('0').to_ascii_uppercase());
        }
    }
    out
}

/// Reverses [`escape`]. Returns `None` for a token `escape` cannot have produced.
pub fn unescape(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_awkward_ids() {
        for id in [
            "",
            "plain-id_1",
            "telegram:123456:789",
            "a.b.c",
            "*",
            ">",
            "with space",
            "=",
            "==41",
            "ünïcødé 🚀",
            "user/agent\\x",
            "\0nul",
        ] {
            let token = escape(id);
            assert!(!token.is_empty());
            assert!(token.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-=".contains(&b)), "{token}");
            assert_eq!(unescape(&token).as_deref(), Some(id), "{id:?} -> {token}");
        }
    }

    #[test]
    fn distinct_ids_give_distinct_tokens() {
        assert_ne!(escape("a.b"), escape("a=2Eb"));
        assert_ne!(escape("="), escape(""));
    }

    #[test]
    fn rejects_malformed_tokens() {
        assert_eq!(unescape("=G1"), None);
        assert_eq!(unescape("abc="), None);
        assert_eq!(unescape("=FF"), None); // not UTF-8 on its own
    }
}
