//! Encrypted, versioned secrets (spec §3.2, fixing §6.1 S3): `importPlaintextSecret`,
//! `getSecretsStatus`, and the resolution helpers the bundles use to pick an active value
//! ([`first_active_secret`], [`scoped_candidates`], [`bot_token_refs`]).
//!
//! Storage: one [`SecretDocument`] per secret ref in `af_secrets` (key = escaped secretRef)
//! holding every kept version, rewritten by compare-and-set. The document format, the sealing's
//! associated data and the reading of an active value ([`active_secret`]) are in
//! `common::secrets`; this module owns the writes. Each value is sealed with XChaCha20-Poly1305
//! under the configured `secrets.key`, with `"<secretRef>#<version>"` as associated data, so a
//! ciphertext moved to another ref or version does not open. Plaintext is not logged, not
//! traced, not part of any error message and not returned by any operation.
//!
//! Deviation from the original: at most [`MAX_VERSIONS_PER_REF`] versions are kept per ref; the
//! oldest inactive versions are dropped first (the original kept every version forever).

use std::collections::BTreeMap;
use std::sync::Arc;

use common::OpError;
use common::api;
use common::api::profiles::{ImportSecretArgs, ImportedSecret, SecretStatus};
use common::auth::Caller;
use common::clock::Millis;
use common::crypto::{Sealed, SecretCipher};
use common::ids::SecretRef;
use common::ops::OpRegistry;
use common::secrets::{SecretDocument, SecretVersion, aad, active_secret, load};
use common::service::ServiceContext;
use common::token::escape;
use secrecy::{ExposeSecret, SecretString};

/// Versions kept per secret ref (the active one always among them).
pub const MAX_VERSIONS_PER_REF: usize = 20;
/// Largest accepted plaintext, in bytes.
pub const MAX_PLAINTEXT_BYTES: usize = 64 * 1024;

pub(crate) fn register(ctx: &ServiceContext, cipher: Arc<SecretCipher>, ops: &mut OpRegistry) {
    ops.handle::<api::ImportPlaintextSecret, _, _, _, _>(
        &(ctx.clone(), cipher),
        |(ctx, cipher), _: Caller, args| async move { import(&ctx, &cipher, args).await },
    );
    ops.handle::<api::GetSecretsStatus, _, _, _, _>(ctx, |ctx, _: Caller, args| async move {
        status(&ctx, args.secret_refs.into_iter().map(SecretRef::into_string).collect()).await
    });
}

async fn import(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    args: ImportSecretArgs,
) -> Result<ImportedSecret, OpError> {
    let plaintext = args.plaintext_value.into_secret();
    let len = plaintext.expose_secret().len();
    if len == 0 {
        return Err(OpError::invalid("plaintextValue: must not be empty"));
    }
    if len > MAX_PLAINTEXT_BYTES {
        return Err(OpError::invalid(format!(
            "plaintextValue: must be at most {MAX_PLAINTEXT_BYTES} bytes, got {len}"
        )));
    }
    let now = ctx.clock.now_ms();
    let secret_ref = args.secret_ref.into_string();
    let stored = ctx
        .buckets
        .secrets
        .modify::<SecretDocument, OpError, _>(&escape(&secret_ref), |current| {
            add_version(
                current,
                &secret_ref,
                |version| cipher.seal(plaintext.expose_secret(), &aad(&secret_ref, version)),
                args.metadata.clone(),
                now,
            )
            .map(Some)
        })
        .await?
        .ok_or_else(|| OpError::internal("secret write returned no document"))?;
    let version = stored
        .value
        .active()
        .map(|v| v.version)
        .ok_or_else(|| OpError::internal("secret written without an active version"))?;
    tracing::info!(secret_ref = %secret_ref, version, "secret version imported");
    Ok(ImportedSecret { secret_id: aad(&secret_ref, version), secret_ref, version })
}

/// Appends a new active version to `current` (spec §3.2): `version = max + 1`, every previous
/// active version deactivated, `rotatedFrom` = the previously active version. Then drops the
/// oldest inactive versions beyond [`MAX_VERSIONS_PER_REF`].
pub fn add_version(
    current: Option<SecretDocument>,
    secret_ref: &str,
    seal: impl FnOnce(u64) -> Result<Sealed, OpError>,
    metadata: Option<BTreeMap<String, String>>,
    now: Millis,
) -> Result<SecretDocument, OpError> {
    let mut doc =
        current.unwrap_or_else(|| SecretDocument { secret_ref: secret_ref.to_string(), versions: Vec::new() });
    let next = doc.versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
    let rotated_from = doc.active().map(|v| v.version);
    for v in &mut doc.versions {
        v.active = false;
    }
    let sealed = seal(next)?;
    doc.versions.push(SecretVersion {
        version: next,
        key_id: sealed.key_id,
        algorithm: sealed.algorithm,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        active: true,
        rotated_from,
        metadata,
        created_at: now,
    });
    while doc.versions.len() > MAX_VERSIONS_PER_REF {
        let Some(oldest) =
            doc.versions.iter().enumerate().filter(|(_, v)| !v.active).min_by_key(|(_, v)| v.version).map(|(i, _)| i)
        else {
            break;
        };
        doc.versions.remove(oldest);
    }
    Ok(doc)
}

