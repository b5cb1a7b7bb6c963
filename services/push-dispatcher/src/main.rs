//! Runs the push-dispatcher service on its own against `nats.url`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::process::run_service_binary(push_dispatcher::SERVICE, push_dispatcher::run).await
}
