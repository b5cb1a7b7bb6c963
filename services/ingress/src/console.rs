//! The web console: static HTML, CSS and JavaScript compiled into the binary (no build step),
//! the session endpoints ([`crate::session`]) and the event stream ([`crate::events`]). The page
//! calls operations through `POST /v1/ops/<name>` with its session cookie and CSRF header.

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use common::service::ServiceContext;

const INDEX_HTML: &str = include_str!("../console/index.html");
const CONSOLE_JS: &str = include_str!("../console/console.js");
const CONSOLE_CSS: &str = include_str!("../console/console.css");

/// Scripts, styles and everything else from this origin only, no inline script, and no
/// framing by another site (clickjacking).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub(crate) fn routes() -> Router<ServiceContext> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console", get(|| async { asset(INDEX_HTML, "text/html; charset=utf-8") }))
        .route("/console/console.js", get(|| async { asset(CONSOLE_JS, "text/javascript; charset=utf-8") }))
        .route("/console/console.css", get(|| async { asset(CONSOLE_CSS, "text/css; charset=utf-8") }))
        .route("/console/login", post(crate::session::login))
        .route("/console/logout", post(crate::session::logout))
        .route("/console/session", get(crate::session::show))
        .route("/console/events", get(crate::events::stream))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
