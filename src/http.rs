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
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub retry_after: Option<f64>,
    pub json: Value,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The longest any outbound call may take, answer included.
const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest answer read.
const MAX_BODY: usize = 8 * 1024 * 1024;

#[derive(Clone)]
pub struct JsonClient {
    client: Client<HttpsConnector, Full<bytes::Bytes>>,
}

impl JsonClient {
    pub fn new() -> std::io::Result<JsonClient> {
        Ok(JsonClient {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(https_connector()?),
        })
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
            let retry_after = res
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<f64>().ok());
            let body = http_body_util::Limited::new(res.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, retry_after, body))
        };
        let (status, retry_after, body) = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {} s", TIMEOUT.as_secs()))??;
        Ok(Response {
            status,
            retry_after,
            json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        })
    }
}
