//! Authenticated encryption of secrets at rest (XChaCha20-Poly1305, random 24-byte nonce per
//! value) and the process's source of random tokens. The secret reference and version are bound
//! as associated data, so a ciphertext copied onto another ref or version fails to open.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, Generate, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::error::OpError;

pub const SECRET_ALGORITHM: &str = "xchacha20poly1305-v1";

/// A sealed value as stored: base64 nonce and ciphertext (with tag), plus the key fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sealed {
    pub key_id: String,
    pub algorithm: String,
    pub nonce: String,
    pub ciphertext: String,
}

/// The secrets cipher: the current key seals, and every configured key (current and
/// `secrets.previous_keys`) opens the values sealed under it, found by the key id stored with
/// each value. Values stored before key ids were kept (an empty id) are tried with every key.
pub struct SecretCipher {
    current: KeyEntry,
    previous: Vec<KeyEntry>,
}

struct KeyEntry {
    cipher: XChaCha20Poly1305,
    key_id: String,
}

impl KeyEntry {
    fn from_base64(key: &SecretString) -> Result<Self, String> {
        let bytes =
            STANDARD.decode(key.expose_secret().trim()).map_err(|_| "secrets.key: must be base64".to_string())?;
        if bytes.len() != 32 {
            return Err(format!("secrets.key: must decode to 32 bytes, got {}", bytes.len()));
        }
        let key = Key::try_from(bytes.as_slice()).map_err(|_| "secrets.key: bad length".to_string())?;
        Ok(Self { cipher: XChaCha20Poly1305::new(&key), key_id: key_id_of(&bytes) })
    }
}

/// The id of a key as stored with each value: the first 8 hex digits of the SHA-256 of its bytes.
fn key_id_of(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..4])
}

impl SecretCipher {
    /// Builds the cipher from a base64-encoded 32-byte key (configuration key `secrets.key`).
    pub fn from_base64(key: &SecretString) -> Result<Self, String> {
        Ok(Self { current: KeyEntry::from_base64(key)?, previous: Vec::new() })
    }

    /// The current key and the previous keys that still open (`secrets.previous_keys`). A
    /// previous key equal to the current one is ignored.
    pub fn with_previous(key: &SecretString, previous: &[SecretString]) -> Result<Self, String> {
        let mut cipher = Self::from_base64(key)?;
        for key in previous {
            let entry = KeyEntry::from_base64(key)?;
            let known =
                entry.key_id == cipher.current.key_id || cipher.previous.iter().any(|p| p.key_id == entry.key_id);
            if !known {
                cipher.previous.push(entry);
            }
        }
        Ok(cipher)
    }

    /// The id of the key new values are sealed with.
    pub fn key_id(&self) -> &str {
        &self.current.key_id
    }

    /// The ids of the previous keys, in configuration order.
    pub fn previous_key_ids(&self) -> Vec<String> {
        self.previous.iter().map(|p| p.key_id.clone()).collect()
    }

    /// Whether a value stored with `key_id` must be sealed again under the current key.
    pub fn needs_reencryption(&self, key_id: &str) -> bool {
        key_id != self.current.key_id
    }

    /// Whether some configured key opens values stored with `key_id` (empty: unknown, tried
    /// with every key).
    pub fn knows(&self, key_id: &str) -> bool {
        key_id.is_empty() || key_id == self.current.key_id || self.previous.iter().any(|p| p.key_id == key_id)
    }

    pub fn seal(&self, plaintext: &str, aad: &str) -> Result<Sealed, OpError> {
        let nonce = XNonce::try_generate().map_err(OpError::internal)?;
        let ciphertext = self
            .current
            .cipher
            .encrypt(&nonce, Payload { msg: plaintext.as_bytes(), aad: aad.as_bytes() })
            .map_err(|_| OpError::internal("secret encryption failed"))?;
        Ok(Sealed {
            key_id: self.current.key_id.clone(),
            algorithm: SECRET_ALGORITHM.to_string(),
            nonce: STANDARD.encode(nonce),
            ciphertext: STANDARD.encode(ciphertext),
        })
    }

    pub fn open(&self, sealed: &Sealed, aad: &str) -> Result<SecretString, OpError> {
        if sealed.algorithm != SECRET_ALGORITHM {
            return Err(OpError::internal(format!("Unsupported secret algorithm '{}'", sealed.algorithm)));
        }
        let invalid = || OpError::internal("Invalid secret payload");
        let nonce = STANDARD.decode(&sealed.nonce).map_err(|_| invalid())?;
        let nonce = XNonce::try_from(nonce.as_slice()).map_err(|_| invalid())?;
        let ciphertext = STANDARD.decode(&sealed.ciphertext).map_err(|_| invalid())?;
        let candidates: Vec<&KeyEntry> = if sealed.key_id.is_empty() {
            std::iter::once(&self.current).chain(&self.previous).collect()
        } else {
            std::iter::once(&self.current).chain(&self.previous).filter(|k| k.key_id == sealed.key_id).collect()
        };
        if candidates.is_empty() {
            return Err(OpError::internal(format!(
                "secret was sealed with key '{}', which is neither secrets.key ('{}') nor one of \
                 secrets.previous_keys",
                sealed.key_id, self.current.key_id
            )));
        }
        for entry in candidates {
            let payload = Payload { msg: &ciphertext, aad: aad.as_bytes() };
            if let Ok(plain) = entry.cipher.decrypt(&nonce, payload) {
                return String::from_utf8(plain).map(SecretString::from).map_err(|_| invalid());
            }
        }
        Err(invalid())
    }
}

