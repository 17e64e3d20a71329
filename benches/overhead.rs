//! Threadline's overhead against the bare floor, measured side by side in one run:
//! `cargo bench --bench overhead` (set BENCH_REPS to change the repetitions).
//!
//! 1. A whole run with a trivial agent against `docker run` (CLI and bollard) plus a
//!    `git clone --local`, commit and push of the same change.
//! 2. Follow-ups, which reuse the workspace.
//! 3. 50 pipelines at once at two concurrency limits against 50 bare `docker run`s under
//!    the same limit, with the acknowledgment latency of new prompts meanwhile.
//! 4. Resident memory idle and at 50 pipelines.
//! 5. Workspace preparation in a 20,000-file repository against `git clone --local`.
//! 6. A repository environment whose setup takes 30 s (BENCH_SETUP_SECS): the first run
//!    pays it; later runs of new pipelines against runs without an environment.
//! 7. The egress proxy: an HTTP exchange through it against the same exchange direct.
//! 8. Scale-out on PostgreSQL (TEST_POSTGRES_URL, an admin URL): claims per second with
//!    1,000 queued runs and 10 workers against the same on SQLite; one run on PostgreSQL
//!    against one on SQLite; prompt acknowledgment with 3 workers and 50 runs going.

#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::ContainerCreateBody;
use futures_util::StreamExt;
use harness::{IMAGE, TestEnv, follow_up, git};
use threadline::model::{Run, RunState};
use threadline::orchestrator::Orchestrator;
use threadline::store::Store;

/// The trivial agent's work: one small change, the same the floor commits.
const AGENT: &str = "echo change > bench.txt";

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // BENCH_ONLY=1,3,5 runs some sections (1 includes 2, 3 includes 4).
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |n: &str| only.is_empty() || only.split(',').any(|s| s.trim() == n);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    println!("# Threadline overhead benchmark");
    println!("machine: {cores} cores, {}; docker {}", mem_total(), docker_version());
    println!("repetitions: {reps} (medians and p95 over them)\n");

    let env = TestEnv::new();
    let docker = Docker::connect_with_defaults()
        .unwrap()
        .negotiate_version()
        .await
        .unwrap();
    let rss_before = rss_mb();

    if wanted("1") {
        single_runs(&env, &docker, reps).await;
    }
    if wanted("3") {
        concurrent_runs(cores, rss_before).await;
    }
    if wanted("5") {
        large_repo(reps.min(5)).await;
    }
    if wanted("6") {
        environments(reps).await;
    }
    if wanted("7") {
        egress_proxy(reps.max(200)).await;
    }
    if wanted("8") {
        scale_out(reps).await;
    }
}

