//! Runs the cleanup service on its own against `nats.url`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::process::run_service_binary(cleanup::SERVICE, cleanup::run).await
}
