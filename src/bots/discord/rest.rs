//! A minimal Discord REST client: JSON in and out, `Authorization: Bot`, and Discord's
//! 429 `retry_after` reported so the caller can wait it out.

use std::time::Duration;

use serde_json::Value;

use crate::bots::chat::ChatError;
use crate::http::JsonClient;

#[derive(Clone)]
pub struct Rest {
    client: JsonClient,
    base: String,
    auth: String,
}

impl Rest {
    pub fn new(api_url: &str, token: &str) -> std::io::Result<Rest> {
        Ok(Rest {
            client: JsonClient::new()?,
            base: format!("{}/api/v10", api_url.trim_end_matches('/')),
            auth: format!("Bot {token}"),
        })
    }

    /// Calls `method path` with a JSON body; a 429 is `RateLimited` with Discord's delay.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ChatError> {
        let headers = [
            ("authorization", self.auth.as_str()),
            ("user-agent", "DiscordBot (https://github.com/threadline, 0.1)"),
        ];
        let res = self
            .client
            .call(method, &format!("{}{path}", self.base), &headers, body.as_ref())
            .await
            .map_err(ChatError::Failed)?;
        if res.status == 429 {
            let secs = res.json["retry_after"].as_f64().or(res.retry_after).unwrap_or(1.0);
            return Err(ChatError::RateLimited {
                retry_after: Duration::from_secs_f64(secs.clamp(0.0, 300.0)),
            });
        }
        if !res.is_success() {
            return Err(ChatError::Failed(format!(
                "{method} {path}: {}: {}",
                res.status,
                res.json["message"].as_str().unwrap_or("")
            )));
        }
        Ok(res.json)
    }
}
