//! Web console sessions: login with the admin token, an `HttpOnly`, `SameSite=Strict` session
//! cookie, a per-session CSRF token, logout.
//!
//! A session lives in the `af_console_sessions` bucket under the SHA-256 of its cookie value
//! (whoever reads the bucket cannot take a session over), so every ingress replica sees it and
//! it survives restarts. It is created once (create-only write) and deleted by logout; nothing
//! ever rewrites it, so there is no read-modify-write to race. It ends at its `expiresAt`, and
//! the bucket's max age (`http.console_session_ttl_ms`) removes it by then as well. Expiry is
//! judged on the stack's clock (`common::clock`), so a manual test clock moves it too.
//!
//! Every request that changes something with a session must carry the session's CSRF token in
//! [`CSRF_HEADER`] (a cross-site form cannot set a header, and cannot read the token) and must
//! not come from another site ([`same_origin`]: `Sec-Fetch-Site`, else `Origin` against
//! `Host`). The token is compared in constant time. `SameSite=Strict` keeps the cookie off
//! cross-site requests in the first place.
//!
//! A console call of an operation is forwarded with ingress's own admin credential
//! (`auth.admin_token`), so the owning service authenticates and audits it as an admin call.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use common::OpError;
use common::auth::Role;
use common::service::ServiceContext;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error_response;

/// The session cookie.
pub(crate) const COOKIE: &str = "af_console";
/// The header carrying the session's CSRF token on every state-changing request.
pub(crate) const CSRF_HEADER: &str = "x-af-csrf";
/// Characters of a session id and of a CSRF token (base 36: about 222 bits).
const TOKEN_CHARS: usize = 43;
/// The longest admin token a login may present.
const MAX_TOKEN_CHARS: usize = 4096;

/// What the sessions bucket holds per session.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionRecord {
    csrf: String,
    created_at: i64,
    expires_at: i64,
    /// `common::audit::fingerprint` of the admin token the session was opened with. Empty in a
    /// record written before sessions kept it: such a session is refused, as after a rotation.
    #[serde(default)]
    admin_token_fingerprint: String,
}

/// A valid session, as a request presented it.
pub(crate) struct Session {
    key: String,
    csrf: String,
    pub(crate) expires_at: i64,
}

fn key_of(session_id: &str) -> String {
    hex::encode(Sha256::digest(session_id.as_bytes()))
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether the request carries a console session cookie (valid or not).
pub(crate) fn has_cookie(headers: &HeaderMap) -> bool {
    cookie(headers, COOKIE).is_some()
}

/// Whether the request came from this site. Browsers send `Sec-Fetch-Site` on every request;
/// without it, an `Origin` header must name the `Host` the request was sent to. A request with
/// neither (curl, an old browser's same-origin GET) passes: it carries no third party's intent.
pub(crate) fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return matches!(site.as_bytes(), b"same-origin" | b"none");
    }
    match (headers.get(header::ORIGIN), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => {
            let origin = origin.to_str().unwrap_or("");
            let host = host.to_str().unwrap_or("-");
            origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://")) == Some(host)
        }
        (Some(_), None) => false,
        (None, _) => true,
    }
}

fn cross_site() -> OpError {
    OpError::forbidden("cross-site request refused: the console accepts requests from its own page only")
}

/// The session the request's cookie names, if it is valid and not expired.
pub(crate) async fn current(ctx: &ServiceContext, headers: &HeaderMap) -> Result<Session, OpError> {
    let no_session = || OpError::unauthenticated("no console session: log in at /console");
    let id = cookie(headers, COOKIE).filter(|id| id.len() == TOKEN_CHARS).ok_or_else(no_session)?;
    let key = key_of(id);
    let record = ctx
        .buckets
        .console_sessions
        .get::<SessionRecord>(&key)
        .await
        .map_err(|e| OpError::unavailable(format!("reading the console session: {e}")))?
        .ok_or_else(no_session)?
        .value;
    if record.expires_at <= ctx.clock.now_ms() {
        return Err(OpError::unauthenticated("the console session expired: log in again"));
    }
    if !ctx.auth.accepts_admin_fingerprint(&record.admin_token_fingerprint) {
        return Err(OpError::unauthenticated(
            "the admin token this console session was opened with is no longer accepted: log in again",
        ));
    }
    Ok(Session { key, csrf: record.csrf, expires_at: record.expires_at })
}

/// The session of a state-changing request: valid, from this site, with its CSRF token.
pub(crate) async fn for_change(ctx: &ServiceContext, headers: &HeaderMap) -> Result<Session, OpError> {
    if !same_origin(headers) {
        return Err(cross_site());
    }
    let session = current(ctx, headers).await?;
    let presented = headers.get(CSRF_HEADER).map(|v| v.as_bytes()).unwrap_or_default();
    if !bool::from(presented.ct_eq(session.csrf.as_bytes())) {
        return Err(OpError::forbidden(format!("missing or wrong {CSRF_HEADER} header for this console session")));
    }
    Ok(session)
}

/// The Authorization header a console call is forwarded with: ingress's admin credential.
pub(crate) fn forwarded_authorization(ctx: &ServiceContext) -> Result<String, OpError> {
    let token = ctx.settings.auth.admin_token.as_ref().ok_or_else(|| {
        OpError::unavailable("auth.admin_token is not configured in ingress; the console cannot call operations")
    })?;
    Ok(format!("Bearer {}", token.expose_secret()))
}

