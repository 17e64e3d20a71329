//! The built-in web chat and team dashboard, the JSON API behind both, live updates over
//! Server-Sent Events, `/healthz` and `/metrics`. A chat adapter like Slack and Discord:
//! a new thread is a pipeline, each message a run, and the card and buttons come from
//! [`crate::bots::render`].

mod api;
mod metrics;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};

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
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        // Health checks need no token.
        .route("/healthz", get(api::healthz))
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

async fn asset(body: &'static str, content_type: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Token check (when a token is set) and Host check (when it is not).
async fn guard(State(state): State<WebState>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    match &state.token {
        None => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
            if !state.local_hosts.iter().any(|h| h == host) {
                return (
                    StatusCode::FORBIDDEN,
                    "this address serves only requests to localhost\n",
                )
                    .into_response();
            }
            next.run(request).await
        }
        Some(token) => {
            if presented(headers, "authorization", "Bearer ").is_some_and(|t| same(&t, token))
                || cookie(headers).is_some_and(|t| same(&t, token))
            {
                return next.run(request).await;
            }
            // `?token=` once sets a cookie, so links and the browser work.
            let query_token = request
                .uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("token=")))
                .map(str::to_owned);
            if let Some(t) = query_token
                && same(&t, token)
            {
                let path = request.uri().path().to_owned();
                let mut response = Redirect::to(&path).into_response();
                if let Ok(v) = HeaderValue::from_str(&format!("{TOKEN_COOKIE}={t}; HttpOnly; SameSite=Strict; Path=/"))
                {
                    response.headers_mut().insert(header::SET_COOKIE, v);
                }
                return response;
            }
            (
                StatusCode::UNAUTHORIZED,
                "a token is required: send `Authorization: Bearer <token>`, or open this page once with ?token=<token>\n",
            )
                .into_response()
        }
    }
}

fn presented(headers: &HeaderMap, name: &str, prefix: &str) -> Option<String> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .strip_prefix(prefix)
        .map(str::to_owned)
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(&format!("{TOKEN_COOKIE}=")).map(str::to_owned))
}

/// Compares without stopping at the first difference.
fn same(given: &str, token: &Secret) -> bool {
    let (a, b) = (given.as_bytes(), token.expose().as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