/// Section 8: the queue and the store on PostgreSQL, against SQLite where both apply.
async fn scale_out(reps: usize) {
    println!("## 8. Scale-out: PostgreSQL\n");
    let Some(pg) = harness::test_database() else {
        println!("skipped: set TEST_POSTGRES_URL to a PostgreSQL admin URL\n");
        return;
    };
    let sqlite_env = {
        let mut env = TestEnv::new();
        env.config.database_url = String::new();
        env
    };
    let mut pg_env = TestEnv::new();
    pg_env.config.database_url = pg.clone();

    // 8a. The queue alone: 1,000 queued runs, 10 claimers each with its own connection
    // pool (as 10 worker processes), each run claimed and ended at once (a trivial agent
    // as the queue sees it).
    println!("| store | runs | claimers | seconds | claims/s |");
    println!("|---|---:|---:|---:|---:|");
    let mut rates = Vec::new();
    for (name, url) in [("SQLite", sqlite_env.config.database_url()), ("PostgreSQL", pg.clone())] {
        let rate = queue_throughput(&url, 1000, 10).await;
        rates.push(rate);
        println!("| {name} | 1000 | 10 | {:.2} | {rate:.0} |", 1000.0 / rate);
    }
    println!(
        "\nclaims per second on PostgreSQL: **{:.0}** (target ≥ 300: {}); SQLite {:.0}\n",
        rates[1],
        verdict(rates[1] >= 300.0),
        rates[0]
    );

    // 8b. One run, end to end, on each store, interleaved.
    let (lite, post) = (sqlite_env.orchestrator().await, pg_env.orchestrator().await);
    let (mut on_lite, mut on_pg) = (Vec::new(), Vec::new());
    for i in 0..reps {
        for (orch, env, series) in [(&lite, &sqlite_env, &mut on_lite), (&post, &pg_env, &mut on_pg)] {
            let sub = env.start(orch, &format!("echo {i} > bench.txt")).await;
            let mut p = Phases::default();
            p.add(orch, &sub.run.id).await;
            series.push(p.total[0]);
        }
    }
    lite.shutdown().await;
    post.shutdown().await;
    println!("| one run with a trivial agent (ms) | median | p95 |");
    println!("|---|---:|---:|");
    row("SQLite", &on_lite);
    row("PostgreSQL", &on_pg);
    let ratio = median(&on_pg) / median(&on_lite);
    println!(
        "\nPostgreSQL / SQLite: **{ratio:.2}×** ({:+.0} ms) (target ≤ 1.2×: {})\n",
        median(&on_pg) - median(&on_lite),
        verdict(ratio <= 1.2)
    );

    // 8c. Acknowledgment with 3 workers and 50 runs going, on a front end of its own.
    let front = pg_env
        .in_process("front", &[], threadline::orchestrator::Role::FrontEnd)
        .await;
    let mut workers = Vec::new();
    for w in ["w1", "w2", "w3"] {
        workers.push(pg_env.in_process(w, &[], threadline::orchestrator::Role::Worker).await);
    }
    let probe = pg_env.start(&front, "true").await;
    harness::finished(front.store(), &probe.run.id).await;
    let started = Instant::now();
    let mut acks = Vec::new();
    let mut ids = Vec::new();
    for i in 0..50 {
        let t = Instant::now();
        ids.push(
            pg_env
                .start(&front, &format!("echo {i} > bench.txt; sleep 1"))
                .await
                .run
                .id,
        );
        acks.push(ms(t.elapsed()));
    }
    probe_until_done(&front, &probe.pipeline.id, &ids, &mut acks).await;
    for id in &ids {
        let run = front.store().run(id).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Succeeded, "{id}: {:?}", run.error);
    }
    println!(
        "| 3 workers, 50 runs | {:.1} s | ack median {:.1} ms | ack p99 {:.1} ms |\n|---|---:|---:|---:|",
        started.elapsed().as_secs_f64(),
        median(&acks),
        pct(&acks, 99.0)
    );
    println!(
        "\nacknowledgment p99 with 3 workers and 50 runs going: **{:.1} ms** (target < 200 ms: {})\n",
        pct(&acks, 99.0),
        verdict(pct(&acks, 99.0) < 200.0)
    );
    for w in workers {
        w.shutdown().await;
    }
    front.shutdown().await;
}

