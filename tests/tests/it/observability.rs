//! Traces and metrics as an operator sees them, with each service in its own process as in
//! `docker-compose.yml`: one message is one trace across ingress, queue-manager, hydration and
//! the reference worker (exported over OTLP/HTTP to a receiver in this test); every service
//! run alone, the reference worker and the one-process stack serve `/metrics` with the series
//! the Grafana dashboard and the Prometheus alert rules query.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message as _;
use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, TestNats, WORKER_TOKEN_KEY, wait_until};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(60);
/// The message text: it must appear in no span and no log line.
const TEXT: &str = "the-quiet-otter-says-2718";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attributes: Vec<(String, String)>,
}

/// An OTLP/HTTP (protobuf) trace receiver: `POST /v1/traces`.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> (Self, String) {
        let receiver = Self::default();
        let state = receiver.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: bytes::Bytes| {
                let state = state.clone();
                async move {
                    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
                        return (axum::http::StatusCode::BAD_REQUEST, Vec::new());
                    };
                    state.record(request);
                    (axum::http::StatusCode::OK, Vec::new())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn record(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().expect("lock");
        for resource_spans in request.resource_spans {
            let resource = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            let service = resource
                .iter()
                .find(|kv| kv.key == "service.name")
                .map(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Span {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex::encode(&span.trace_id),
                        span_id: hex::encode(&span.span_id),
                        parent: hex::encode(&span.parent_span_id),
                        attributes: span
                            .attributes
                            .into_iter()
                            .map(|kv| (kv.key, text(kv.value.as_ref().and_then(|v| v.value.as_ref()))))
                            .collect(),
                    });
                }
            }
        }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().expect("lock").clone()
    }
}

