//! Reading the stored runtime configuration (spec §3.3): the rows of `af_runtime_config`, each a
//! [`RuntimeConfigRow`] under [`PROVIDER_CONFIG_KEY`], [`SCALING_CONFIG_KEY`] or
//! [`MESSAGE_CONFIG_KEY`]. Hydration serves these rows and owns every write to them; the
//! scheduler, the provider resolution and cleanup read them through this module.

use serde::de::DeserializeOwned;

use crate::OpError;
use crate::model::{
    MESSAGE_CONFIG_KEY, MessageConfig, PROVIDER_CONFIG_KEY, ProviderConfig, RuntimeConfigRow, SCALING_CONFIG_KEY,
    ScalingPolicy,
};
use crate::service::ServiceContext;
use crate::store::JsonStore;

/// The stored message configuration, or `None` when no row exists.
pub async fn message_config(ctx: &ServiceContext) -> Result<Option<MessageConfig>, OpError> {
    read(&ctx.buckets.runtime_config, MESSAGE_CONFIG_KEY).await
}

/// The stored provider configuration, or `None` when no row exists.
pub async fn provider_config(ctx: &ServiceContext) -> Result<Option<ProviderConfig>, OpError> {
    read(&ctx.buckets.runtime_config, PROVIDER_CONFIG_KEY).await
}

/// The stored scaling policy, or `None` when no row exists.
pub async fn scaling_policy(ctx: &ServiceContext) -> Result<Option<ScalingPolicy>, OpError> {
    read(&ctx.buckets.runtime_config, SCALING_CONFIG_KEY).await
}

async fn read<T: DeserializeOwned>(store: &JsonStore, key: &str) -> Result<Option<T>, OpError> {
    let row = store.get::<RuntimeConfigRow<T>>(key).await?;
    Ok(row.map(|r| r.value.config))
}
