//! The one small JSON-over-HTTP(S) client behind the Discord REST calls and the forges:
//! system roots for TLS, plain HTTP for a local proxy or a test's fake.

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

pub type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The connector every HTTP client of Threadline uses.
pub fn https_connector() -> std::io::Result<HttpsConnector> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()?
        .https_or_http()
        .enable_http1()
        .build())
}

/// A response: its status, its `Retry-After` header in seconds, and its body as JSON
/// (`Null` when the body is not JSON).
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<f64>,
    pub json: Value,
    /// Its `ETag`, for a conditional request next time.
    pub etag: Option<String>,
    /// `X-RateLimit-Remaining` / `RateLimit-Remaining` (GitHub, GitLab, Gitea).
    pub rate_remaining: Option<u64>,
    /// When the rate limit resets, in Unix seconds (`X-RateLimit-Reset` / `RateLimit-Reset`).
    pub rate_reset: Option<u64>,
    /// A conditional GET the server answered 304: `json` is the cached answer.
    pub not_modified: bool,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// How long to wait before asking again, when the answer is a rate limit (429, or a
    /// 403 with no requests left): `Retry-After`, else until the reset, else a minute.
    pub fn rate_limited(&self) -> Option<std::time::Duration> {
        // GitHub's secondary limits: a 403 with Retry-After while requests remain.
        let limited = self.status == 429
            || (self.status == 403 && (self.rate_remaining == Some(0) || self.retry_after.is_some()));
        if !limited {
            return None;
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let secs = match (self.retry_after, self.rate_reset) {
            (Some(after), _) => after.clamp(1.0, 3600.0),
            (None, Some(reset)) => reset.saturating_sub(now).clamp(1, 3600) as f64,
            (None, None) => 60.0,
        };
        Some(std::time::Duration::from_secs_f64(secs))
    }
}

/// The most answers [`JsonClient::get_conditional`] remembers.
const MAX_CACHED: usize = 4096;

/// The longest any outbound call may take, answer included.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest answer read.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// Answers kept for conditional requests, by URL and credentials: (ETag, body).
type Cached = std::collections::HashMap<(String, u64), (String, Value)>;

#[derive(Clone)]
pub struct JsonClient {
    client: Client<HttpsConnector, Full<bytes::Bytes>>,
    cached: std::sync::Arc<std::sync::Mutex<Cached>>,
}

impl JsonClient {
    pub fn new() -> std::io::Result<JsonClient> {
        Ok(JsonClient {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(https_connector()?),
            cached: Default::default(),
        })
    }

    /// GETs `url` with `If-None-Match` when an earlier answer carried an ETag: a 304
    /// (which GitHub does not count against the rate limit) gives back the earlier
    /// answer, marked `not_modified`. The credentials are part of the key, so one token's
    /// answer is never served to another.
    pub async fn get_conditional(&self, url: &str, headers: &[(&str, &str)]) -> Result<Response, String> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::hash::DefaultHasher::new();
        headers.hash(&mut hasher);
        let key = (url.to_owned(), hasher.finish());
        let known = self.cached.lock().unwrap().get(&key).cloned();
        let mut with = headers.to_vec();
        if let Some((etag, _)) = &known {
            with.push(("if-none-match", etag.as_str()));
        }
        let mut res = self.call("GET", url, &with, None).await?;
        match (res.status, known) {
            (304, Some((_, json))) => {
                res.status = 200;
                res.json = json;
                res.not_modified = true;
            }
            (200, _) => {
                let mut cached = self.cached.lock().unwrap();
                match &res.etag {
                    Some(etag) => {
                        if cached.len() >= MAX_CACHED {
                            cached.clear();
                        }
                        cached.insert(key, (etag.clone(), res.json.clone()));
                    }
                    None => {
                        cached.remove(&key);
                    }
                }
            }
            _ => {}
        }
        Ok(res)
    }

    /// GETs `url` with `headers`: its body, if the answer is a 200 of at most `cap` bytes.
    pub async fn get_bytes(&self, url: &str, headers: &[(&str, &str)], cap: usize) -> Result<Vec<u8>, String> {
        let mut req = axum::http::Request::builder().method("GET").uri(url);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(Full::new(bytes::Bytes::new())).map_err(|e| e.to_string())?;
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            if res.status() != 200 {
                return Err(format!("the server answered {}", res.status()));
            }
            let body = http_body_util::Limited::new(res.into_body(), cap)
                .collect()
                .await
                .map_err(|_| format!("it is larger than {cap} bytes"))?
                .to_bytes();
            Ok::<_, String>(body.to_vec())
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))?
    }

    /// Sends `method url` with `headers` and an optional JSON body. An error is a
    /// transport failure (no answer); any HTTP status is a [`Response`].
    pub async fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> Result<Response, String> {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .header("accept", "application/json");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        // Every call is bounded in time and size: callers hold locks (a pipeline's, while
        // Open PR asks the forge) and a peer may be slow or hostile.
        let exchange = async {
            let res = self.client.request(req).await.map_err(|e| e.to_string())?;
            let status = res.status().as_u16();
            let header = |names: &[&str]| {
                names.iter().find_map(|name| {
                    res.headers()
                        .get(*name)
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.trim().to_owned())
                })
            };
            let answer = Response {
                status,
                retry_after: header(&["retry-after"])
                    .and_then(|v| v.parse::<f64>().ok())
                    .filter(|v| v.is_finite() && *v >= 0.0),
                etag: header(&["etag"]).filter(|e| e.len() <= 256),
                rate_remaining: header(&["x-ratelimit-remaining", "ratelimit-remaining"]).and_then(|v| v.parse().ok()),
                rate_reset: header(&["x-ratelimit-reset", "ratelimit-reset"]).and_then(|v| v.parse().ok()),
                ..Response::default()
            };
            let body = http_body_util::Limited::new(res.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((answer, body))
        };
        let (mut answer, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))??;
        answer.json = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok(answer)
    }
}
