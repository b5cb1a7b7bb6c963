//! Rotation of `secrets.key`: [`status`] counts the stored versions by the key that sealed
//! them, and [`reencrypt`] seals every version not under the current key again with it
//! (operations `getSecretsKeyRotationStatus` and `reencryptSecrets`). The background loop
//! ([`run_loop`], leader-elected across hydration replicas) runs the same pass periodically, so
//! after `secrets.key` changes (the old key moved to `secrets.previous_keys`) every secret moves
//! onto the new key by itself; the status says when the old key can be removed.
//!
//! Each document is rewritten by compare-and-set on its KV revision: a version imported
//! concurrently makes the write conflict, and the pass reads the document again and redoes it,
//! so no version is lost. Re-encryption keeps each version's number, so its associated data
//! (`"<secretRef>#<version>"`) and everything else about it stay the same. Plaintext stays in
//! memory as a `SecretString` for the moment between open and seal, and is never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use common::OpError;
use common::api;
use common::api::profiles::{ReencryptedSecrets, SecretsKeyRotationStatus};
use common::auth::Caller;
use common::crypto::SecretCipher;
use common::ops::OpRegistry;
use common::secrets::{SecretDocument, aad};
use common::service::ServiceContext;
use secrecy::ExposeSecret;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub(crate) fn register(ctx: &ServiceContext, cipher: Arc<SecretCipher>, ops: &mut OpRegistry) {
    ops.handle::<api::GetSecretsKeyRotationStatus, _, _, _, _>(
        &(ctx.clone(), cipher.clone()),
        |(ctx, cipher), _: Caller, _| async move { status(&ctx, &cipher).await },
    );
    ops.handle::<api::ReencryptSecrets, _, _, _, _>(&(ctx.clone(), cipher), |(ctx, cipher), _: Caller, _| async move {
        reencrypt(&ctx, &cipher).await
    });
}

/// Counts every stored version by the key that sealed it.
pub async fn status(ctx: &ServiceContext, cipher: &SecretCipher) -> Result<SecretsKeyRotationStatus, OpError> {
    let docs = ctx.buckets.secrets.all::<SecretDocument>().await?;
    let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
    let (mut pending, mut unknown) = (0, 0);
    for (_, doc) in &docs {
        for v in &doc.value.versions {
            *by_key.entry(v.key_id.clone()).or_default() += 1;
            pending += u64::from(cipher.needs_reencryption(&v.key_id));
            unknown += u64::from(!cipher.knows(&v.key_id));
        }
    }
    Ok(SecretsKeyRotationStatus {
        current_key_id: cipher.key_id().to_string(),
        previous_key_ids: cipher.previous_key_ids(),
        versions_by_key_id: by_key,
        secret_refs: docs.len() as u64,
        pending_versions: pending,
        unknown_key_versions: unknown,
    })
}

/// Per-document outcome of one rewrite attempt (reset when a conflict makes it run again).
#[derive(Default, Clone, Copy)]
struct DocCounts {
    reencrypted: u64,
    failed: u64,
}

/// Seals every version not under the current key again with it, one compare-and-set per
/// document, and answers what it did and the status after it.
pub async fn reencrypt(ctx: &ServiceContext, cipher: &SecretCipher) -> Result<ReencryptedSecrets, OpError> {
    let (mut reencrypted, mut rewritten, mut failed) = (0, 0, 0);
    for key in ctx.buckets.secrets.keys().await? {
        let mut counts = DocCounts::default();
        let written = ctx
            .buckets
            .secrets
            .modify::<SecretDocument, OpError, _>(&key, |current| {
                counts = DocCounts::default();
                let Some(mut doc) = current else { return Ok(None) };
                for v in &mut doc.versions {
                    if !cipher.needs_reencryption(&v.key_id) {
                        continue;
                    }
                    let aad = aad(&doc.secret_ref, v.version);
                    let Ok(plain) = cipher.open(&v.sealed(), &aad) else {
                        counts.failed += 1;
                        continue;
                    };
                    let sealed = cipher.seal(plain.expose_secret(), &aad)?;
                    (v.key_id, v.algorithm, v.nonce, v.ciphertext) =
                        (sealed.key_id, sealed.algorithm, sealed.nonce, sealed.ciphertext);
                    counts.reencrypted += 1;
                }
                Ok((counts.reencrypted > 0).then_some(doc))
            })
            .await?;
        if counts.failed > 0 {
            tracing::warn!(key = %key, versions = counts.failed, "secret versions not re-encrypted: no configured key opens them");
        }
        failed += counts.failed;
        if written.is_some() {
            reencrypted += counts.reencrypted;
            rewritten += 1;
        }
    }
    if reencrypted > 0 {
        tracing::info!(versions = reencrypted, refs = rewritten, key_id = cipher.key_id(), "secrets re-encrypted");
    }
    let status = status(ctx, cipher).await?;
    Ok(ReencryptedSecrets {
        reencrypted_versions: reencrypted,
        rewritten_refs: rewritten,
        failed_versions: failed,
        status,
    })
}

/// The background re-encryption: while this replica leads, one pass every
/// `loops.secrets_reencryption_interval_ms`. Paused by `loops.secrets_reencryption = false` or
/// `loops.manual`.
pub async fn run_loop(ctx: ServiceContext, cipher: Arc<SecretCipher>, shutdown: CancellationToken) {
    let loops = &ctx.settings.loops;
    if !loops.enabled(loops.secrets_reencryption) {
        tracing::info!("secrets re-encryption paused by configuration (loops.secrets_reencryption / loops.manual)");
        return;
    }
    let interval = Duration::from_millis(loops.secrets_reencryption_interval_ms);
    let holder = format!("{}-{}-{}", crate::SERVICE, std::process::id(), uuid::Uuid::new_v4().simple());
    let leaders = ctx.buckets.leaders.clone();
    common::leader::run_elected(leaders, "hydration-secrets-reencryption", &holder, shutdown, |lead| {
        let (ctx, cipher) = (ctx.clone(), cipher.clone());
        async move {
            loop {
                if let Err(e) = reencrypt(&ctx, &cipher).await {
                    tracing::warn!(error = %e, "secrets re-encryption failed; retrying next pass");
                }
                tokio::select! {
                    _ = lead.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        }
    })
    .await;
}
