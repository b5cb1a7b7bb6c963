//! The hydration service: agent profiles ([`profiles`]), encrypted versioned secrets
//! ([`secrets`]) and the runtime configuration rows ([`runtime_config`]); later issues add
//! hydration bundles, history, snapshots, skills and attachments. This file only wires the
//! modules together: it builds the secrets cipher from configuration and registers every
//! operation the service serves.

pub mod attachments;
pub mod bindings;
pub mod blobs;
pub mod bundle;
mod fence;
pub mod history;
pub mod profiles;
pub mod runtime_config;
pub mod secrets;
pub mod skills;
pub mod snapshots;

use std::sync::Arc;

use anyhow::Context as _;
use common::config::Settings;
use common::crypto::SecretCipher;
use common::ops::OpRegistry;
use common::service::ServiceContext;
use tokio_util::sync::CancellationToken;

pub use secrets::{active_secret, first_active_secret};

pub const SERVICE: &str = "hydration";

/// Builds the secrets cipher from `secrets.key`. Without a key the service cannot seal or open
/// any secret, so it refuses to start.
pub fn cipher_from_settings(settings: &Settings) -> anyhow::Result<SecretCipher> {
    let key = settings.secrets.key.as_ref().context(
        "secrets.key is not configured: the hydration service needs a base64 32-byte key \
         (set AF_SECRETS__KEY or [secrets] key)",
    )?;
    SecretCipher::from_base64(key).map_err(|e| anyhow::anyhow!(e))
}

/// Registers this service's operations.
pub fn register(ctx: &ServiceContext, cipher: Arc<SecretCipher>, ops: &mut OpRegistry) {
    profiles::register(ctx, ops);
    secrets::register(ctx, cipher.clone(), ops);
    runtime_config::register(ctx, ops);
    history::register(ctx, ops);
    bundle::register(ctx, cipher.clone(), ops);
    snapshots::register(ctx, ops);
    blobs::register(ctx, ops);
    attachments::register(ctx, ops);
    bindings::register(ctx, ops);
    skills::register(ctx, ops);
}

/// Runs the service until `shutdown` is cancelled.
pub async fn run(ctx: ServiceContext, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cipher = Arc::new(cipher_from_settings(&ctx.settings)?);
    let mut ops = OpRegistry::new();
    register(&ctx, cipher, &mut ops);
    let health = common::service::serve_health(ctx.clone(), SERVICE, shutdown.clone());
    let serve = ops.serve(ctx, shutdown);
    tokio::try_join!(health, serve)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    #[test]
    fn a_missing_or_bad_key_names_secrets_key() {
        let mut settings = Settings::from_overrides(&[]).expect("defaults");
        settings.secrets.key = None;
        let err = cipher_from_settings(&settings).err().expect("fails");
        assert!(format!("{err:#}").contains("secrets.key"), "{err:#}");
        settings.secrets.key = Some(SecretString::from("short"));
        let err = cipher_from_settings(&settings).err().expect("fails");
        assert!(format!("{err:#}").contains("secrets.key"), "{err:#}");
        settings.secrets.key = Some(SecretString::from(common::crypto::generate_key_base64().expect("key")));
        assert!(cipher_from_settings(&settings).is_ok());
    }
}
