//! Runs the queue-manager service on its own against `nats.url`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::process::run_service_binary(queue_manager::SERVICE, queue_manager::run).await
}
