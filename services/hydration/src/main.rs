//! Runs the hydration service on its own against `nats.url`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::process::run_service_binary(hydration::SERVICE, hydration::run).await
}
