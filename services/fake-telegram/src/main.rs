//! `fake-telegram`: the fake Telegram Bot API on its own, for the compose file's `demo` profile
//! (the one-process stack runs it in-process with `agent-factory --fake-telegram`). It listens
//! on `AF_FAKE_TELEGRAM_BIND` (default `127.0.0.1:8081`) and delivers updates to the webhooks
//! bots register. Its control API has no authentication: keep it on a private network.

#[tokio::main]
async fn main() {
    let bind = std::env::var("AF_FAKE_TELEGRAM_BIND").unwrap_or_else(|_| "127.0.0.1:8081".to_string());
    let mut fake = match fake_telegram::FakeTelegram::try_start_on(&bind).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("fake-telegram: AF_FAKE_TELEGRAM_BIND={bind}: cannot listen: {e}");
            std::process::exit(64);
        }
    };
    fake.start_auto_delivery();
    println!("fake Telegram Bot API listening on {}", fake.base_url());
    common::service::shutdown_on_signals().cancelled().await;
}