/// A fresh base64 32-byte key, as `secrets.key` expects.
pub fn generate_key_base64() -> Result<String, OpError> {
    let key = Key::try_generate().map_err(OpError::internal)?;
    Ok(STANDARD.encode(key))
}

/// `n` random bytes from the operating system's CSPRNG.
pub fn random_u64() -> u64 {
    // The OS RNG failing is unrecoverable for a service that mints leases and tokens.
    u64::generate()
}

/// A random token of `len` characters from `[0-9a-z]`.
pub fn random_base36(len: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = String::with_capacity(len);
    while out.len() < len {
        let mut r = random_u64();
        // 12 base-36 digits fit in 62 bits without bias worth caring about here.
        for _ in 0..12 {
            if out.len() == len {
                break;
            }
            out.push(ALPHABET[(r % 36) as usize] as char);
            r /= 36;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> SecretCipher {
        SecretCipher::from_base64(&SecretString::from(generate_key_base64().unwrap())).unwrap()
    }

    #[test]
    fn seal_open_round_trip_including_astral_characters() {
        let c = cipher();
        let sealed = c.seal("tok3n 🚀 ünï", "telegram.botToken#1").unwrap();
        assert!(!sealed.ciphertext.contains("tok3n"));
        let opened = c.open(&sealed, "telegram.botToken#1").unwrap();
        assert_eq!(opened.expose_secret(), "tok3n 🚀 ünï");
    }

    #[test]
    fn aad_binds_ref_and_version() {
        let c = cipher();
        let sealed = c.seal("v", "a#1").unwrap();
        assert!(c.open(&sealed, "a#2").is_err());
        assert!(c.open(&sealed, "b#1").is_err());
    }

    #[test]
    fn nonces_differ_and_tampering_fails() {
        let c = cipher();
        let a = c.seal("same", "r#1").unwrap();
        let b = c.seal("same", "r#1").unwrap();
        assert_ne!(a.nonce, b.nonce);
        let mut t = a.clone();
        t.ciphertext = STANDARD.encode(vec![0u8; 20]);
        assert!(c.open(&t, "r#1").is_err());
        assert!(cipher().open(&a, "r#1").is_err(), "another key must not open it");
    }

    #[test]
    fn previous_keys_open_and_the_current_key_seals() {
        let (k1, k2) =
            (SecretString::from(generate_key_base64().unwrap()), SecretString::from(generate_key_base64().unwrap()));
        let old = SecretCipher::from_base64(&k1).unwrap();
        let sealed_old = old.seal("old value", "r#1").unwrap();
        let rotated = SecretCipher::with_previous(&k2, std::slice::from_ref(&k1)).unwrap();
        assert_ne!(rotated.key_id(), old.key_id());
        assert_eq!(rotated.previous_key_ids(), vec![old.key_id().to_string()]);
        assert_eq!(rotated.open(&sealed_old, "r#1").unwrap().expose_secret(), "old value");
        assert!(rotated.needs_reencryption(&sealed_old.key_id));
        let sealed_new = rotated.seal("new value", "r#2").unwrap();
        assert_eq!(sealed_new.key_id, rotated.key_id());
        assert!(!rotated.needs_reencryption(&sealed_new.key_id));
        // Only the new key: the old value no longer opens.
        let only_new = SecretCipher::from_base64(&k2).unwrap();
        assert!(!only_new.knows(&sealed_old.key_id));
        assert!(only_new.open(&sealed_old, "r#1").is_err());
        assert_eq!(only_new.open(&sealed_new, "r#2").unwrap().expose_secret(), "new value");
        // A value stored without a key id (before ids were kept) is tried with every key.
        let mut legacy = sealed_old.clone();
        legacy.key_id = String::new();
        assert_eq!(rotated.open(&legacy, "r#1").unwrap().expose_secret(), "old value");
        assert!(rotated.needs_reencryption(""));
        assert!(only_new.open(&legacy, "r#1").is_err());
    }

    #[test]
    fn bad_keys_are_rejected_with_the_key_name() {
        let err = SecretCipher::from_base64(&SecretString::from("not base64!")).err().unwrap();
        assert!(err.contains("secrets.key"));
        let err = SecretCipher::from_base64(&SecretString::from(STANDARD.encode([1u8; 16]))).err().unwrap();
        assert!(err.contains("32 bytes"));
    }

    #[test]
    fn random_base36_has_the_requested_shape() {
        let s = random_base36(8);
        assert_eq!(s.len(), 8);
        assert!(s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase()));
        assert_ne!(random_base36(16), random_base36(16));
    }
}
