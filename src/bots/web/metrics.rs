//! `/metrics` in the Prometheus text format.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::WebState;
use crate::model::RunState;

const BUCKETS_SECONDS: [f64; 10] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

pub async fn metrics(State(state): State<WebState>) -> Response {
    let store = state.orch.queries();
    let (counts, durations) = match (store.count_by_state().await, store.finished_durations(10_000).await) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("store unavailable: {e}\n")).into_response();
        }
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP threadline_runs Runs by state.\n# TYPE threadline_runs gauge"
    );
    for st in RunState::ALL {
        let n = counts.iter().find(|(s, _)| *s == st).map(|(_, n)| *n).unwrap_or(0);
        let _ = writeln!(out, "threadline_runs{{state=\"{st}\"}} {n}");
    }
    let queued = counts
        .iter()
        .find(|(s, _)| *s == RunState::Queued)
        .map(|(_, n)| *n)
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "# HELP threadline_queue_depth Runs waiting to start.\n# TYPE threadline_queue_depth gauge\nthreadline_queue_depth {queued}"
    );
    let _ = writeln!(
        out,
        "# HELP threadline_run_duration_seconds Time from a prompt's acceptance to its run's end (latest 10,000 runs).\n# TYPE threadline_run_duration_seconds histogram"
    );
    let secs: Vec<f64> = durations.iter().map(|ms| *ms as f64 / 1000.0).collect();
    for b in BUCKETS_SECONDS {
        let n = secs.iter().filter(|s| **s <= b).count();
        let _ = writeln!(out, "threadline_run_duration_seconds_bucket{{le=\"{b}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "threadline_run_duration_seconds_bucket{{le=\"+Inf\"}} {}",
        secs.len()
    );
    let _ = writeln!(out, "threadline_run_duration_seconds_sum {}", secs.iter().sum::<f64>());
    let _ = writeln!(out, "threadline_run_duration_seconds_count {}", secs.len());
    let c = state.orch.counters();
    let _ = writeln!(
        out,
        "# HELP threadline_container_starts_total Agent containers started by this process.\n# TYPE threadline_container_starts_total counter\nthreadline_container_starts_total {}",
        c.container_starts.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP threadline_container_failures_total Agent containers that failed to start in this process.\n# TYPE threadline_container_failures_total counter\nthreadline_container_failures_total {}",
        c.container_failures.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP threadline_chat_api_errors_total Failed calls to a chat platform's API.\n# TYPE threadline_chat_api_errors_total counter"
    );
    for (platform, n) in c.chat_api_errors() {
        let _ = writeln!(out, "threadline_chat_api_errors_total{{platform=\"{platform}\"}} {n}");
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        out,
    )
        .into_response()
}
