//! `/metrics`: what this process counted, and the runs by state as the store has them,
//! in the Prometheus text format written by `metrics-exporter-prometheus`.
//!
//! Each [`Metrics`] is its own registry (no global recorder), so several orchestrators in
//! one process (the tests) count apart.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusRecorder};

use crate::model::{Millis, Run, RunState};

const RUNS: &str = "threadline_runs";
const QUEUE_DEPTH: &str = "threadline_queue_depth";
const RUN_DURATION: &str = "threadline_run_duration_seconds";
const CONTAINER_STARTS: &str = "threadline_container_starts_total";
const CONTAINER_FAILURES: &str = "threadline_container_failures_total";
const CHAT_API_ERRORS: &str = "threadline_chat_api_errors_total";
const AGENT_TOKENS: &str = "threadline_agent_tokens_total";
const AGENT_COST: &str = "threadline_agent_cost_usd";
const EGRESS_BLOCKED: &str = "threadline_egress_blocked_total";
const ENV_BUILDS: &str = "threadline_environment_builds_total";

const BUCKETS_SECONDS: [f64; 10] = [1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0];

/// The registry of one Threadline process.
pub struct Metrics {
    recorder: PrometheusRecorder,
    container_starts: Counter,
    container_failures: Counter,
    run_duration: Histogram,
    tokens_in: Counter,
    tokens_out: Counter,
    /// In millionths of a dollar (counters count whole numbers); shown in dollars.
    cost: Gauge,
    queue_depth: Gauge,
    runs: Vec<(RunState, Gauge)>,
    egress_blocked: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(RUN_DURATION.to_owned()), &BUCKETS_SECONDS)
            .expect("the buckets are not empty")
            .build_recorder();
        let describe = |name: &'static str, unit: Option<Unit>, help: &'static str| {
            // Gauges, counters and histograms share one description table.
            recorder.describe_counter(KeyName::from_const_str(name), unit, SharedString::const_str(help));
        };
        describe(RUNS, None, "Runs by state, as the store has them.");
        describe(QUEUE_DEPTH, None, "Runs waiting to start.");
        describe(
            RUN_DURATION,
            Some(Unit::Seconds),
            "Time from a prompt's acceptance to its run's end, for runs this process saw end.",
        );
        describe(CONTAINER_STARTS, None, "Agent containers started by this process.");
        describe(
            CONTAINER_FAILURES,
            None,
            "Agent containers that failed to start in this process.",
        );
        describe(CHAT_API_ERRORS, None, "Failed calls to a chat platform's API.");
        describe(
            AGENT_TOKENS,
            None,
            "Tokens agents reported, for runs this process saw end.",
        );
        describe(
            AGENT_COST,
            None,
            "US dollars agents reported (or priced), for runs this process saw end.",
        );
        describe(
            EGRESS_BLOCKED,
            None,
            "Requests of allowlisted agents the egress proxy refused.",
        );
        describe(ENV_BUILDS, None, "Repository environments built, by outcome.");
        let md = metadata();
        let runs = RunState::ALL
            .into_iter()
            .map(|st| {
                let key = Key::from_parts(RUNS, vec![Label::new("state", st.to_string())]);
                (st, recorder.register_gauge(&key, &md))
            })
            .collect();
        Metrics {
            container_starts: recorder.register_counter(&Key::from_static_name(CONTAINER_STARTS), &md),
            container_failures: recorder.register_counter(&Key::from_static_name(CONTAINER_FAILURES), &md),
            run_duration: recorder.register_histogram(&Key::from_static_name(RUN_DURATION), &md),
            tokens_in: recorder.register_counter(
                &Key::from_parts(AGENT_TOKENS, vec![Label::from_static_parts("direction", "in")]),
                &md,
            ),
            tokens_out: recorder.register_counter(
                &Key::from_parts(AGENT_TOKENS, vec![Label::from_static_parts("direction", "out")]),
                &md,
            ),
            cost: recorder.register_gauge(&Key::from_static_name(AGENT_COST), &md),
            queue_depth: recorder.register_gauge(&Key::from_static_name(QUEUE_DEPTH), &md),
            runs,
            egress_blocked: {
                let c = recorder.register_counter(&Key::from_static_name(EGRESS_BLOCKED), &md);
                c.increment(0);
                c
            },
            recorder,
        }
    }

    /// An agent container started, or failed to.
    pub fn container_started(&self, ok: bool) {
        if ok {
            self.container_starts.increment(1);
        } else {
            self.container_failures.increment(1);
        }
    }

    /// A run reached its end in this process.
    pub fn run_ended(&self, run: &Run) {
        if let Some(end) = run.finished_at {
            self.run_duration.record(seconds(end - run.created_at));
        }
        self.tokens_in.increment(run.usage.tokens_in.unwrap_or(0).max(0) as u64);
        self.tokens_out
            .increment(run.usage.tokens_out.unwrap_or(0).max(0) as u64);
        if let Some(cost) = run.usage.cost_usd.filter(|c| c.is_finite() && *c > 0.0) {
            self.cost.increment(cost);
        }
    }

    /// The egress proxy refused a request.
    pub fn egress_blocked(&self) {
        self.egress_blocked.increment(1);
    }

    /// An environment build ended.
    pub fn environment_built(&self, ok: bool) {
        let outcome = if ok { "built" } else { "failed" };
        let key = Key::from_parts(ENV_BUILDS, vec![Label::from_static_parts("outcome", outcome)]);
        self.recorder.register_counter(&key, &metadata()).increment(1);
    }

    fn chat_api_errors(&self, platform: &'static str) -> Counter {
        let key = Key::from_parts(CHAT_API_ERRORS, vec![Label::from_static_parts("platform", platform)]);
        self.recorder.register_counter(&key, &metadata())
    }

    /// Makes a platform show from its start, at zero.
    pub fn register_platform(&self, platform: &'static str) {
        self.chat_api_errors(platform).increment(0);
    }

    /// A call to a chat platform's API failed.
    pub fn chat_api_error(&self, platform: &'static str) {
        self.chat_api_errors(platform).increment(1);
    }

    /// The exposition, with the runs by state as `counts` has them.
    pub fn render(&self, counts: &[(RunState, i64)]) -> String {
        let count = |st: RunState| counts.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
        for (st, gauge) in &self.runs {
            gauge.set(count(*st) as f64);
        }
        self.queue_depth.set(count(RunState::Queued) as f64);
        self.recorder.handle().render()
    }
}

fn seconds(ms: Millis) -> f64 {
    ms.max(0) as f64 / 1000.0
}
