//! The built-in web chat and team dashboard, the JSON API behind both, live updates over
//! Server-Sent Events, `/healthz` and `/metrics`. A chat adapter like Slack and Discord:
//! a new thread is a pipeline, each message a run, and the card and buttons come from
//! [`crate::bots::render`].

mod api;
mod metrics;

use std::future::Future;
use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use serde_json::json;

use crate::config::{Config, Secret};
use crate::orchestrator::Orchestrator;

const CHAT_HTML: &str = include_str!("assets/chat.html");
const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const TOKEN_COOKIE: &str = "threadline_token";

#[derive(Debug, thiserror::Error)]
pub enum WebError {
    #[error(
        "web.listen is {addr}, which is not loopback: set web.token (or THREADLINE_WEB__TOKEN) so only people with it get in"
    )]
    TokenRequired { addr: SocketAddr },
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

#[derive(Clone)]
pub struct WebState {
    pub orch: Orchestrator,
    token: Option<Secret>,
    /// Host headers accepted without a token (DNS-rebinding protection).
    local_hosts: Vec<String>,
}

impl WebState {
    pub fn new(orch: Orchestrator, addr: SocketAddr) -> Self {
        let token = Some(orch.config().web.token.clone()).filter(|t| !t.is_empty());
        let port = addr.port();
        let local_hosts = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .flat_map(|h| [format!("{h}:{port}"), h.to_string()])
            .collect();
        WebState {
            orch,
            token,
            local_hosts,
        }
    }
}

/// Applies the access rule: loopback is open, any other address needs a token.
pub fn listen_addr(config: &Config) -> Result<SocketAddr, WebError> {
    let addr: SocketAddr = config.web.listen.parse().expect("validated with the config");
    if !addr.ip().is_loopback() && config.web.token.is_empty() {
        return Err(WebError::TokenRequired { addr });
    }
    Ok(addr)
}

pub async fn bind(config: &Config) -> Result<tokio::net::TcpListener, WebError> {
    let addr = listen_addr(config)?;
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| WebError::Bind { addr, source })
}

/// The largest request body: a prompt and its attachments, base64-encoded.
pub const BODY_LIMIT: usize = crate::orchestrator::MAX_RUN_ATTACHMENT_BYTES / 3 * 4 + 4 * 1024 * 1024;

pub fn router(state: WebState) -> Router {
    Router::new()
        .route("/", get(|| page(CHAT_HTML)))
        .route("/dashboard", get(|| page(DASHBOARD_HTML)))
        .route("/pipelines/{id}", get(|| page(DASHBOARD_HTML)))
        .route("/runs/{id}", get(|| page(DASHBOARD_HTML)))
        .route(
            "/assets/app.js",
            get(|| asset(APP_JS, "text/javascript; charset=utf-8")),
        )
        .route("/assets/style.css", get(|| asset(STYLE_CSS, "text/css; charset=utf-8")))
        .route("/metrics", get(metrics::metrics))
        .route("/api", get(api::index))
        .route("/api/repos", get(api::repos))
        .route("/api/pipelines", get(api::list_pipelines).post(api::start_pipeline))
        .route("/api/pipelines/{id}", get(api::get_pipeline))
        .route("/api/pipelines/{id}/runs", post(api::follow_up))
        .route("/api/runs/{id}", get(api::get_run))
        .route("/api/runs/{id}/cancel", post(api::cancel))
        .route("/api/runs/{id}/retry", post(api::retry))
        .route("/api/runs/{id}/open-pr", post(api::open_pr))
        .route("/api/events", get(api::events))
        .route("/api/stats", get(api::stats))
        // Prompts may carry attachments (base64 in JSON: a third larger than the files).
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        // Health checks need no token.
        .route("/healthz", get(api::healthz))
        // The forges' webhooks carry their own signature, checked against the
        // repository's secret; they come through a public URL, so no Host check.
        .route(
            "/hooks/{repo}",
            post(forge_webhook).layer(axum::extract::DefaultBodyLimit::max(HOOK_BODY_LIMIT)),
        )
        // Outside the token and Host guard, so they cover every route, token or not.
        .layer(middleware::from_fn(same_site_only))
        .layer(middleware::from_fn(api::json_errors))
        .with_state(state)
}

/// Serves until `shutdown` resolves. Takes a bound listener so tests can use port 0.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: WebState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn page(html: &'static str) -> Html<&'static str> {
    Html(html)
}

/// The largest webhook payload read (GitHub's own cap is 25 MB; the events Threadline
/// acts on are a few kilobytes).
const HOOK_BODY_LIMIT: usize = 1024 * 1024;

