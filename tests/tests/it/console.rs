//! The web console: sessions and their refusals over plain HTTP, `explainConversation`, and a
//! browser test in headless Chromium driven over WebDriver (`fantoccini` + Debian's
//! `chromedriver`, installed by ops/scripts/install-chromium.sh).
//!
//! With `AF_UPDATE_SCREENSHOTS=1` the browser test also writes docs/console/*.png.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use secrecy::SecretString;
use serde_json::{Value, json};
use tests::{ADMIN_TOKEN, TestStack, message, wait_until};

const WAIT: Duration = Duration::from_secs(20);

// ---- sessions over plain HTTP ----------------------------------------------------------

struct Login {
    cookie: String,
    csrf: String,
}

async fn login(stack: &TestStack, token: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(stack.http_url("/console/login"))
        .header("content-type", "application/json")
        .body(json!({ "token": token }).to_string())
        .send()
        .await
        .expect("login request")
}

async fn logged_in(stack: &TestStack) -> Login {
    let response = login(stack, ADMIN_TOKEN).await;
    assert_eq!(response.status(), 200);
    let set_cookie = response.headers()["set-cookie"].to_str().expect("ascii").to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=28800"] {
        assert!(set_cookie.contains(attribute), "{attribute} missing from {set_cookie}");
    }
    let cookie = set_cookie.split(';').next().expect("cookie pair").to_string();
    let body: Value = response.json().await.expect("json");
    Login { cookie, csrf: body["csrf"].as_str().expect("csrf").to_string() }
}

async fn logout(stack: &TestStack, cookie: &str, csrf: Option<&str>) -> u16 {
    let mut request = reqwest::Client::new().post(stack.http_url("/console/logout")).header("cookie", cookie);
    if let Some(csrf) = csrf {
        request = request.header("x-af-csrf", csrf);
    }
    request.send().await.expect("logout").status().as_u16()
}

/// POSTs `getQueueStats` with the given extra headers; answers status and body.
async fn call(stack: &TestStack, headers: &[(&str, &str)]) -> (u16, Value) {
    call_at(&stack.http_url(""), headers).await
}

