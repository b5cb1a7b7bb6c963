//! The one-process launcher as a user runs it (`agent-factory`, embedded nats-server).

use std::time::Duration;

/// The pid of the embedded nats-server, from the ports file it writes (`<name>_<pid>.ports`).
fn nats_pid(run_dir: &std::path::Path) -> Option<i32> {
    std::fs::read_dir(run_dir).ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().into_string().ok()?;
        let stem = name.strip_suffix(".ports")?;
        stem.rsplit('_').next()?.parse().ok()
    })
}

/// When the embedded nats-server dies, the launcher does not run on without its state: it stops
/// with a non-zero exit, so a supervisor restarts it on the same data.
#[tokio::test]
async fn launcher_exits_non_zero_when_its_embedded_nats_server_dies() {
    common::telemetry::install_crypto_provider();
    let binary = tests::workspace_binary("launcher", "agent-factory");
    let data = tempfile::tempdir().expect("tmp");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut child = tokio::process::Command::new(binary)
        // As a user runs it: from the checkout, where it finds .tools/nats.
        .current_dir(tests::project_root())
        .env("AF_DATA_DIR", data.path())
        .env("AF_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("AF_SCHEDULER__DEFAULT_PROVIDER", "none")
        .env("AF_TELEMETRY__LOG_FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("agent-factory starts");
    let health = format!("http://127.0.0.1:{port}/healthz");
    tests::wait_until("the launcher answers /healthz", Duration::from_secs(60), || async {
        reqwest::get(&health).await.ok().filter(|r| r.status() == 200).map(|_| ())
    })
    .await;
    let pid = nats_pid(&data.path().join("run")).expect("the embedded nats-server's ports file");
    common::nats_server::signal(pid as u32, libc::SIGKILL);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the launcher stops once its nats-server is gone")
        .expect("exit status");
    assert!(!status.success(), "exit status {status}");
}
