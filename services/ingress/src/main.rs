//! Runs ingress on its own against `nats.url`, serving HTTP on `http.bind`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::process::run_service_binary(ingress::SERVICE, |ctx, shutdown| async move {
        let listener = tokio::net::TcpListener::bind(&ctx.settings.http.bind).await?;
        tracing::info!(addr = %listener.local_addr()?, "ingress listening");
        ingress::run(ctx, listener, shutdown).await
    })
    .await
}