/// Claims per second: `runs` queued runs taken by `claimers` concurrent claimers, each
/// with its own pool, and each run ended as soon as it is claimed.
async fn queue_throughput(url: &str, runs: usize, claimers: usize) -> f64 {
    let store = Store::open(url).await.unwrap();
    for i in 0..runs {
        let run = harness::new_run("true", None);
        store
            .insert_pipeline(&harness::pipeline_on(&format!("{i:08x}"), "/r"), &run)
            .await
            .unwrap();
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..claimers {
        let store = Store::open(url).await.unwrap();
        tasks.push(tokio::spawn(async move {
            let (instance, worker) = (format!("bench-{c}"), format!("home-{c}"));
            let claimer = threadline::store::Claimer {
                instance: &instance,
                worker_id: &worker,
                labels: &[],
                limit: 100,
            };
            let mut n = 0;
            while let Some(run) = store.claim_next(&claimer, None).await.unwrap() {
                store
                    .transition_owned(&instance, &run.id, RunState::Preparing, RunState::Saving, "")
                    .await
                    .unwrap();
                store
                    .transition_owned(&instance, &run.id, RunState::Saving, RunState::Succeeded, "")
                    .await
                    .unwrap();
                n += 1;
            }
            n
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(claimed, runs, "every run claimed once");
    runs as f64 / secs
}

/// Section 6: a 30-second setup paid once; later runs against runs with no environment.
async fn environments(reps: usize) {
    let setup_secs: u64 = std::env::var("BENCH_SETUP_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let with_env = {
        let mut env = TestEnv::new();
        env.add_demo_repo();
        let seed = env.dir.path().join("env-seed");
        git(
            env.dir.path(),
            &["clone", "-q", &env.origin_url(), seed.to_str().unwrap()],
        );
        std::fs::create_dir_all(seed.join(".threadline")).unwrap();
        std::fs::write(
            seed.join(".threadline/setup.sh"),
            format!("sleep {setup_secs}\nmkdir -p /opt\necho ready > /opt/ready\n"),
        )
        .unwrap();
        git(&seed, &["add", "-A"]);
        git(
            &seed,
            &[
                "-c",
                "user.name=b",
                "-c",
                "user.email=b@e",
                "commit",
                "-q",
                "-m",
                "setup",
            ],
        );
        git(&seed, &["push", "-q", "origin", "main"]);
        env
    };
    let without = TestEnv::new();
    let (orch_env, orch_bare) = (with_env.orchestrator().await, without.orchestrator().await);
    let to_running = |orch: Orchestrator, id: String| async move {
        let run = harness::finished(orch.store(), &id).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
        let events = orch.store().events(&id).await.unwrap();
        let at = |s: RunState| events.iter().find(|e| e.state == s).unwrap().at as f64;
        at(RunState::Running) - at(RunState::Queued)
    };
    let first = with_env.start(&orch_env, "cat /opt/ready > r.txt").await;
    let first_ms = to_running(orch_env.clone(), first.run.id.clone()).await;
    let (mut env_ms, mut bare_ms) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let a = with_env.start(&orch_env, "cat /opt/ready > r.txt").await;
        env_ms.push(to_running(orch_env.clone(), a.run.id.clone()).await);
        let b = without.start(&orch_bare, "echo ready > r.txt").await;
        bare_ms.push(to_running(orch_bare.clone(), b.run.id.clone()).await);
    }
    println!("## 6. A repository environment with a {setup_secs} s setup (ms, prompt accepted → agent running)\n");
    println!("| series | median | p95 |");
    println!("|---|---:|---:|");
    println!("| first run (builds the environment) | {first_ms:.0} | |");
    row("later runs, each a new pipeline, with the environment", &env_ms);
    row("runs without an environment", &bare_ms);
    let ratio = median(&env_ms) / median(&bare_ms);
    println!(
        "\nwith / without: **{ratio:.2}×** at the median (target ≤ 1.1× and under 1 s: {})\n",
        verdict(ratio <= 1.1 && median(&env_ms) < 1000.0)
    );
    orch_env.shutdown().await;
    orch_bare.shutdown().await;
    let _ = orch_env.remove_environments(None).await;
}

/// Section 7: one HTTP exchange (connect, request, answer) through the egress proxy
/// against the same exchange straight to the server, both on loopback.
async fn egress_proxy(reps: usize) {
    use threadline::orchestrator::egress::{Allowlist, RunProxy};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = server.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            });
        }
    });
    let pins = [("bench.test".to_owned(), "127.0.0.1".to_owned())].into();
    let proxy = RunProxy::start(
        "127.0.0.1".parse().unwrap(),
        0,
        Allowlist::new(&["bench.test".to_owned()], &pins),
        |_, _| {},
    )
    .await
    .unwrap();
    proxy.set_client("127.0.0.1".parse().unwrap());
    async fn exchange(to: std::net::SocketAddr, request: &str) -> f64 {
        let t = Instant::now();
        let mut conn = tokio::net::TcpStream::connect(to).await.unwrap();
        conn.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.unwrap();
        assert!(answer.ends_with(b"ok"), "{}", String::from_utf8_lossy(&answer));
        ms(t.elapsed())
    }
    let direct_to: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut direct, mut proxied) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        direct.push(exchange(direct_to, "GET / HTTP/1.0\r\n\r\n").await);
        proxied.push(
            exchange(
                proxy.addr,
                &format!("GET http://bench.test:{port}/ HTTP/1.0\r\nHost: bench.test\r\n\r\n"),
            )
            .await,
        );
    }
    println!("## 7. The egress proxy, one HTTP exchange on loopback (ms)\n");
    println!("| series | median | p95 |");
    println!("|---|---:|---:|");
    row("direct", &direct);
    row("through the proxy", &proxied);
    let added = median(&proxied) - median(&direct);
    println!(
        "\nthe proxy adds **{added:.2} ms** per connection at the median (target < 5 ms: {})\n",
        verdict(added < 5.0)
    );
}