async fn status(ctx: &ServiceContext, secret_refs: Vec<String>) -> Result<Vec<SecretStatus>, OpError> {
    let lookups = secret_refs.into_iter().map(|secret_ref| async move {
        let version = load(ctx, &secret_ref).await?.and_then(|doc| doc.active().map(|v| v.version));
        Ok::<_, OpError>(SecretStatus { secret_ref, has_active: version.is_some(), version })
    });
    futures::future::try_join_all(lookups).await
}

/// Walks `refs` in order and returns the first ref with an active version, with its value.
pub async fn first_active_secret(
    ctx: &ServiceContext,
    cipher: &SecretCipher,
    refs: &[String],
) -> Result<Option<(String, SecretString)>, OpError> {
    for secret_ref in refs {
        if let Some(value) = active_secret(ctx, cipher, secret_ref).await? {
            return Ok(Some((secret_ref.clone(), value)));
        }
    }
    Ok(None)
}

/// The candidate refs for a per-agent secret (spec §3.2 "scoped candidates"): the preferred ref
/// (trimmed, when non-empty), then `<prefix>.<agentKey>`, then `<prefix>`, without duplicates.
pub fn scoped_candidates(agent_key: &str, prefix: &str, preferred: Option<&str>) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(3);
    let preferred = preferred.map(str::trim).filter(|p| !p.is_empty());
    for candidate in
        preferred.map(str::to_string).into_iter().chain([format!("{prefix}.{agent_key}"), prefix.to_string()])
    {
        if !out.contains(&candidate) {
            out.push(candidate);
        }
    }
    out
}

/// The refs of a profile that can hold its Telegram bot token, in order: `telegram.botToken`
/// or `telegram.botToken.<anything>` (spec §3.2 "agent bot token").
pub fn bot_token_refs(secrets_ref: &[String]) -> Vec<String> {
    secrets_ref.iter().filter(|r| *r == "telegram.botToken" || r.starts_with("telegram.botToken.")).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher() -> SecretCipher {
        let key = common::crypto::generate_key_base64().expect("key");
        SecretCipher::from_base64(&SecretString::from(key)).expect("cipher")
    }

    fn import(c: &SecretCipher, doc: Option<SecretDocument>, value: &str) -> SecretDocument {
        add_version(doc, "r", |v| c.seal(value, &aad("r", v)), None, 7).expect("add")
    }

    #[test]
    fn versions_count_up_and_only_the_newest_is_active() {
        let c = cipher();
        let d1 = import(&c, None, "one");
        let d2 = import(&c, Some(d1), "two");
        let d3 = import(&c, Some(d2), "three");
        let summary: Vec<_> = d3.versions.iter().map(|v| (v.version, v.active, v.rotated_from)).collect();
        assert_eq!(summary, vec![(1, false, None), (2, false, Some(1)), (3, true, Some(2))]);
        let active = d3.active().expect("active");
        let opened = c.open(&active.sealed(), &aad("r", 3)).expect("opens");
        assert_eq!(opened.expose_secret(), "three");
        assert!(c.open(&active.sealed(), &aad("r", 2)).is_err());
    }

    #[test]
    fn old_inactive_versions_are_dropped_beyond_the_cap() {
        let c = cipher();
        let mut doc = None;
        for i in 0..25 {
            doc = Some(import(&c, doc, &format!("v{i}")));
        }
        let doc = doc.expect("doc");
        assert_eq!(doc.versions.len(), MAX_VERSIONS_PER_REF);
        assert_eq!(doc.versions.first().map(|v| v.version), Some(6));
        assert_eq!(doc.active().map(|v| v.version), Some(25));
        assert_eq!(doc.versions.iter().filter(|v| v.active).count(), 1);
    }

    #[test]
    fn plaintext_arguments_are_not_echoed() {
        let err = serde_json::from_value::<ImportSecretArgs>(
            serde_json::json!({"secretRef": "r", "plaintextValue": 987654321}),
        )
        .expect_err("must fail");
        assert!(!err.to_string().contains("987654321"), "{err}");
        let args = serde_json::from_value::<ImportSecretArgs>(
            serde_json::json!({"secretRef": "r", "plaintextValue": "hunter2"}),
        )
        .expect("parses");
        assert!(!format!("{args:?}").contains("hunter2"));
    }

    #[test]
    fn scoped_candidates_and_bot_token_refs() {
        assert_eq!(
            scoped_candidates("a", "agent-bridge.serviceKey", Some("  custom ")),
            vec!["custom", "agent-bridge.serviceKey.a", "agent-bridge.serviceKey"]
        );
        assert_eq!(scoped_candidates("a", "p", Some("p.a")), vec!["p.a".to_string(), "p".to_string()]);
        assert_eq!(scoped_candidates("a", "p", Some(" ")), vec!["p.a", "p"]);
        let refs: Vec<String> = ["convex.url", "telegram.botToken.x", "telegram.botTokenX", "telegram.botToken"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(bot_token_refs(&refs), vec!["telegram.botToken.x", "telegram.botToken"]);
    }
}
