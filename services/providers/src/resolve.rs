//! Which provider to use (spec §3.15.1), shared by the scheduler's reconciles and cleanup's
//! orphan reaper: the explicit configuration of a call, else the stored one, else the
//! configured default (`scheduler.default_provider`), validated as spec §3.3 asks, with the Fly
//! API token from the call or the active `fly.apiToken` secret.

use common::OpError;
use common::model::ProviderConfig;
use common::service::ServiceContext;
use secrecy::ExposeSecret;

use crate::Provider;
use crate::fly::FlyProvider;
use crate::local::LocalProvider;

/// A provider configuration with every field the scheduler needs (spec §3.3 validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidProviderConfig {
    pub kind: String,
    pub app_name: String,
    pub image: String,
    pub region: String,
    pub volume_name: String,
    pub volume_path: String,
    pub volume_size_gb: u32,
}

/// A validated provider configuration with the provider it names.
pub struct ResolvedProvider {
    pub config: ValidProviderConfig,
    pub provider: Box<dyn Provider>,
}

/// The provider to use (spec §3.15.1): the explicit config (validated, used for this call
/// only), else the stored one (a stored one missing fields means "not configured": nothing
/// to do), else the configured default. `None` = nothing to do.
pub async fn resolve_provider(
    ctx: &ServiceContext,
    explicit: Option<ProviderConfig>,
    fly_api_token: Option<String>,
) -> Result<Option<ResolvedProvider>, OpError> {
    let config = match explicit {
        Some(config) => validate_provider_config(&config)?,
        None => match common::runtime_config::provider_config(ctx).await? {
            Some(stored) => match validate_provider_config(&stored) {
                Ok(config) => config,
                Err(e) => {
                    tracing::warn!(error = %e, "stored provider config is incomplete; nothing to reconcile");
                    return Ok(None);
                }
            },
            None if ctx.settings.scheduler.default_provider == "local" => local_default(),
            None => return Ok(None),
        },
    };
    let settings = &ctx.settings;
    let provider: Box<dyn Provider> = match config.kind.as_str() {
        "fly" => {
            let token = match fly_api_token.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
                Some(token) => token,
                None => active_secret(ctx, "fly.apiToken").await?.ok_or_else(|| {
                    OpError::invalid(
                        "Missing Fly API token. Import an active 'fly.apiToken' secret or pass flyApiToken explicitly.",
                    )
                })?,
            };
            Box::new(FlyProvider::new(&settings.providers.fly_base_url, &token, &settings.providers))
        }
        "local" => Box::new(local_provider(settings)),
        other => return Err(OpError::invalid(format!("Unsupported provider '{other}'"))),
    };
    Ok(Some(ResolvedProvider { config, provider }))
}

/// The active value of `secret_ref`, trimmed, opened with the cipher built from `secrets.key`.
pub async fn active_secret(ctx: &ServiceContext, secret_ref: &str) -> Result<Option<String>, OpError> {
    let cipher = common::secrets::cipher_from_settings(&ctx.settings).map_err(OpError::internal)?;
    let value = common::secrets::active_secret(ctx, &cipher, secret_ref).await?;
    Ok(value.map(|v| v.expose_secret().trim().to_string()))
}

/// The app name of the local provider's default configuration.
pub const LOCAL_APP: &str = "local";

/// The provider config of the one-machine stack: workers as child processes.
fn local_default() -> ValidProviderConfig {
    ValidProviderConfig {
        kind: "local".to_string(),
        app_name: LOCAL_APP.to_string(),
        image: "af-worker".to_string(),
        region: "local".to_string(),
        volume_name: "openclaw_data".to_string(),
        volume_path: "/data".to_string(),
        volume_size_gb: 1,
    }
}

/// The local provider as configured: volumes under `providers.local_dir` (default
/// `<data_dir>/workers`), running `providers.worker_binary`.
pub fn local_provider(settings: &common::config::Settings) -> LocalProvider {
    let root = match settings.providers.local_dir.trim() {
        "" => settings.data_dir.join("workers"),
        dir => dir.into(),
    };
    LocalProvider::new(root, worker_binary(&settings.providers.worker_binary))
}

/// `providers.worker_binary`, or `af-worker` next to the running executable.
fn worker_binary(configured: &str) -> std::path::PathBuf {
    if !configured.trim().is_empty() {
        return configured.into();
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("af-worker")))
        .unwrap_or_else(|| "af-worker".into())
}

/// Spec §3.3 `ensureProviderConfig`, with its messages.
pub fn validate_provider_config(config: &ProviderConfig) -> Result<ValidProviderConfig, OpError> {
    let missing = |field: &str| {
        OpError::invalid(format!(
            "Missing providerConfig.{field}. Pass providerConfig explicitly when starting/reconciling workers."
        ))
    };
    let text = |value: &Option<String>, field: &str| {
        value.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).ok_or_else(|| missing(field))
    };
    let kind = config.kind.clone().unwrap_or_else(|| "fly".to_string());
    let app_name = text(&config.app_name, "appName")?;
    // The organization slug is required by the original although unused (spec §6.3 L15).
    text(&config.organization_slug, "organizationSlug")?;
    let image = text(&config.image, "image")?;
    let region = text(&config.region, "region")?;
    let volume_name = text(&config.volume_name, "volumeName")?;
    let volume_path = text(&config.volume_path, "volumePath")?;
    let size = config.volume_size_gb.filter(|s| s.is_finite() && *s > 0.0).ok_or_else(|| missing("volumeSizeGb"))?;
    Ok(ValidProviderConfig {
        kind,
        app_name,
        image,
        region,
        volume_name,
        volume_path,
        volume_size_gb: size.ceil() as u32,
    })
}
