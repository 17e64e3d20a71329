//! `/metrics` in the Prometheus text format.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::WebState;

pub async fn metrics(State(state): State<WebState>) -> Response {
    match state.orch.queries().count_by_state().await {
        Ok(counts) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
            state.orch.metrics().render(&counts),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")).into_response(),
    }
}