/// Sections 1 and 2: one run at a time against the floor.
async fn single_runs(env: &TestEnv, docker: &Docker, reps: usize) {
    let orch = env.orchestrator().await;
    let mut floor_cli = Vec::new();
    let mut floor_bollard = Vec::new();
    let mut floor_git = Vec::new();
    let mut first = Phases::default();
    let mut follow = Phases::default();
    for i in 0..reps {
        // Interleaved, so drift on this shared machine hits all series alike.
        floor_cli.push(time(docker_run_cli));
        floor_bollard.push(docker_run_bollard(docker).await);
        floor_git.push(git_floor(env, i));
        let sub = env.start(&orch, AGENT).await;
        first.add(&orch, &sub.run.id).await;
        let next = orch
            .submit_follow_up(follow_up(&sub.pipeline.id, &format!("echo {i} >> bench.txt")))
            .await
            .unwrap();
        follow.add(&orch, &next.run.id).await;
    }
    let floor: Vec<f64> = floor_cli.iter().zip(&floor_git).map(|(d, g)| d + g).collect();
    println!("## 1. One run with a trivial agent (ms)\n");
    println!("| series | median | p95 |");
    println!("|---|---:|---:|");
    row("floor: `docker run --rm` (CLI)", &floor_cli);
    row("floor: create/start/wait/remove (bollard)", &floor_bollard);
    row("floor: `git clone --local` + commit + push", &floor_git);
    row("**floor total** (CLI docker run + git)", &floor);
    first.rows("first run");
    follow.rows("follow-up");
    let (tl, fl) = (median(&first.total), median(&floor));
    println!(
        "\nfirst run / floor: **{:.2}×** at the median, {:+.0} ms (target ≤ 1.5× and ≤ +300 ms: {})",
        tl / fl,
        tl - fl,
        verdict(tl / fl <= 1.5 && tl - fl <= 300.0)
    );
    let (fu, _) = (median(&follow.total), ());
    println!(
        "follow-up / floor: **{:.2}×**, {:+.0} ms; follow-up overhead {:+.0} ms vs first run {:+.0} ms (target: lower: {})\n",
        fu / fl,
        fu - fl,
        fu - fl,
        tl - fl,
        verdict(fu < tl)
    );
    orch.shutdown().await;
}

