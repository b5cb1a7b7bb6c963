//! Reading the stored secrets (spec §3.2): the document format of `af_secrets`, the secrets
//! cipher built from configuration, and the decryption of a ref's active version
//! ([`active_secret`]). Hydration owns every write (importing a version); the provider
//! resolution and hydration's bundles read active values through this module.
//!
//! Storage: one [`SecretDocument`] per secret ref in `af_secrets` (key = escaped secretRef)
//! holding every kept version. Each value is sealed with XChaCha20-Poly1305 under the configured
//! `secrets.key`, with [`aad`] (`"<secretRef>#<version>"`) as associated data, so a ciphertext
//! moved to another ref or version does not open. Plaintext leaves this module only as a
//! [`SecretString`].

use std::collections::BTreeMap;

use anyhow::Context as _;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::OpError;
use crate::clock::Millis;
use crate::config::Settings;
use crate::crypto::{Sealed, SecretCipher};
use crate::service::ServiceContext;
use crate::token::escape;

/// Every kept version of one secret ref, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretDocument {
    pub secret_ref: String,
    pub versions: Vec<SecretVersion>,
}

/// One sealed version. `nonce` and `ciphertext` are base64; `keyId` fingerprints the key that
/// sealed it (first 8 hex digits of its SHA-256). A version stored without one reads as an empty
/// id: it is opened with whichever configured key opens it, and re-encrypted like any version
/// not under the current key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretVersion {
    pub version: u64,
    #[serde(default)]
    pub key_id: String,
    pub algorithm: String,
    pub nonce: String,
    pub ciphertext: String,
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, String>>,
    pub created_at: Millis,
}

impl SecretVersion {
    /// The sealed value of this version, as the cipher opens it.
    pub fn sealed(&self) -> Sealed {
        Sealed {
            key_id: self.key_id.clone(),
            algorithm: self.algorithm.clone(),
            nonce: self.nonce.clone(),
            ciphertext: self.ciphertext.clone(),
        }
    }
}

impl SecretDocument {
    /// The active version, if any. Writes keep at most one.
    pub fn active(&self) -> Option<&SecretVersion> {
        self.versions.iter().rev().find(|v| v.active)
    }
}

/// The associated data a version is sealed with.
pub fn aad(secret_ref: &str, version: u64) -> String {
    format!("{secret_ref}#{version}")
}

/// Builds the secrets cipher from `secrets.key` (seals and opens) and `secrets.previous_keys`
/// (open only). Without a key no secret can be sealed or opened, so the hydration service
/// refuses to start.
pub fn cipher_from_settings(settings: &Settings) -> anyhow::Result<SecretCipher> {
    let key = settings.secrets.key.as_ref().context(
        "secrets.key is not configured: the hydration service needs a base64 32-byte key \
         (set AF_SECRETS__KEY or [secrets] key)",
    )?;
    SecretCipher::with_previous(key, &settings.secrets.previous_keys).map_err(|e| anyhow::anyhow!(e))
}

/// The stored document of `secret_ref`, or `None` when the ref has never been imported.
pub async fn load(ctx: &ServiceContext, secret_ref: &str) -> Result<Option<SecretDocument>, OpError> {
    let stored = ctx.buckets.secrets.get::<SecretDocument>(&escape(secret_ref)).await?;
    Ok(stored.map(|v| v.value))
}

/// The decrypted active value of `secret_ref`, or `None` when it has no active version.
/// A value that does not open (wrong key, tampered document) is an internal error.
pub async fn active_secret(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    secret_ref: &str,
) -> Result<Option<SecretString>, OpError> {
    let Some(doc) = load(ctx, secret_ref).await? else {
        return Ok(None);
    };
    let Some(active) = doc.active() else {
        return Ok(None);
    };
    cipher.open(&active.sealed(), &aad(secret_ref, active.version)).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_bad_key_names_secrets_key() {
        let mut settings = Settings::from_overrides(&[]).expect("defaults");
        settings.secrets.key = None;
        let err = cipher_from_settings(&settings).err().expect("fails");
        assert!(format!("{err:#}").contains("secrets.key"), "{err:#}");
        settings.secrets.key = Some(SecretString::from("short"));
        let err = cipher_from_settings(&settings).err().expect("fails");
        assert!(format!("{err:#}").contains("secrets.key"), "{err:#}");
        settings.secrets.key = Some(SecretString::from(crate::crypto::generate_key_base64().expect("key")));
        assert!(cipher_from_settings(&settings).is_ok());
    }

    #[test]
    fn a_version_stored_without_a_key_id_still_reads() {
        let doc: SecretDocument = serde_json::from_value(serde_json::json!({
            "secretRef": "r",
            "versions": [{"version": 1, "algorithm": "xchacha20poly1305-v1", "nonce": "", "ciphertext": "",
                          "active": true, "createdAt": 1}]
        }))
        .expect("legacy document parses");
        assert_eq!(doc.versions[0].key_id, "");
    }
}