/// [`call`] to the ingress at `base` (`http://host:port`).
async fn call_at(base: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/v1/ops/getQueueStats"))
        .header("content-type", "application/json")
        .body("{}");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn console_sessions_need_the_cookie_the_csrf_token_and_the_same_site() {
    let stack = TestStack::start().await;

    // The entry points: / redirects to the page, which is served with a strict policy.
    let no_redirects = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let root = no_redirects.get(stack.http_url("/")).send().await.expect("GET /");
    assert_eq!(root.status().as_u16(), 303);
    assert_eq!(root.headers()["location"], "/console");
    let page = reqwest::get(stack.http_url("/console")).await.expect("GET /console");
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-security-policy"].to_str().expect("csp").contains("frame-ancestors 'none'"));
    assert!(page.text().await.expect("html").contains("/console/console.js"));

    // Only the admin token logs in.
    assert_eq!(login(&stack, "wrong-token-wrong-token").await.status(), 401);
    assert_eq!(login(&stack, tests::APP_TOKEN).await.status(), 403);
    let s = logged_in(&stack).await;
    let cookie = s.cookie.as_str();
    let csrf = s.csrf.as_str();

    // Cookie, CSRF token and a same-origin request: the operation runs.
    let (status, body) =
        call(&stack, &[("cookie", cookie), ("x-af-csrf", csrf), ("sec-fetch-site", "same-origin")]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["queuedReady"].is_u64(), "{body}");
    // Without the cookie: unauthenticated, whatever else the request carries.
    let (status, body) = call(&stack, &[("x-af-csrf", csrf)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthenticated")), "{body}");
    // A wrong or missing CSRF token: forbidden.
    let (status, _) = call(&stack, &[("cookie", cookie)]).await;
    assert_eq!(status, 403);
    let (status, _) = call(&stack, &[("cookie", cookie), ("x-af-csrf", "x".repeat(43).as_str())]).await;
    assert_eq!(status, 403);
    // From another site, even with the token: forbidden (Sec-Fetch-Site, or Origin against Host).
    let (status, body) =
        call(&stack, &[("cookie", cookie), ("x-af-csrf", csrf), ("sec-fetch-site", "cross-site")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("cross-site"), "{body}");
    let (status, _) = call(&stack, &[("cookie", cookie), ("x-af-csrf", csrf), ("origin", "http://evil.example")]).await;
    assert_eq!(status, 403);
    // An unknown session: unauthenticated.
    let forged = format!("af_console={}", "a".repeat(43));
    let (status, _) = call(&stack, &[("cookie", forged.as_str()), ("x-af-csrf", csrf)]).await;
    assert_eq!(status, 401);

    // The session is in NATS: another ingress replica accepts it.
    let replica = stack.replica(|_| {}).await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/ops/getQueueStats", replica.http_addr))
        .header("cookie", cookie)
        .header("x-af-csrf", csrf)
        .body("{}")
        .send()
        .await
        .expect("replica request");
    assert_eq!(response.status(), 200);

    // Console calls are audited as admin calls, like any other.
    let (status, _) = reqwest::Client::new()
        .post(stack.http_url("/v1/ops/upsertAgentProfile"))
        .header("cookie", cookie)
        .header("x-af-csrf", csrf)
        .body(json!({"agentKey": "audited", "version": "1.0.0", "secretsRef": [], "enabled": true}).to_string())
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .expect("upsert");
    assert_eq!(status, 200);
    wait_until("the console call is in the audit log", WAIT, || async {
        let page = stack.admin().call("listAuditLog", json!({"operation": "upsertAgentProfile"})).await.ok()?;
        let records = page["records"].as_array()?;
        records.iter().any(|r| r["args"]["agentKey"] == "audited" && r["role"] == "admin").then_some(())
    })
    .await;

    // The event stream needs the session; an enqueue shows up on it as a queue event naming
    // the conversation, without the message.
    let events = stack.http_url("/console/events");
    assert_eq!(reqwest::get(&events).await.expect("events").status(), 401);
    let mut stream = reqwest::Client::new().get(&events).header("cookie", cookie).send().await.expect("events");
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"].to_str().expect("type").starts_with("text/event-stream"));
    let mut seen = String::new();
    let mut enqueued = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !seen.contains(r#"data: {"key":"telegram:7","topic":"queue"}"#) {
        if !enqueued {
            // The stream answers once the feed watches: a change from now on is on it.
            stack.admin().ok("enqueueMessage", message("telegram:7", "audited", "secret words")).await;
            enqueued = true;
        }
        let chunk = tokio::time::timeout_at(deadline, stream.chunk()).await;
        let chunk = chunk.unwrap_or_else(|_| panic!("no queue event for telegram:7; the stream said: {seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("stream").expect("open")));
    }
    assert!(!seen.contains("secret words"), "{seen}");
    drop(stream);

    // Logout needs the CSRF token, then the session is gone on every replica.
    assert_eq!(logout(&stack, cookie, None).await, 403);
    assert_eq!(logout(&stack, cookie, Some(csrf)).await, 204);
    let (status, _) = call(&stack, &[("cookie", cookie), ("x-af-csrf", csrf)]).await;
    assert_eq!(status, 401);
    let session = reqwest::Client::new()
        .get(format!("http://{}/console/session", replica.http_addr))
        .header("cookie", cookie)
        .send()
        .await
        .expect("session");
    assert_eq!(session.status(), 401);
    replica.stop().await;
    stack.stop().await;
}

#[tokio::test]
async fn console_sessions_expire() {
    let stack = TestStack::start_with(&[tests::MANUAL, &[("http.console_session_ttl_ms", "600000")]].concat()).await;
    let response = login(&stack, ADMIN_TOKEN).await;
    assert!(response.headers()["set-cookie"].to_str().expect("ascii").contains("Max-Age=600"));
    let cookie = response.headers()["set-cookie"].to_str().expect("ascii").split(';').next().expect("pair").to_string();
    let body: Value = response.json().await.expect("json");
    let csrf = body["csrf"].as_str().expect("csrf");
    let headers = [("cookie", cookie.as_str()), ("x-af-csrf", csrf)];
    assert_eq!(call(&stack, &headers).await.0, 200);
    stack.admin().ok("advanceTestClock", json!({ "ms": 599_000 })).await;
    assert_eq!(call(&stack, &headers).await.0, 200);
    stack.admin().ok("advanceTestClock", json!({ "ms": 1_000 })).await;
    let (status, body) = call(&stack, &headers).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("expired"), "{body}");
    stack.stop().await;
}

/// A session lives as long as the admin token that opened it is accepted: through a rollover
/// (the token now among the previous ones) and not after it (the token removed).
#[tokio::test]
async fn console_sessions_end_when_a_rotation_stops_accepting_their_admin_token() {
    let mut stack = TestStack::start_with(tests::MANUAL).await;
    let Login { cookie, csrf } = logged_in(&stack).await;
    let headers = [("cookie", cookie.as_str()), ("x-af-csrf", csrf.as_str())];
    let new_token = SecretString::from("rotated-admin-token-rotated-admin-token".to_string());
    let rollover = stack
        .replica(|s| {
            s.auth.previous_admin_tokens = vec![s.auth.admin_token.take().expect("admin token")];
            s.auth.admin_token = Some(new_token.clone());
        })
        .await;
    stack.stop_services().await;
    // The replica's queue manager has taken the queue over once this answers.
    rollover.client(ADMIN_TOKEN).ok("getQueueStats", json!({})).await;
    let (status, body) = call_at(&format!("http://{}", rollover.http_addr), &headers).await;
    assert_eq!(status, 200, "the old token is still accepted: {body}");
    let rotated = stack
        .replica(|s| {
            s.auth.admin_token = Some(new_token.clone());
            s.auth.previous_admin_tokens.clear();
        })
        .await;
    rollover.stop().await;
    let (status, body) = call_at(&format!("http://{}", rotated.http_addr), &headers).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"]["message"].as_str().unwrap_or_default().contains("no longer accepted"), "{body}");
    rotated.stop().await;
}

// ---- explainConversation ---------------------------------------------------------------

/// Tracing as `telemetry::init` sets it up with OTLP export on, for this test's thread (the
/// current-thread runtime runs the stack here too): ingress then starts a trace per request,
/// and the enqueue writes its context into the inbox message.
fn tracing_on() -> tracing::subscriber::DefaultGuard {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let subscriber =
        tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    tracing::subscriber::set_default(subscriber)
}

#[tokio::test]
async fn explain_conversation_names_the_trace_the_message_was_enqueued_in() {
    let _tracing = tracing_on();
    let stack = TestStack::start().await;
    tests::seed_profile(&stack.ctx, "support").await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = reqwest::Client::new()
        .post(stack.http_url("/v1/ops/enqueueMessage"))
        .bearer_auth(ADMIN_TOKEN)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .body(message("telegram:5", "support", "hi").to_string())
        .send()
        .await
        .expect("enqueue");
    assert_eq!(response.status(), 200);
    let x = stack.admin().ok("explainConversation", json!({"conversationId": "telegram:5"})).await;
    assert_eq!(x["traceId"], trace_id, "{x}");
    stack.stop().await;
}

#[tokio::test]
async fn explain_conversation_says_why_a_message_waits() {
    let stack = TestStack::start_with(&[("queue.retry.base_delay_ms", "60000")]).await;
    let admin = stack.admin();
    tests::seed_profile(&stack.ctx, "support").await;
    let explain = |conversation: &'static str| {
        let admin = stack.admin();
        async move { admin.ok("explainConversation", json!({ "conversationId": conversation })).await }
    };

    let x = explain("telegram:1").await;
    assert_eq!(x["verdict"], "idle", "{x}");

    let id = admin.ok("enqueueMessage", message("telegram:1", "support", "secret words")).await;
    let x = explain("telegram:1").await;
    assert_eq!(x["verdict"], "waiting_for_worker", "{x}");
    assert_eq!(x["message"]["_id"], id, "{x}");
    assert_eq!(x["unanswered"], 1, "{x}");
    assert!(x["reason"].as_str().expect("reason").contains("no worker serves this conversation"), "{x}");
    assert!(x["worker"].is_null() && x["lease"].is_null(), "{x}");
    assert!(!x.to_string().contains("secret words"), "payloads stay out of the explanation: {x}");

    // A worker claims it: the lease holder is named.
    let worker = stack.worker("w-1");
    let claim = worker.ok("claimNextJob", json!({"workerId": "w-1"})).await;
    let x = explain("telegram:1").await;
    assert_eq!(x["verdict"], "processing", "{x}");
    assert_eq!(x["lease"]["workerId"], "w-1", "{x}");
    assert_eq!(x["message"]["status"], "processing", "{x}");

    // It fails: the attempt, its error and the retry are shown.
    let failed =
        json!({"workerId": "w-1", "messageId": id, "leaseId": claim["leaseId"], "errorMessage": "model timed out"});
    worker.ok("failJob", failed).await;
    let x = explain("telegram:1").await;
    assert_eq!(x["verdict"], "retry_backoff", "{x}");
    assert_eq!(x["message"]["attempts"], 1, "{x}");
    assert_eq!(x["message"]["lastError"], "model timed out", "{x}");

    // Dead-lettered after its only attempt.
    let mut one_shot = message("telegram:2", "support", "x");
    one_shot["maxAttempts"] = json!(1);
    let id2 = admin.ok("enqueueMessage", one_shot).await;
    let worker = stack.worker("w-2");
    let claim = worker.ok("claimNextJob", json!({"workerId": "w-2", "conversationId": "telegram:2"})).await;
    assert_eq!(claim["messageId"], id2);
    let failed = json!({"workerId": "w-2", "messageId": id2, "leaseId": claim["leaseId"], "errorMessage": "boom"});
    worker.ok("failJob", failed).await;
    let x = explain("telegram:2").await;
    assert_eq!(x["verdict"], "dead_lettered", "{x}");
    assert_eq!(x["message"]["_id"], id2, "{x}");

    // Only admins may ask; bad input is a 400.
    assert_eq!(
        stack.app().err("explainConversation", json!({"conversationId": "telegram:1"})).await.http_status(),
        403
    );
    assert_eq!(admin.err("explainConversation", json!({})).await.http_status(), 400);
    stack.stop().await;
}

// ---- the browser -----------------------------------------------------------------------

fn binary(var: &str, default: &str) -> PathBuf {
    let path = std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} not found (set {var}); install Chromium and its driver with ops/scripts/install-chromium.sh \
         (ops/scripts/test.sh does)",
        path.display()
    );
    path
}

/// A chromedriver process on a free port, killed on drop.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let bin = binary("AF_CHROMEDRIVER_BIN", "/usr/bin/chromedriver");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let child = tokio::process::Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        wait_until("chromedriver answers", WAIT, || async {
            let body: Value = reqwest::get(&status).await.ok()?.json().await.ok()?;
            body["value"]["ready"].as_bool().filter(|r| *r)
        })
        .await;
        Self { child, url }
    }

    async fn browser(&self, profile: &std::path::Path) -> Client {
        let chromium = binary("AF_CHROMIUM_BIN", "/usr/bin/chromium");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,1000",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let mut caps = serde_json::Map::new();
        caps.insert("goog:chromeOptions".into(), json!({ "binary": chromium, "args": args }));
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector).capabilities(caps).connect(&self.url).await.expect("WebDriver session")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn wait_for(browser: &Client, css: &str) -> fantoccini::elements::Element {
    match browser.wait().at_most(WAIT).for_element(Locator::Css(css)).await {
        Ok(element) => element,
        Err(e) => {
            let flash = match browser.find(Locator::Css("#flash")).await {
                Ok(flash) => flash.prop("textContent").await.ok().flatten().unwrap_or_default(),
                Err(_) => String::new(),
            };
            let page = browser.source().await.unwrap_or_default();
            panic!("waiting for `{css}`: {e}\nflash: {flash}\npage: {}", &page[..page.len().min(2000)]);
        }
    }
}

