//! The kill-at-random soak: `cargo bench --bench soak`. Queues prompts on 10 pipelines,
//! then runs `threadline serve` and kills it with SIGKILL at random moments, again and
//! again, and finally lets one `serve --until-idle` finish. Prints how many runs there
//! were, how many kills, and how many runs were lost (no outcome, or work missing from
//! the branch), doubled (work on the branch twice), stuck (not finished) or left an
//! orphan container. Exits 1 if any of those is not zero.
//!
//! SOAK_KILLS (default 100), SOAK_PIPELINES (10), SOAK_PROMPTS (3 per kill, at least 30),
//! SOAK_SEED (the clock) make it repeatable; it needs Docker and busybox-static like the
//! tests.

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{TestEnv, cli, follow_up, write_cli_config};
use threadline::model::{Origin, RunState};
use threadline::orchestrator::NewPipeline;

/// Each run leaves a line naming itself: twice means it ran twice, none that it was lost.
const AGENT: &str = "echo \"$THREADLINE_RUN_ID\" >> work.txt\nsleep 1";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic generator (xorshift), so a seed replays the same kills.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from))
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let kills = env_or("SOAK_KILLS", 100);
    let pipelines = env_or("SOAK_PIPELINES", 10).max(1);
    let prompts = env_or("SOAK_PROMPTS", (3 * kills).max(30)).max(pipelines);
    let seed = env_or(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let mut random = Random(seed | 1);
    println!("# Threadline kill-at-random soak");
    println!("seed {seed}: {prompts} prompts on {pipelines} pipelines, `serve` killed {kills} times (SIGKILL)\n");

    let mut env = TestEnv::new();
    env.config.max_concurrent_runs = 4;
    let config = write_cli_config(&env, "max_concurrent_runs = 4\n[web]\nenabled = false\n");

    // Queue every prompt up front, through the library (no process executes them yet).
    let orch = env.orchestrator_unstarted().await;
    let mut ids = Vec::new();
    for p in 0..pipelines {
        let sub = orch
            .submit_pipeline(NewPipeline {
                repo: env.origin_url(),
                base_branch: None,
                agent: None,
                prompt: AGENT.into(),
                requested_by: "soak".into(),
                origin: Origin::cli(),
                idempotency_key: Some(format!("soak-{p}")),
                mode: Default::default(),
                attachments: Vec::new(),
            })
            .await
            .unwrap();
        ids.push(sub.pipeline.id);
    }
    for n in pipelines..prompts {
        let pipeline = &ids[(n % pipelines) as usize];
        orch.submit_follow_up(follow_up(pipeline, AGENT)).await.unwrap();
    }
    let store = orch.store().clone();

    let started = Instant::now();
    for kill in 1..=kills {
        let mut serve = cli(&config, &["serve"])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Long enough, at times, for a restart to adopt the last one's runs (its lease
        // is 4 s) and to get some work done; short enough to land anywhere in a run.
        tokio::time::sleep(random.millis(200, 6000)).await;
        let _ = Command::new("kill").args(["-KILL", &serve.id().to_string()]).status();
        let _ = serve.wait();
        if kill % 10 == 0 {
            let done = finished_count(&store, &ids).await;
            println!(
                "  {kill} kills, {done} of {prompts} runs finished, {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    let last = cli(&config, &["serve", "--until-idle"])
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let took = started.elapsed();

    // What became of every run.
    let mut states: BTreeMap<String, u64> = BTreeMap::new();
    let (mut lost, mut doubled, mut stuck) = (0u64, 0u64, 0u64);
    for id in &ids {
        let pipeline = store.pipeline(id).await.unwrap().unwrap();
        let work = env.origin_file(&pipeline.branch, "work.txt").unwrap_or_default();
        for run in store.runs(id).await.unwrap() {
            *states.entry(run.state.to_string()).or_default() += 1;
            let times = work.lines().filter(|l| *l == run.id).count();
            if !run.state.is_terminal() {
                stuck += 1;
            } else if times > 1 {
                doubled += 1;
            } else if times == 0 && run.state == RunState::Succeeded {
                lost += 1;
            }
        }
    }
    let mut orphans = 0;
    for id in &ids {
        orphans += Command::new("docker")
            .args(["ps", "-aq", "--filter", &format!("label=threadline.pipeline={id}")])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
    }
    let runs: u64 = states.values().sum();
    lost += prompts - runs;

    println!("\n| runs | kills | lost | doubled | stuck | orphans | time |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {runs} | {kills} | {lost} | {doubled} | {stuck} | {orphans} | {:.0} s |",
        took.as_secs_f64()
    );
    println!("\nfinal states: {states:?}; the last `serve --until-idle` exited {last}");
    if lost + doubled + stuck > 0 || orphans > 0 {
        std::process::exit(1);
    }
}

async fn finished_count(store: &threadline::store::Store, ids: &[String]) -> usize {
    let mut done = 0;
    for id in ids {
        done += store
            .runs(id)
            .await
            .unwrap()
            .iter()
            .filter(|r| r.state.is_terminal())
            .count();
    }
    done
}