fn text(value: Option<&AnyValue>) -> String {
    match value {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// Service binaries (and workers) run as processes, their output kept to check the logs.
struct Processes {
    children: Vec<(String, Child)>,
    logs: tempfile::TempDir,
}

impl Processes {
    fn new() -> Self {
        Self { children: Vec::new(), logs: tempfile::tempdir().expect("tmp") }
    }

    fn spawn(&mut self, name: &str, binary: &Path, env: &[(String, String)]) {
        let out = std::fs::File::create(self.logs.path().join(format!("{name}.log"))).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new(binary)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} starts: {e}"));
        self.children.push((name.to_string(), child));
    }

    /// SIGTERM to `name`, then waits for it to exit (it flushes its spans on the way out).
    async fn stop(&mut self, name: &str) {
        let (_, child) = self.children.iter_mut().find(|(n, _)| n == name).expect("known process");
        if let Some(pid) = child.id() {
            common::nats_server::signal(pid, libc::SIGTERM);
        }
        tokio::time::timeout(WAIT, child.wait()).await.expect("it stops").expect("exit status");
    }

    async fn stop_all(&mut self) {
        let names: Vec<String> = self.children.iter().map(|(n, _)| n.clone()).collect();
        for name in names {
            self.stop(&name).await;
        }
    }

    /// Everything every process printed.
    fn all_logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.logs.path()).expect("logs").flatten() {
            all.push_str(&std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
        all
    }
}

/// The environment of `service`'s binary run alone, as docker-compose.yml sets it: its own NATS
/// user.
fn service_env(
    nats: &TestNats,
    service: &str,
    data: &Path,
    secrets_key: &str,
    extra: &[(&str, String)],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("AF_NATS__URL".to_string(), nats.service_url(service)),
        ("AF_DATA_DIR".to_string(), data.display().to_string()),
        ("AF_AUTH__ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string()),
        ("AF_AUTH__APP_TOKEN".to_string(), tests::APP_TOKEN.to_string()),
        ("AF_AUTH__WORKER_TOKEN_KEY".to_string(), WORKER_TOKEN_KEY.to_string()),
        ("AF_SECRETS__KEY".to_string(), secrets_key.to_string()),
        ("AF_SCHEDULER__DEFAULT_PROVIDER".to_string(), "none".to_string()),
        ("AF_RATE_LIMITS__ENABLED".to_string(), "false".to_string()),
        // Spans are exported in batches: a short delay keeps the test quick.
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

async fn call(http: &reqwest::Client, api: &str, token: &str, op: &str, args: Value) -> Result<Value, String> {
    let response = http
        .post(format!("{api}/v1/ops/{op}"))
        .bearer_auth(token)
        .json(&args)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() { Ok(body) } else { Err(format!("{op}: {status} {body}")) }
}

async fn scrape(url: &str) -> Option<String> {
    let response = reqwest::get(url).await.ok()?;
    (response.status() == 200).then_some(())?;
    response.text().await.ok()
}

/// The metric names in a Prometheus text exposition (histograms as `_bucket`, `_sum`, `_count`).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// Builds the binaries a test runs; call before starting anything (the build blocks).
fn binaries(names: &[(&str, &str)]) -> HashMap<String, PathBuf> {
    names.iter().map(|(package, bin)| (bin.to_string(), tests::workspace_binary(package, bin))).collect()
}

/// The reference worker's environment, as the scheduler spawns it (`AF_API_URL`: ingress only).
fn worker_env(api: &str, worker: &str, token: &str, data: &Path, extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = vec![
        ("WORKER_ID".to_string(), worker.to_string()),
        ("AF_WORKER_TOKEN".to_string(), token.to_string()),
        ("AF_API_URL".to_string(), api.to_string()),
        ("OPENCLAW_DATA_DIR".to_string(), data.display().to_string()),
        ("WORKER_IDLE_TIMEOUT_MS".to_string(), "600000".to_string()),
        ("AF_CLAIM_WAIT_MS".to_string(), "1000".to_string()),
        ("OTEL_BSP_SCHEDULE_DELAY".to_string(), "100".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    env
}

/// enqueue → dispatch → claim → hydration → echo → history → complete: one trace, parented
/// end to end, with spans from ingress, queue-manager, hydration and the reference worker,
/// each exported by its own process; no span attribute and no log line holds the message text
/// or a token.
#[tokio::test]
async fn one_message_is_one_trace_across_the_services_and_the_reference_worker() {
    common::telemetry::install_crypto_provider();
    let bins = binaries(&[
        ("ingress", "ingress"),
        ("queue-manager", "queue-manager"),
        ("hydration", "hydration"),
        ("worker", "af-worker"),
    ]);
    let (receiver, otlp) = Receiver::start().await;
    let nats = TestNats::start().await;
    let data = tempfile::tempdir().expect("tmp");
    let secrets_key = common::crypto::generate_key_base64().expect("key");
    let port = free_port();
    let api = format!("http://127.0.0.1:{port}");
    nats.provision().await;
    let mut procs = Processes::new();
    for service in ["queue-manager", "hydration", "ingress"] {
        let extra = [("AF_TELEMETRY__OTLP_ENDPOINT", otlp.clone()), ("AF_HTTP__BIND", format!("127.0.0.1:{port}"))];
        let env = service_env(&nats, service, &data.path().join(service), &secrets_key, &extra);
        procs.spawn(service, &bins[service], &env);
    }
    let http = reqwest::Client::new();
    let profile = json!({"agentKey": "otter", "version": "1.0.0", "secretsRef": [], "enabled": true});
    // Each service answers once it has started (the queue once it has a leader).
    wait_until("the services answer through ingress", WAIT, || async {
        call(&http, &api, ADMIN_TOKEN, "getQueueStats", json!({})).await.ok()?;
        call(&http, &api, ADMIN_TOKEN, "upsertAgentProfile", profile.clone()).await.ok()
    })
    .await;
    let worker_token =
        call(&http, &api, ADMIN_TOKEN, "issueWorkerToken", json!({"workerId": "w-otter"})).await.expect("worker token");
    let worker_token = worker_token.as_str().or(worker_token["token"].as_str()).expect("a token").to_string();

    let enqueued = call(
        &http,
        &api,
        ADMIN_TOKEN,
        "enqueueMessage",
        json!({"conversationId": "api:otter-1", "agentKey": "otter",
               "payload": {"provider": "api", "providerUserId": "u1", "messageText": TEXT}}),
    )
    .await
    .expect("enqueued");
    let message_id = enqueued.as_str().expect("message id").to_string();

    let worker_data = tempfile::tempdir().expect("tmp");
    let env = worker_env(
        &api,
        "w-otter",
        &worker_token,
        worker_data.path(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone())],
    );
    procs.spawn("af-worker", &bins["af-worker"], &env);
    wait_until("the worker completed the message", WAIT, || async {
        let stats = call(&http, &api, ADMIN_TOKEN, "getQueueStats", json!({})).await.ok()?;
        let history =
            call(&http, &api, ADMIN_TOKEN, "getConversationHistory", json!({"conversationId": "api:otter-1"})).await;
        (stats["queuedTotal"] == 0 && stats["processing"] == 0 && history.is_ok()).then_some(())
    })
    .await;
    // The worker drains on SIGTERM and flushes its spans; so do the services.
    procs.stop("af-worker").await;

    // The trace of the message: the one its dispatch belongs to.
    let trace = wait_until("the message's trace is complete", WAIT, || async {
        let spans = receiver.spans();
        let dispatch = spans.iter().find(|s| {
            s.name == "queue.dispatch" && s.attributes.iter().any(|(k, v)| k == "af.message_id" && *v == message_id)
        })?;
        let trace: Vec<Span> = spans.iter().filter(|s| s.trace_id == dispatch.trace_id).cloned().collect();
        let names: BTreeSet<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        let wanted = [
            "enqueueMessage",
            "queue.dispatch",
            "worker.job",
            "worker.hydrate",
            "getHydrationBundleForClaimedJob",
            "worker.complete",
            "completeJob",
        ];
        // Spans arrive in batches per process: wait until every parent has arrived too.
        let ids: BTreeSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
        let parents_arrived = trace
            .iter()
            .all(|s| s.parent.is_empty() || s.parent == "0000000000000000" || ids.contains(s.parent.as_str()));
        (wanted.iter().all(|w| names.contains(w)) && parents_arrived).then_some(trace)
    })
    .await;
    let by_id: HashMap<&str, &Span> = trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let services: BTreeSet<&str> = trace.iter().map(|s| s.service.as_str()).collect();
    for service in ["ingress", "queue-manager", "hydration", "af-worker"] {
        assert!(services.contains(service), "no span from {service} in the trace: {services:?}");
    }
    // One root (the enqueue request at ingress); every other span's parent is in the trace.
    let roots: Vec<&Span> = trace.iter().filter(|s| s.parent.is_empty() || s.parent == "0000000000000000").collect();
    assert_eq!(roots.len(), 1, "one root span: {roots:#?}");
    assert_eq!((roots[0].service.as_str(), roots[0].name.as_str()), ("ingress", "POST /v1/ops/{name}"));
    for span in &trace {
        if !std::ptr::eq(span, roots[0]) {
            assert!(
                by_id.contains_key(span.parent.as_str()),
                "{} ({}) has a parent outside the trace",
                span.name,
                span.service
            );
        }
    }
    let parent_of = |name: &str| {
        let span = trace.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("span {name}"));
        let parent = by_id[span.parent.as_str()];
        (parent.service.as_str(), parent.name.as_str())
    };
    assert_eq!(parent_of("enqueueMessage"), ("ingress", "POST /v1/ops/{name}"));
    assert_eq!(parent_of("queue.dispatch"), ("queue-manager", "enqueueMessage"));
    assert_eq!(parent_of("worker.job"), ("queue-manager", "queue.dispatch"));
    assert_eq!(parent_of("worker.hydrate"), ("af-worker", "worker.job"));
    assert_eq!(parent_of("getHydrationBundleForClaimedJob"), ("ingress", "POST /v1/ops/{name}"));
    let hydration_http =
        by_id[trace.iter().find(|s| s.name == "getHydrationBundleForClaimedJob").expect("op").parent.as_str()];
    assert_eq!(by_id[hydration_http.parent.as_str()].name, "worker.hydrate");
    assert_eq!(parent_of("worker.complete"), ("af-worker", "worker.job"));

    // Stop the services too (their remaining spans are flushed), then look at everything.
    procs.stop_all().await;
    let secrets = [TEXT, ADMIN_TOKEN, tests::APP_TOKEN, WORKER_TOKEN_KEY, worker_token.as_str(), secrets_key.as_str()];
    for span in receiver.spans() {
        for (key, value) in
            std::iter::once((&"name".to_string(), &span.name)).chain(span.attributes.iter().map(|(k, v)| (k, v)))
        {
            for secret in secrets {
                assert!(
                    !value.contains(secret),
                    "span {} ({}) attribute {key} holds a secret or the text",
                    span.name,
                    span.service
                );
            }
        }
    }
    let logs = procs.all_logs();
    assert!(logs.contains("service started"), "the logs were captured");
    for secret in secrets {
        assert!(!logs.contains(secret), "a log line holds a secret or the message text");
    }
}

/// Metric names a PromQL expression reads: identifiers starting `af_`, plus any other selector
/// (a name followed by `{` or `[`) so a query of a name nobody exports cannot slip through.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] =
        &["by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "or", "and", "unless"];
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    let mut in_braces = false;
    let mut quote = None;
    while i < chars.len() {
        let c = chars[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        match c {
            '"' | '\'' | '`' => quote = Some(c),
            '{' => in_braces = true,
            '}' => in_braces = false,
            c if (c.is_ascii_alphabetic() || c == '_') && !in_braces => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let next = chars[i..].iter().find(|c| !c.is_whitespace()).copied();
                if word.starts_with("af_") || (!KEYWORDS.contains(&word.as_str()) && matches!(next, Some('{' | '['))) {
                    names.insert(word);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// Every `expr` of the dashboards in ops/grafana/dashboards and of the rules in
/// ops/prometheus/alerts.yml.
fn queried_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let root = tests::project_root();
    let mut queried: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let dashboards = root.join("ops/grafana/dashboards");
    let mut panels = 0;
    for entry in std::fs::read_dir(&dashboards).expect("dashboards").flatten() {
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).expect("read")).expect("dashboard JSON");
        fn exprs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(map) => {
                    for (k, v) in map {
                        match (k.as_str(), v) {
                            ("expr", Value::String(e)) => out.push(e.clone()),
                            _ => exprs(v, out),
                        }
                    }
                }
                Value::Array(items) => items.iter().for_each(|i| exprs(i, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        exprs(&dashboard, &mut found);
        panels += dashboard["panels"].as_array().map(Vec::len).unwrap_or(0);
        for expr in found {
            for name in promql_metrics(&expr) {
                queried.entry(name).or_default().insert(format!("{}: {expr}", entry.file_name().to_string_lossy()));
            }
        }
    }
    assert!(panels > 10, "the dashboard has its panels");
    let rules = read_yaml(&root.join("ops/prometheus/alerts.yml"));
    let mut alerts = 0;
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            alerts += 1;
            let expr = rule["expr"].as_str().expect("expr");
            for name in promql_metrics(expr) {
                queried.entry(name).or_default().insert(format!("alerts.yml {}: {expr}", rule["alert"]));
            }
        }
    }
    assert!(alerts >= 4, "alert rules for stuck conversations, dead letters, orphans and provider errors");
    queried
}

/// A YAML file (the alert rules, the compose file) as JSON.
pub(crate) fn read_yaml(path: &Path) -> Value {
    fn convert(yaml: &yaml_rust2::Yaml) -> Value {
        use yaml_rust2::Yaml;
        match yaml {
            Yaml::Real(r) => r.parse::<f64>().map(|f| json!(f)).unwrap_or(Value::String(r.clone())),
            Yaml::Integer(i) => json!(i),
            Yaml::String(s) => Value::String(s.clone()),
            Yaml::Boolean(b) => Value::Bool(*b),
            Yaml::Array(items) => Value::Array(items.iter().map(convert).collect()),
            Yaml::Hash(map) => {
                // `<<: *anchor` merge keys (the compose file's shared service settings): the
                // merged mapping's keys, under the mapping's own.
                let mut object = serde_json::Map::new();
                for (k, v) in map {
                    if matches!(k, Yaml::String(s) if s == "<<")
                        && let Value::Object(merged) = convert(v)
                    {
                        for (key, value) in merged {
                            object.entry(key).or_insert(value);
                        }
                    }
                }
                for (k, v) in map {
                    let key = match k {
                        Yaml::String(s) => s.clone(),
                        other => convert(other).to_string(),
                    };
                    if key != "<<" {
                        object.insert(key, convert(v));
                    }
                }
                Value::Object(object)
            }
            Yaml::Alias(_) | Yaml::Null | Yaml::BadValue => Value::Null,
        }
    }
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    docs.first().map(convert).unwrap_or(Value::Null)
}

/// Every service binary run alone (one container per service) serves `/metrics` on
/// `telemetry.metrics_bind`, and so does the reference worker (`AF_WORKER_METRICS_BIND`); the
/// one-process stack (`agent-factory`) renders every service's series at ingress's `/metrics`.
/// Every metric the dashboards and the alert rules query is among the exported names.
#[tokio::test]
async fn every_service_serves_the_metrics_the_dashboard_and_the_alerts_query() {
    common::telemetry::install_crypto_provider();
    let services = ["ingress", "queue-manager", "hydration", "scheduler", "push-dispatcher", "cleanup"];
    let mut wanted: Vec<(&str, &str)> = services.iter().map(|s| (*s, *s)).collect();
    wanted.extend([("worker", "af-worker"), ("launcher", "agent-factory")]);
    let bins = binaries(&wanted);
    let queried = queried_metrics();

    // One container per service.
    let nats = TestNats::start().await;
    let data = tempfile::tempdir().expect("tmp");
    let secrets_key = common::crypto::generate_key_base64().expect("key");
    let api_port = free_port();
    let api = format!("http://127.0.0.1:{api_port}");
    nats.provision().await;
    let mut procs = Processes::new();
    let mut metrics_urls = BTreeMap::new();
    for service in services {
        let port = free_port();
        let extra = [
            ("AF_TELEMETRY__METRICS_BIND", format!("127.0.0.1:{port}")),
            ("AF_HTTP__BIND", format!("127.0.0.1:{api_port}")),
        ];
        procs.spawn(
            service,
            &bins[service],
            &service_env(&nats, service, &data.path().join(service), &secrets_key, &extra),
        );
        metrics_urls.insert(service.to_string(), format!("http://127.0.0.1:{port}/metrics"));
    }
    let http = reqwest::Client::new();
    wait_until("every service is ready", WAIT, || async {
        let response = http.get(format!("{api}/readyz")).send().await.ok()?;
        (response.status() == 200).then_some(())
    })
    .await;
    let token = wait_until("the queue has a leader", WAIT, || async {
        call(&http, &api, ADMIN_TOKEN, "issueWorkerToken", json!({"workerId": "w-metrics"})).await.ok()
    })
    .await;
    let token = token.as_str().or(token["token"].as_str()).expect("a token").to_string();
    let worker_data = tempfile::tempdir().expect("tmp");
    let worker_port = free_port();
    procs.spawn(
        "af-worker",
        &bins["af-worker"],
        &worker_env(
            &api,
            "w-metrics",
            &token,
            worker_data.path(),
            &[("AF_WORKER_METRICS_BIND", format!("127.0.0.1:{worker_port}"))],
        ),
    );
    metrics_urls.insert("af-worker".to_string(), format!("http://127.0.0.1:{worker_port}/metrics"));

    // What each process must export on its own.
    let owns: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("ingress", &["af_http_requests_total", "af_telegram_updates_total", "af_snapshot_bytes_bucket"][..]),
        (
            "queue-manager",
            &[
                "af_queue_depth",
                "af_queue_oldest_ready_age_seconds",
                "af_queue_dead_letter",
                "af_dispatch_latency_seconds_bucket",
                "af_claims_total",
                "af_completions_total",
                "af_failures_total",
                "af_dead_letters_total",
                "af_workers",
                "af_op_duration_seconds_bucket",
            ][..],
        ),
        ("hydration", &["af_telegram_updates_processed_total", "af_op_duration_seconds_bucket"][..]),
        ("scheduler", &["af_worker_spawns_total", "af_worker_teardowns_total", "af_provider_api_errors_total"][..]),
        ("push-dispatcher", &["af_op_duration_seconds_bucket"][..]),
        ("cleanup", &["af_orphan_resources", "af_provider_api_errors_total"][..]),
        ("af-worker", &["af_worker_jobs_total", "af_worker_job_duration_seconds_bucket"][..]),
    ]);
    let mut exported = BTreeSet::new();
    for (process, url) in &metrics_urls {
        let names = wait_until(&format!("{process} serves /metrics"), WAIT, || async {
            let names = exported_names(&scrape(url).await?);
            owns[process.as_str()].iter().all(|n| names.contains(*n)).then_some(names)
        })
        .await;
        exported.extend(names);
    }
    procs.stop_all().await;

    // The one-process stack: ingress's /metrics holds every service's series.
    let port = free_port();
    let one = tempfile::tempdir().expect("tmp");
    let mut launcher = Command::new(&bins["agent-factory"])
        .current_dir(tests::project_root())
        .env("AF_DATA_DIR", one.path())
        .env("AF_HTTP__BIND", format!("127.0.0.1:{port}"))
        .env("AF_SCHEDULER__DEFAULT_PROVIDER", "none")
        .env("AF_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("agent-factory starts");
    let url = format!("http://127.0.0.1:{port}/metrics");
    let stack_names = wait_until("the one-process stack serves every service's series", WAIT, || async {
        let names = exported_names(&scrape(&url).await?);
        owns.iter()
            .filter(|(p, _)| **p != "af-worker")
            .all(|(_, series)| series.iter().all(|n| names.contains(*n)))
            .then_some(names)
    })
    .await;
    if let Some(pid) = launcher.id() {
        common::nats_server::signal(pid, libc::SIGTERM);
    }
    let _ = tokio::time::timeout(WAIT, launcher.wait()).await;

    // The dashboards and alerts query only exported names; the one-process stack has all but
    // the worker's.
    // `up` is Prometheus's own series for each scrape target.
    let queried: BTreeMap<_, _> = queried.into_iter().filter(|(name, _)| name != "up").collect();
    let missing: Vec<_> = queried.iter().filter(|(name, _)| !exported.contains(*name)).collect();
    assert!(missing.is_empty(), "queried but exported by no process: {missing:#?}");
    let missing: Vec<_> = queried
        .iter()
        .filter(|(name, _)| {
            !name.starts_with("af_worker_jobs")
                && !name.starts_with("af_worker_job_")
                && !name.starts_with("af_worker_snapshot")
        })
        .filter(|(name, _)| !stack_names.contains(*name))
        .collect();
    assert!(missing.is_empty(), "queried but absent from the one-process stack: {missing:#?}");
}

#[test]
fn promql_metric_names_are_extracted() {
    let names = promql_metrics(
        r#"histogram_quantile(0.99, sum by (le, op) (rate(af_op_duration_seconds_bucket{status!="200"}[5m]))) > on(op) group_left up{job="x"}"#,
    );
    assert_eq!(names, BTreeSet::from(["af_op_duration_seconds_bucket".to_string(), "up".to_string()]));
    assert_eq!(
        promql_metrics("max(af_queue_oldest_ready_age_seconds) > 300"),
        BTreeSet::from(["af_queue_oldest_ready_age_seconds".to_string()])
    );
    assert_eq!(promql_metrics("sum(rate(nope_total[5m]))"), BTreeSet::from(["nope_total".to_string()]));
}
