//! A minimal Discord REST client: JSON in and out, `Authorization: Bot`, and Discord's
//! 429 `retry_after` reported so the caller can wait it out.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::Value;

use crate::bots::chat::ChatError;

#[derive(Clone)]
pub struct Rest {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<bytes::Bytes>>,
    base: String,
    auth: String,
}

impl Rest {
    pub fn new(api_url: &str, token: &str) -> std::io::Result<Rest> {
        let https = crate::bots::https_connector()?;
        Ok(Rest {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(https),
            base: format!("{}/api/v10", api_url.trim_end_matches('/')),
            auth: format!("Bot {token}"),
        })
    }

    /// Calls `method path` with a JSON body; a 429 is `RateLimited` with Discord's delay.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ChatError> {
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = axum::http::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", &self.auth)
            .header("content-type", "application/json")
            .header("user-agent", "DiscordBot (https://github.com/threadline, 0.1)")
            .body(Full::new(bytes::Bytes::from(bytes)))
            .map_err(|e| ChatError::Failed(e.to_string()))?;
        let res = self
            .client
            .request(req)
            .await
            .map_err(|e| ChatError::Failed(e.to_string()))?;
        let status = res.status();
        let header_delay = res
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<f64>().ok());
        let body = res
            .into_body()
            .collect()
            .await
            .map_err(|e| ChatError::Failed(e.to_string()))?
            .to_bytes();
        let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        if status.as_u16() == 429 {
            let secs = json["retry_after"].as_f64().or(header_delay).unwrap_or(1.0);
            return Err(ChatError::RateLimited {
                retry_after: Duration::from_secs_f64(secs.clamp(0.0, 300.0)),
            });
        }
        if !status.is_success() {
            return Err(ChatError::Failed(format!(
                "{method} {path}: {status}: {}",
                json["message"].as_str().unwrap_or("")
            )));
        }
        Ok(json)
    }
}