/// `POST /hooks/NAME`: a webhook from the forge of repository NAME.
async fn forge_webhook(
    State(state): State<WebState>,
    axum::extract::Path(repo): axum::extract::Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::orchestrator::HookOutcome;
    let headers: crate::orchestrator::forge::hooks::Headers = headers
        .iter()
        .take(100)
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    match state.orch.forge_webhook(&repo, &headers, &body).await {
        Ok(outcome) => {
            let said = match outcome {
                HookOutcome::Ignored(why) => json!({"outcome": "ignored", "reason": why}),
                HookOutcome::PullRequest { state, pipelines } => {
                    json!({"outcome": "pull_request", "state": state.word(), "pipelines": pipelines})
                }
                HookOutcome::Queued { run_id, created } => {
                    json!({"outcome": if created { "queued" } else { "already_queued" }, "run": run_id})
                }
            };
            Json(said).into_response()
        }
        Err(e) => {
            tracing::warn!(repo = %crate::untrusted::name(&repo), error = ?e, "a webhook was refused");
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
            (status, Json(json!({"error": e.to_string()}))).into_response()
        }
    }
}

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Refuses a request that changes something (any method but GET, HEAD and OPTIONS) when
/// a browser says a page of another site made it: a form or a script elsewhere must not
/// cancel, retry or open pull requests through the browser of someone who can reach this
/// address (CSRF). Clients that send neither header (curl, scripts, the CLI) are let
/// through; the token and Host guard still applies to them.
async fn same_site_only(request: Request, next: Next) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(request).await;
    }
    match foreign_site(&request) {
        None => next.run(request).await,
        Some(site) => (
            StatusCode::FORBIDDEN,
            Json(json!({
                "error": format!(
                    "refused: {site} sent this request; change things from Threadline's own pages, or from a client that sends no Origin header such as curl or the CLI"
                )
            })),
        )
            .into_response(),
    }
}

/// Which page of another site a request came from, if a browser says it came from one:
/// an `Origin` that is not the origin the request was sent to (`null` included), or
/// `Sec-Fetch-Site: cross-site`.
fn foreign_site(request: &Request) -> Option<String> {
    let headers = request.headers();
    let origin = headers
        .get(header::ORIGIN)
        .map(|o| o.to_str().unwrap_or("an unreadable origin"));
    let page = |origin: &str| format!("a page of another site ({origin})");
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"cross-site"));
    if cross_site {
        return Some(origin.map(page).unwrap_or_else(|| "a page of another site".to_owned()));
    }
    let origin = origin?;
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()));
    match host {
        Some(host) if same_origin(origin, host) => None,
        _ => Some(page(origin)),
    }
}

/// Whether `origin` (`scheme://host[:port]`) names the `host[:port]` a request was sent
/// to. Host names compare case-insensitively; a default port may be left out of either.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.trim().split_once("://") else {
        return false; // `null`, or not an origin at all
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    if authority.is_empty() || authority.contains(['/', '@', '?', '#']) {
        return false;
    }
    let bare = |a: &str| -> String {
        let a = a.trim();
        a.strip_suffix(default_port).unwrap_or(a).to_ascii_lowercase()
    };
    bare(authority) == bare(host)
}

/// Token check (when a token is set) and Host check (when it is not).
async fn guard(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    match &state.token {
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            // Host names are case-insensitive (RFC 9110 §4.2.3).
            if !state.local_hosts.iter().any(|h| h.eq_ignore_ascii_case(host.trim())) {
                return (
                    StatusCode::FORBIDDEN,
                    "this address serves only requests addressed to localhost, 127.0.0.1 or [::1]; to reach it under another name, set web.token\n",
                )
                    .into_response();
            }
            next.run(request).await
        }
        Some(token) => {
            let jar = CookieJar::from_headers(headers);
            if bearer(headers).is_some_and(|t| same(t, token))
                || jar.get(TOKEN_COOKIE).is_some_and(|c| same(c.value(), token))
            {
                return next.run(request).await;
            }
            // `?token=` once sets a cookie, so links and the browser work.
            let query_token = request.uri().query().and_then(|q| {
                form_urlencoded::parse(q.as_bytes()).find_map(|(k, v)| (k == "token").then(|| v.into_owned()))
            });
            if let Some(t) = query_token
                && same(&t, token)
            {
                let cookie = Cookie::build((TOKEN_COOKIE, t))
                    .http_only(true)
                    .same_site(SameSite::Strict)
                    .path("/");
                return (jar.add(cookie), Redirect::to(request.uri().path())).into_response();
            }
            (
                StatusCode::UNAUTHORIZED,
                "a token is required: send `Authorization: Bearer <token>`, or open this page once with ?token=<token>\n",
            )
                .into_response()
        }
    }
}

/// The token of `Authorization: Bearer <token>`; the scheme is case-insensitive
/// (RFC 9110 §11.1).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares in constant time (`subtle`, which the optimiser cannot turn into an early
/// exit); only the length may show.
fn same(given: &str, token: &Secret) -> bool {
    use subtle::ConstantTimeEq;
    given.as_bytes().ct_eq(token.expose().as_bytes()).into()
}