fn set_cookie(ctx: &ServiceContext, value: &str, max_age_secs: u64) -> HeaderValue {
    let secure = if ctx.settings.http.public_base_url().starts_with("https://") { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_secs}{secure}");
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static("af_console=; Max-Age=0"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginArgs {
    token: String,
}

/// What the page learns about its session: the CSRF token to send and when it ends.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionView {
    csrf: String,
    expires_at: i64,
    /// Where Telegram delivers updates (the webhook endpoint panel).
    webhook_url: String,
}

impl SessionView {
    fn new(ctx: &ServiceContext, csrf: String, expires_at: i64) -> Self {
        let t = &ctx.settings.telegram;
        let base = match t.public_url.trim() {
            "" => ctx.settings.http.public_base_url(),
            url => url.trim_end_matches('/').to_string(),
        };
        Self { csrf, expires_at, webhook_url: format!("{base}{}", t.webhook_path()) }
    }
}

/// `POST /console/login` `{"token": "<admin token>"}`: sets the session cookie and answers the
/// session's CSRF token. Only the admin role may log in. Login attempts share one rate limit.
pub(crate) async fn login(
    State(ctx): State<ServiceContext>,
    axum::extract::Extension(limits): axum::extract::Extension<std::sync::Arc<crate::rate_limit::Limits>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return error_response(&cross_site());
    }
    if let Err(wait) = limits.check_op("console-login") {
        let secs = crate::rate_limit::retry_after_secs(wait);
        let err =
            OpError::new(common::ErrorCode::RateLimited, format!("too many login attempts; retry after {secs} s"));
        return crate::rate_limit::with_retry_after(error_response(&err), wait);
    }
    let args: LoginArgs = match serde_json::from_slice(&body) {
        Ok(args) => args,
        Err(e) => return error_response(&OpError::invalid(format!("login body must be {{\"token\": \"...\"}}: {e}"))),
    };
    if args.token.is_empty() || args.token.len() > MAX_TOKEN_CHARS {
        return error_response(&OpError::unauthenticated("invalid admin token"));
    }
    // The same constant-time check every service applies to a bearer token.
    match ctx.auth.authenticate(Some(&format!("Bearer {}", args.token))) {
        Ok(caller) if caller.role == Role::Admin => {}
        Ok(_) => return error_response(&OpError::forbidden("only the admin token opens the console")),
        Err(_) => return error_response(&OpError::unauthenticated("invalid admin token")),
    }
    let ttl_ms = ctx.settings.http.console_session_ttl_ms;
    let id = common::crypto::random_base36(TOKEN_CHARS);
    let now = ctx.clock.now_ms();
    let record = SessionRecord {
        csrf: common::crypto::random_base36(TOKEN_CHARS),
        created_at: now,
        expires_at: now + ttl_ms as i64,
        admin_token_fingerprint: common::audit::fingerprint(&args.token),
    };
    if let Err(e) = ctx.buckets.console_sessions.create(&key_of(&id), &record).await {
        return error_response(&OpError::unavailable(format!("storing the console session: {e}")));
    }
    tracing::info!("console session opened");
    let view = SessionView::new(&ctx, record.csrf, record.expires_at);
    let mut response = (StatusCode::OK, Json(view)).into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&ctx, &id, ttl_ms / 1000));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `GET /console/session`: the current session's CSRF token and expiry (the page asks after a
/// reload, since it keeps the token in memory only), or 401.
pub(crate) async fn show(State(ctx): State<ServiceContext>, headers: HeaderMap) -> Response {
    match current(&ctx, &headers).await {
        Ok(session) => {
            let view = SessionView::new(&ctx, session.csrf, session.expires_at);
            let mut response = (StatusCode::OK, Json(view)).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(err) => error_response(&err),
    }
}

/// `POST /console/logout`: deletes the session (every replica stops accepting it at once) and
/// clears the cookie.
pub(crate) async fn logout(State(ctx): State<ServiceContext>, headers: HeaderMap) -> Response {
    let session = match for_change(&ctx, &headers).await {
        Ok(session) => session,
        Err(err) => return error_response(&err),
    };
    if let Err(e) = ctx.buckets.console_sessions.raw().purge(&session.key).await {
        return error_response(&OpError::unavailable(format!("deleting the console session: {e}")));
    }
    tracing::info!("console session closed");
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(header::SET_COOKIE, set_cookie(&ctx, "", 0));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn cookies_are_found_among_others() {
        let h = headers(&[("cookie", "a=1; af_console=abc; b=2"), ("cookie", "c=3")]);
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "c"), Some("3"));
        assert_eq!(cookie(&h, "af"), None);
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        assert!(same_origin(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(same_origin(&headers(&[("origin", "http://h:8080"), ("host", "h:8080")])));
        assert!(!same_origin(&headers(&[("origin", "http://evil.example"), ("host", "h:8080")])));
        assert!(!same_origin(&headers(&[("origin", "null"), ("host", "h:8080")])));
        assert!(same_origin(&headers(&[("host", "h:8080")])));
    }
}