/// Sections 3 and 4: 50 pipelines at once, acknowledgments meanwhile, memory.
async fn concurrent_runs(cores: usize, rss_before: f64) {
    let rss_idle = {
        let env = TestEnv::new();
        let orch = env.orchestrator().await;
        let rss = rss_mb();
        orch.shutdown().await;
        rss
    };
    println!("## 3. 50 pipelines at once (s, ms)\n");
    println!("| limit | bare `docker run`s | Threadline | ratio | ack median | ack p99 | peak RSS |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut peak_rss = 0.0f64;
    for limit in [cores, 8] {
        let bare = bare_runs(50, limit).await;
        let mut env = TestEnv::new();
        env.config.max_concurrent_runs = limit as u32;
        let orch = env.orchestrator().await;
        let probe = env.start(&orch, "true").await; // a pipeline to send acknowledged prompts to
        harness::finished(orch.store(), &probe.run.id).await;
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = tokio::spawn(sample_rss(peak.clone(), stop.clone()));
        let started = Instant::now();
        let mut subs = Vec::new();
        let mut acks = Vec::new();
        for i in 0..50 {
            let t = Instant::now();
            subs.push(env.start(&orch, &format!("echo {i} > bench.txt")).await);
            acks.push(ms(t.elapsed()));
        }
        // Prompts arriving while the 50 run: acknowledged (queued), then withdrawn.
        let ids: Vec<String> = subs.iter().map(|s| s.run.id.clone()).collect();
        probe_until_done(&orch, &probe.pipeline.id, &ids, &mut acks).await;
        let total = started.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        sampler.await.unwrap();
        let peak_mb = peak.load(Ordering::Relaxed) as f64 / 1024.0;
        peak_rss = peak_rss.max(peak_mb);
        for id in &ids {
            let run = orch.store().run(id).await.unwrap().unwrap();
            assert_eq!(run.state, RunState::Succeeded, "{id}: {:?}", run.error);
        }
        println!(
            "| {limit} | {bare:.1} | {total:.1} | {:.2}× | {:.1} | {:.1} | {peak_mb:.0} MB |",
            total / bare,
            median(&acks),
            pct(&acks, 99.0)
        );
        orch.shutdown().await;
    }
    println!(
        "\nacknowledgment: `submit_*` (validate, store, queue) of prompts arriving while the runs execute; target p99 < 200 ms.\n"
    );
    println!("## 4. Resident memory (MB)\n");
    println!("| before start | idle (orchestrator started) | peak at 50 pipelines |");
    println!("|---:|---:|---:|");
    println!(
        "| {rss_before:.0} | {rss_idle:.0} | {peak_rss:.0} |\n\ntarget < 60 MB at 50: {}\n",
        verdict(peak_rss < 60.0)
    );
}

/// Timings of one kind of run, from its stored transitions.
#[derive(Default)]
struct Phases {
    to_running: Vec<f64>,
    running: Vec<f64>,
    saving: Vec<f64>,
    total: Vec<f64>,
}

impl Phases {
    async fn add(&mut self, orch: &Orchestrator, run_id: &str) {
        let run = harness::finished(orch.store(), run_id).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
        let events = orch.store().events(run_id).await.unwrap();
        let at = |s: RunState| events.iter().find(|e| e.state == s).unwrap().at as f64;
        self.to_running.push(at(RunState::Running) - at(RunState::Queued));
        self.running.push(at(RunState::Saving) - at(RunState::Running));
        self.saving.push(at(RunState::Succeeded) - at(RunState::Saving));
        self.total.push(at(RunState::Succeeded) - at(RunState::Queued));
    }

    fn rows(&self, what: &str) {
        row(&format!("{what}: prompt accepted → agent running"), &self.to_running);
        row(&format!("{what}: agent running → exited"), &self.running);
        row(
            &format!("{what}: agent exited → pushed, final state stored"),
            &self.saving,
        );
        row(&format!("**{what} total**"), &self.total);
    }
}

fn docker_run_cli() {
    let ok = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            IMAGE,
            "sh",
            "-c",
            "echo change > bench.txt",
        ])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

async fn docker_run_bollard(docker: &Docker) -> f64 {
    let t = Instant::now();
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["sh".into(), "-c".into(), "echo change > bench.txt".into()]),
        ..Default::default()
    };
    let id = docker.create_container(None, body).await.unwrap().id;
    docker.start_container(&id, None).await.unwrap();
    let _ = docker.wait_container(&id, None).next().await;
    docker
        .remove_container(
            &id,
            Some(
                bollard::query_parameters::RemoveContainerOptionsBuilder::new()
                    .force(true)
                    .build(),
            ),
        )
        .await
        .unwrap();
    ms(t.elapsed())
}

fn git_floor(env: &TestEnv, i: usize) -> f64 {
    let dir = env.dir.path().join(format!("floor-{i}"));
    let t = Instant::now();
    git(
        env.dir.path(),
        &["clone", "-q", "--local", &env.origin_url(), dir.to_str().unwrap()],
    );
    std::fs::write(dir.join("bench.txt"), "change\n").unwrap();
    git(&dir, &["add", "-A"]);
    git(&dir, &["commit", "-q", "-m", "floor"]);
    git(&dir, &["push", "-q", "origin", &format!("HEAD:refs/heads/floor-{i}")]);
    ms(t.elapsed())
}