async fn fill(browser: &Client, form: &str, fields: &[(&str, &str)]) {
    for (name, value) in fields {
        let input = browser.find(Locator::Css(&format!("{form} [name={name}]"))).await.expect("field");
        input.clear().await.expect("clear");
        input.send_keys(value).await.expect("type");
    }
    browser
        .find(Locator::Css(&format!("{form} button[type=submit]")))
        .await
        .expect("submit")
        .click()
        .await
        .expect("click");
}

/// Saves a screenshot to docs/console/<name>.png when AF_UPDATE_SCREENSHOTS=1.
async fn screenshot(browser: &Client, name: &str) {
    if std::env::var("AF_UPDATE_SCREENSHOTS").as_deref() != Ok("1") {
        return;
    }
    let png = browser.screenshot().await.expect("screenshot");
    let dir = tests::project_root().join("docs/console");
    std::fs::create_dir_all(&dir).expect("docs/console");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

/// A page of another site with a form that posts to the console's API (a classic CSRF).
async fn evil_site(target: String) -> std::net::SocketAddr {
    let page = format!(
        r#"<!doctype html><html><body>
<form id="evil" method="post" enctype="text/plain" action="{target}/v1/ops/enqueueMessage">
<input name='{{"conversationId":"evil:1","agentKey":"support","payload":{{"provider":"x","providerUserId":"1","messageText":"x' value='"}}}}'>
</form></body></html>"#
    );
    let app = axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(page) }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[tokio::test]
async fn console_in_headless_chromium() {
    let _tracing = tracing_on();
    // No worker pool: the message waits, and the inspector must say why.
    let stack = TestStack::start_with(&[("loops.reconcile", "false")]).await;
    let driver = Driver::start().await;
    let profile = tempfile::tempdir().expect("profile dir");
    let browser = driver.browser(profile.path()).await;
    let base = stack.http_url("");

    // `/` leads to the login page.
    browser.goto(&format!("{base}/")).await.expect("open /");
    wait_for(&browser, "#login-form").await;
    assert!(browser.current_url().await.expect("url").as_str().ends_with("/console"));
    screenshot(&browser, "login").await;
    browser.find(Locator::Css("#login-token")).await.expect("token").send_keys(ADMIN_TOKEN).await.expect("type");
    browser.find(Locator::Css("#login-form button")).await.expect("button").click().await.expect("log in");
    // Logged in, and the event stream is connected.
    wait_for(&browser, "#live.pill:not(.off)").await;
    let cookies = browser.get_all_cookies().await.expect("cookies");
    let session = cookies.iter().find(|c| c.name() == "af_console").expect("session cookie");
    assert_eq!(session.http_only(), Some(true));
    assert_eq!(format!("{:?}", session.same_site()), "Some(Strict)");
    let script_sees_cookie =
        browser.execute("return document.cookie.includes('af_console')", vec![]).await.expect("js");
    assert_eq!(script_sees_cookie, json!(false), "the session cookie must be HttpOnly");

    // Create an agent and import its secret.
    fill(&browser, "#agent-form", &[("agentKey", "support"), ("secretsRef", "telegram.botToken.support")]).await;
    wait_for(&browser, r#"tr[data-agent="support"]"#).await;
    wait_for(&browser, r#"tr[data-secret="telegram.botToken.support"][data-active="false"]"#).await;
    fill(&browser, "#secret-form", &[("secretRef", "telegram.botToken.support"), ("plaintextValue", "123:abc")]).await;
    wait_for(&browser, r#"tr[data-secret="telegram.botToken.support"][data-active="true"]"#).await;

    // Mark the page: if it reloaded, the mark is gone.
    browser.execute("window.afMark = 'same page'", vec![]).await.expect("mark");
    // Enqueue from the page; the page does not reload the queue after it, the event does.
    fill(
        &browser,
        "#enqueue-form",
        &[("conversationId", "telegram:42"), ("agentKey", "support"), ("providerUserId", "42"), ("messageText", "hi")],
    )
    .await;
    let row = wait_for(&browser, r#"#jobs-table tr[data-message]"#).await;
    let message_id = row.attr("data-message").await.expect("attr").expect("message id");
    // A message enqueued elsewhere (the API) appears too, without any action in the page.
    let other = stack.admin().ok("enqueueMessage", message("telegram:43", "support", "from the API")).await;
    let other = other.as_str().expect("message id").to_string();
    wait_for(&browser, &format!(r#"#jobs-table tr[data-message="{other}"]"#)).await;
    let mark = browser.execute("return window.afMark", vec![]).await.expect("mark");
    assert_eq!(mark, json!("same page"), "the queue panel must update without a reload");
    screenshot(&browser, "queue").await;

    // The inspector says why the message waits.
    let inspect = format!(r#"#jobs-table tr[data-message="{message_id}"] button[data-inspect]"#);
    browser.find(Locator::Css(&inspect)).await.expect("inspect button").click().await.expect("inspect");
    let verdict = wait_for(&browser, r#"#verdict[data-verdict="waiting_for_worker"]"#).await;
    let reason = verdict.text().await.expect("reason");
    assert!(reason.contains(&message_id), "{reason}");
    assert!(reason.contains("no worker serves this conversation"), "{reason}");
    assert!(reason.contains("reconcile loop is off"), "{reason}");
    // ...and links the trace the page's enqueue started.
    let link = wait_for(&browser, "#trace-link").await;
    let href = link.attr("href").await.expect("href").expect("a link");
    assert!(href.starts_with("http://localhost:16686/trace/") && href.len() == 29 + 32, "{href}");
    browser.execute("document.getElementById('inspect').scrollIntoView()", vec![]).await.expect("scroll");
    screenshot(&browser, "inspector").await;

    // A worker row appears for the conversation: the workers table and the open inspector
    // follow live (the worker has not claimed yet).
    let in_five_minutes = stack.ctx.clock.now_ms() + 300_000;
    let row = json!({
        "workerId": "afw-demo-1", "provider": "fly", "status": "active", "load": 0,
        "machineId": "e286d01f", "appName": "af-workers", "region": "fra",
        "scheduledShutdownAt": in_five_minutes,
        "assignment": {"conversationId": "telegram:42", "agentKey": "support", "leaseId": "spawn"},
    });
    stack.admin().ok("upsertWorkerState", row).await;
    wait_for(&browser, r#"#workers-table tr[data-worker="afw-demo-1"]"#).await;
    let verdict = wait_for(&browser, r#"#verdict[data-verdict="waiting_for_claim"]"#).await;
    let reason = verdict.text().await.expect("reason");
    assert!(reason.contains("afw-demo-1") && reason.contains("has not claimed it yet"), "{reason}");
    browser.execute("document.getElementById('workers').scrollIntoView()", vec![]).await.expect("scroll");
    screenshot(&browser, "workers").await;

    // The pairing wizard: a code, then its status turns "used" live when the user sends it.
    // (A code needs the agent's bot, which importing a verified token would record.)
    let with_bot = json!({"agentKey": "support", "version": "1.0.0", "enabled": true,
        "secretsRef": ["telegram.botToken.support"], "botIdentity": "1001"});
    stack.admin().ok("upsertAgentProfile", with_bot).await;
    fill(&browser, "#pairing-form", &[("consumerUserId", "alice"), ("agentKey", "support")]).await;
    let code = wait_for(&browser, "#pairing-code").await.text().await.expect("code");
    wait_for(&browser, r#"#pairing-status[data-status="pending"]"#).await;
    let consume = json!({"code": code, "botIdentity": "1001", "telegramUserId": "42", "telegramChatId": "42"});
    stack.admin().ok("consumePairingCode", consume).await;
    wait_for(&browser, r#"#pairing-status[data-status="used"]"#).await;
    browser.execute("document.getElementById('agents').scrollIntoView()", vec![]).await.expect("scroll");
    screenshot(&browser, "panels").await;

    // A request without the session cookie is refused (fetch with credentials omitted).
    let status = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/v1/ops/getQueueStats', {method: 'POST', credentials: 'omit', body: '{}'})
               .then(r => done(r.status));",
            vec![],
        )
        .await
        .expect("fetch without cookie");
    assert_eq!(status, json!(401));

    // A cross-site form post is refused, and changes nothing.
    let evil = evil_site(base.clone()).await;
    browser.goto(&format!("http://localhost:{}/", evil.port())).await.expect("evil page");
    wait_for(&browser, "#evil").await;
    browser.execute("document.getElementById('evil').submit()", vec![]).await.expect("submit");
    wait_until("the cross-site post is answered", WAIT, || async {
        let url = browser.current_url().await.ok()?;
        url.as_str().contains("/v1/ops/enqueueMessage").then_some(())
    })
    .await;
    let text = browser.find(Locator::Css("body")).await.expect("body").text().await.expect("text");
    assert!(text.contains("unauthenticated") || text.contains("forbidden"), "cross-site post answered: {text}");
    let stats = stack.admin().ok("listQueueItemsForConversation", json!({"conversationId": "evil:1"})).await;
    assert_eq!(stats, json!([]), "the cross-site post must not enqueue anything");

    // A phone-sized view of the console.
    browser.goto(&format!("{base}/console")).await.expect("back");
    wait_for(&browser, "#live.pill:not(.off)").await;
    browser.set_window_size(400, 860).await.expect("resize");
    wait_for(&browser, r#"#jobs-table tr[data-message]"#).await;
    screenshot(&browser, "phone").await;

    // Logout ends the session for good.
    browser.find(Locator::Css("#logout")).await.expect("logout").click().await.expect("log out");
    wait_for(&browser, "#login-view:not([hidden])").await;
    let after = browser
        .execute_async(
            "const done = arguments[arguments.length - 1];
             fetch('/console/session').then(r => done(r.status));",
            vec![],
        )
        .await
        .expect("session after logout");
    assert_eq!(after, json!(401));

    browser.close().await.expect("close browser");
    drop(driver);
    stack.stop().await;
}
