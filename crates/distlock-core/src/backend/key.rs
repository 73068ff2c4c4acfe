//! Lock keys: validation and a safe, collision-free encoding for backends
//! whose names are restricted (file names, ZooKeeper node names).

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Checks that `key` can name a lock: any non-empty UTF-8 string can.
pub fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidKey {
            key: String::new(),
            reason: "a lock key must not be empty",
        });
    }
    Ok(())
}

/// Encodes `key` as one path component made only of `[A-Za-z0-9_%~-]`.
///
/// ASCII letters, digits, `-` and `_` stay as they are; every other byte
/// becomes `%XX`, so distinct keys give distinct names (`a/b` is `a%2Fb`,
/// `a_b` stays `a_b`) and no name is `.` or `..`. When the result would be
/// longer than `max_len` bytes, it is replaced by `~` and the SHA-256 of
/// the key in hex (65 bytes); `~` never starts an escaped name, so the two
/// forms cannot collide.
///
/// ```
/// use distlock_core::backend::key::encode_component;
/// assert_eq!(encode_component("jobs/nightly report", 255), "jobs%2Fnightly%20report");
/// assert_eq!(encode_component(&"x".repeat(1024), 255).len(), 65);
/// ```
pub fn encode_component(key: &str, max_len: usize) -> String {
    assert!(max_len >= 65, "max_len must leave room for the hashed form");
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(byte as char);
        } else {
            out.push('%');
            out.push(char::from(HEX[(byte >> 4) as usize]));
            out.push(char::from(HEX[(byte & 0x0f) as usize]));
        }
        if out.len() > max_len {
            return hashed(key);
        }
    }
    out
}

fn hashed(key: &str) -> String {
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(65);
    out.push('~');
    for byte in digest.iter() {
        out.push(char::from(HEX[(byte >> 4) as usize]));
        out.push(char::from(HEX[(byte & 0x0f) as usize]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn empty_key_is_invalid() {
        assert!(matches!(validate_key(""), Err(Error::InvalidKey { .. })));
        validate_key(" ").unwrap();
        validate_key("a/b").unwrap();
    }

    #[test]
    fn encoding_is_injective_on_awkward_keys() {
        let long = "k".repeat(1024);
        let long2 = format!("{}j", "k".repeat(1023));
        let keys = [
            "a/b",
            "a_b",
            "a%2Fb",
            "a b",
            "a%20b",
            ".",
            "..",
            "~",
            "%7E",
            "ключ",
            "{tag}",
            "*",
            long.as_str(),
            long2.as_str(),
            "A",
            "a",
        ];
        let names: HashSet<String> = keys.iter().map(|k| encode_component(k, 200)).collect();
        assert_eq!(names.len(), keys.len());
        for name in &names {
            assert!(name != "." && name != ".." && name.len() <= 200, "{name}");
            assert!(name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_%~".contains(&b)));
        }
    }
}