/// `n` bare `docker run`s, at most `limit` at once; seconds.
async fn bare_runs(n: usize, limit: usize) -> f64 {
    let sem = Arc::new(tokio::sync::Semaphore::new(limit));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let permit = sem.clone().acquire_owned().await.unwrap();
        tasks.push(tokio::task::spawn_blocking(move || {
            docker_run_cli();
            drop(permit);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    t.elapsed().as_secs_f64()
}

/// Prompts arriving while `ids` run, every 50 ms until they end: each one's
/// acknowledgment (queued) is timed into `acks`, then it is withdrawn.
async fn probe_until_done(orch: &Orchestrator, pipeline_id: &str, ids: &[String], acks: &mut Vec<f64>) {
    loop {
        let t = Instant::now();
        let ack = orch.submit_follow_up(follow_up(pipeline_id, "true")).await.unwrap();
        acks.push(ms(t.elapsed()));
        orch.cancel(&ack.run.id).await.unwrap();
        if all_done(orch.store(), ids).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn all_done(store: &Store, ids: &[String]) -> bool {
    for id in ids {
        let run: Run = store.run(id).await.unwrap().unwrap();
        if !run.state.is_terminal() {
            return false;
        }
    }
    true
}

async fn large_repo(reps: usize) {
    println!("## 5. A 20,000-file repository (ms)\n");
    let mut env = TestEnv::new();
    env.config.max_concurrent_runs = 1;
    let seed = env.dir.path().join("big");
    git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), seed.to_str().unwrap()],
    );
    let t = Instant::now();
    for round in 0..3 {
        for d in 0..100 {
            let dir = seed.join(format!("src/m{d:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in 0..200 {
                if round == 0 || f % 10 == round {
                    std::fs::write(
                        dir.join(format!("f{f:03}.rs")),
                        format!("// {round} {d} {f}\npub fn f() {{}}\n"),
                    )
                    .unwrap();
                }
            }
        }
        git(&seed, &["add", "-A"]);
        git(&seed, &["commit", "-q", "-m", &format!("round {round}")]);
    }
    git(&seed, &["push", "-q", "origin", "main"]);
    println!(
        "(generated 20,000 files in 3 commits in {:.1} s)\n",
        t.elapsed().as_secs_f64()
    );

    let orch = env.orchestrator().await;
    let mut clone = Vec::new();
    let mut first_prep = Vec::new();
    let mut follow_prep = Vec::new();
    let mut first_total = Vec::new();
    for i in 0..reps {
        let dir = env.dir.path().join(format!("big-floor-{i}"));
        clone.push(time(|| {
            git(
                env.dir.path(),
                &["clone", "-q", "--local", &env.origin_url(), dir.to_str().unwrap()],
            );
        }));
        let sub = env.start(&orch, AGENT).await;
        let (prep, total) = prep_and_total(&orch, &sub.run.id).await;
        first_prep.push(prep);
        first_total.push(total);
        let next = orch
            .submit_follow_up(follow_up(&sub.pipeline.id, "echo 2 >> bench.txt"))
            .await
            .unwrap();
        follow_prep.push(prep_and_total(&orch, &next.run.id).await.0);
    }
    println!("| series | median | p95 |");
    println!("|---|---:|---:|");
    row("`git clone --local`", &clone);
    row("first run: workspace preparation (preparing → running)", &first_prep);
    row("follow-up: workspace preparation", &follow_prep);
    row("first run total", &first_total);
    println!(
        "\nfirst-run preparation / clone: {:.2}×; follow-up preparation / clone: {:.2}×",
        median(&first_prep) / median(&clone),
        median(&follow_prep) / median(&clone)
    );
    orch.shutdown().await;
}

async fn prep_and_total(orch: &Orchestrator, run_id: &str) -> (f64, f64) {
    let run = harness::finished(orch.store(), run_id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let events = orch.store().events(run_id).await.unwrap();
    let at = |s: RunState| events.iter().find(|e| e.state == s).unwrap().at as f64;
    (
        at(RunState::Running) - at(RunState::Preparing),
        at(RunState::Succeeded) - at(RunState::Queued),
    )
}

async fn sample_rss(peak: Arc<AtomicU64>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        peak.fetch_max((rss_mb() * 1024.0) as u64, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn mem_total() -> String {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| format!("{:.0} GiB", kb / 1024.0 / 1024.0))
        .unwrap_or_default()
}

fn docker_version() -> String {
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn time(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    ms(t.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(v: &[f64]) -> f64 {
    pct(v, 50.0)
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

fn row(what: &str, v: &[f64]) {
    let digits = if median(v) < 10.0 { 2 } else { 0 };
    println!("| {what} | {:.*} | {:.*} |", digits, median(v), digits, pct(v, 95.0));
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}
