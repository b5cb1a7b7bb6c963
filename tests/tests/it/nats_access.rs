//! Least privilege on NATS (`common::nats_access`): a service's user is refused everything its
//! grant does not name, while the stack, whose services all run as their own users in every
//! test, does its work. The compose stack's server configuration is generated from the same
//! grants, encrypts its store at rest, and is started here as written.

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::nats_access::{self, ADMIN_USER};
use common::nats_server::{NatsServer, NatsServerOptions};
use serde_json::json;
use tests::{TestStack, message, seed_profile, wait_until};

/// A raw NATS client as `service`'s user: what an attacker holding that service's credentials
/// has. Requests give up after half a second (a refused one gets no answer).
async fn connect_as(url: &str, service: &str) -> async_nats::Client {
    let (address, credentials) = common::service::split_credentials(url);
    let (user, password) = credentials.expect("a user in the url");
    async_nats::ConnectOptions::new()
        .user_and_password(user, password)
        .custom_inbox_prefix(nats_access::inbox_prefix(service))
        .request_timeout(Some(Duration::from_millis(500)))
        .connect(address)
        .await
        .expect("a service user connects")
}

/// Waits until the server has logged a violation naming `subject`.
async fn refused(violations: impl Fn() -> Vec<String>, subject: &str) {
    let needle = format!("\"{subject}\"");
    wait_until(&format!("the server refuses {subject}"), Duration::from_secs(10), || {
        let found = violations().iter().any(|line| line.contains(&needle));
        async move { found.then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn nats_access_a_compromised_service_user_is_refused_everything_outside_its_grant() {
    let stack = TestStack::start().await;
    stack.nats.allow_permission_violations.store(true, Ordering::Relaxed);
    seed_profile(&stack.ctx, "agent-a").await;
    let app = stack.app();
    app.ok("enqueueMessage", message("telegram:1", "agent-a", "private text")).await;

    // Ingress faces the internet: the likeliest service to be taken over.
    let ingress = connect_as(&stack.nats.service_url("ingress"), "ingress").await;
    let js = async_nats::jetstream::new(ingress.clone());
    let violations = || stack.nats.permission_violations();

    // Reading the inbox stream (message texts): its configuration is visible, its messages not.
    let inbox = js.get_stream(common::topology::INBOX_STREAM).await.expect("stream info is granted");
    let token = common::token::escape("telegram:1");
    assert!(inbox.direct_get_last_for_subject(common::topology::inbox_subject(&token)).await.is_err());
    refused(violations, &format!("$JS.API.DIRECT.GET.{}.af.inbox.{token}", common::topology::INBOX_STREAM)).await;

    // Reading a bucket it was not granted (secrets), or consuming the history stream.
    let secrets = js.get_key_value(common::topology::SECRETS).await.expect("bucket info is granted");
    assert!(secrets.get("any").await.is_err());
    refused(violations, "$JS.API.DIRECT.GET.KV_af_secrets.$KV.af_secrets.any").await;

    // Sniffing another service's operation requests (they carry bearer tokens) or replies.
    for subject in ["af.op.importPlaintextSecret", "af.op.>", "_INBOX.>", "_INBOX_hydration.>", "af.inbox.>"] {
        let _subscription = ingress.subscribe(subject).await.expect("the client sends SUB");
        ingress.flush().await.expect("flush");
        refused(violations, subject).await;
    }

    // Forging a job into a conversation's inbox, or deleting a conversation's lease.
    ingress.publish(common::topology::inbox_subject(&token), "{}".into()).await.expect("publish");
    ingress.publish(format!("$KV.af_queue_state.{token}"), "".into()).await.expect("publish");
    ingress.flush().await.expect("flush");
    refused(violations, &common::topology::inbox_subject(&token)).await;
    refused(violations, &format!("$KV.af_queue_state.{token}")).await;
    let stats = stack.admin().ok("getQueueStats", json!({})).await;
    assert_eq!(stats["queuedTotal"], 1, "the forged job was not queued: {stats}");

    // What ingress is granted still works for it: its own replies (an operation round trip).
    let reply = ingress.request("af.health.queue-manager", "".into()).await.expect("health ping answered");
    assert!(String::from_utf8_lossy(&reply.payload).contains("ok"));

    // And the services, each as its own user, still do their own work end to end.
    let worker = stack.worker("w-1");
    let job = worker.ok("claimNextJob", json!({"workerId": "w-1"})).await;
    let lease = json!({"workerId": "w-1", "messageId": job["messageId"], "leaseId": job["leaseId"]});
    assert_eq!(worker.ok("completeJob", lease).await, json!(true));
    stack.stop().await;
}

#[test]
fn nats_access_compose_server_config_is_generated_from_the_grants() {
    let path = tests::project_root().join("ops/nats/nats.conf");
    let generated = nats_access::compose_server_config();
    if std::env::var_os("AF_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &generated).expect("write ops/nats/nats.conf");
        return;
    }
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        current == generated,
        "ops/nats/nats.conf is stale: regenerate it with AF_UPDATE_DOCS=1 cargo nextest run -p tests -E 'test(nats_access)'"
    );
}

/// Starts nats-server with `config` and `env`, without the harness's own users.
async fn server_with(config: String, env: Vec<(String, String)>, dir: &std::path::Path) -> NatsServer {
    let binary = common::nats_server::find_binary(
        std::env::var_os("AF_NATS_SERVER_BIN").map(std::path::PathBuf::from).as_deref(),
        &tests::project_root(),
    )
    .expect("nats-server");
    let options = NatsServerOptions {
        binary,
        store_dir: dir.join("js"),
        run_dir: dir.join("run"),
        extra_config: Some(config),
        credentials: None,
        monitoring: false,
        env,
    };
    NatsServer::start(&options).await.expect("nats-server starts with the configuration")
}

/// Whether any file under `dir` contains `needle`.
fn stored_in_clear(dir: &std::path::Path, needle: &[u8]) -> bool {
    tests::files_under(dir)
        .iter()
        .any(|path| std::fs::read(path).is_ok_and(|bytes| bytes.windows(needle.len()).any(|w| w == needle)))
}

/// Publishes `text` into the inbox stream as the privileged user (provisioning first), and
/// makes sure it reached the disk.
async fn store_message(url: &str, text: &str) {
    let settings = std::sync::Arc::new(tests::test_settings(std::path::Path::new("/nonexistent"), &[]));
    let ctx = common::service::ServiceContext::connect(settings, url, "test-provisioner").await.expect("provision");
    ctx.js.publish("af.inbox.t", text.to_string().into()).await.expect("publish").await.expect("stored");
    ctx.nats.flush().await.expect("flush");
}

#[tokio::test]
async fn nats_access_the_compose_server_config_encrypts_at_rest_and_restricts_each_service() {
    common::telemetry::install_crypto_provider();
    let marker = "a message text no one may read from the disk";
    let mut env = vec![
        ("AF_NATS_STORE_KEY".to_string(), common::crypto::random_base36(48)),
        ("AF_NATS_PASSWORD".to_string(), common::crypto::random_base36(40)),
    ];
    for service in nats_access::SERVICES {
        env.push((nats_access::password_variable(service), common::crypto::random_base36(40)));
    }
    let password = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).expect("set");

    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = server_with(nats_access::compose_server_config(), env.clone(), dir.path()).await;
    let with_user = |user: &str, pw: &str| server.public_url().replacen("://", &format!("://{user}:{pw}@"), 1);
    store_message(&with_user(ADMIN_USER, &password("AF_NATS_PASSWORD")), marker).await;
    assert!(dir.path().join("js/jetstream").is_dir(), "the store is where the command line says");
    assert!(!stored_in_clear(&dir.path().join("js"), marker.as_bytes()), "the store is encrypted");

    // The service users exist with their own passwords, and their grants apply.
    let ingress_url = with_user("ingress", &password("AF_NATS_PASSWORD_INGRESS"));
    let ingress = connect_as(&ingress_url, "ingress").await;
    let inbox = async_nats::jetstream::new(ingress).get_stream("AF_INBOX").await.expect("stream info");
    assert!(inbox.direct_get_last_for_subject("af.inbox.t").await.is_err(), "ingress may not read the inbox");
    let queue_url = with_user("queue-manager", &password("AF_NATS_PASSWORD_QUEUE_MANAGER"));
    let queue = connect_as(&queue_url, "queue-manager").await;
    let inbox = async_nats::jetstream::new(queue).get_stream("AF_INBOX").await.expect("stream info");
    let stored = inbox.direct_get_last_for_subject("af.inbox.t").await.expect("the queue manager reads its inbox");
    assert_eq!(stored.payload.as_ref(), marker.as_bytes());
    server.stop(Duration::from_secs(5)).await;

    // The same message on a server without the cipher is on the disk as written: the check
    // above can fail.
    let plain_dir = tempfile::tempdir().expect("temp dir");
    let mut plain = server_with(String::new(), Vec::new(), plain_dir.path()).await;
    store_message(plain.url(), marker).await;
    assert!(stored_in_clear(&plain_dir.path().join("js"), marker.as_bytes()));
    plain.stop(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn nats_access_services_started_alone_wait_for_the_provisioner() {
    let nats = tests::TestNats::start().await;
    let settings = std::sync::Arc::new(tests::test_settings(&nats.dir.path().join("data"), &[]));
    let url = nats.service_url("scheduler");
    let alone =
        tokio::spawn(
            async move { common::service::ServiceContext::connect(settings, &url, "scheduler").await.map(|_| ()) },
        );
    // Only the privileged user may create the topology; the service finds it once it exists.
    nats.provision().await;
    alone.await.expect("join").expect("the service connects once the topology exists");
}
