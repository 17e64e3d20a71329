//! Scale-out: `threadline worker` processes sharing one database with a front end. Each
//! worker is a real process with its own data folder (its "host"); they share the Docker
//! engine and the origin, as hosts share a registry and a forge. One is killed and one
//! is cut off from the database while runs are in flight.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use threadline::model::{Run, RunState};
use threadline::orchestrator::{Orchestrator, Role, RunUpdate, Scope};

use crate::harness::{TestEnv, follow_up, git, sh_agent};

/// A `threadline worker` process.
struct Worker {
    child: Child,
    log: PathBuf,
}

impl Worker {
    fn start(env: &TestEnv, name: &str, database_url: &str, extra: &str) -> Worker {
        let dir = env.dir.path().join(format!("worker-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("threadline.toml");
        let agent = sh_agent();
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\ndatabase_url = {database_url:?}\ndefault_agent = \"sh\"\nmax_concurrent_runs = 2\n{extra}\n\
                 [worker]\nname = {name:?}\n\
                 [agents.sh]\nimage = {:?}\nargv = {:?}\nnetwork = \"none\"\nstop_grace_secs = 1\n\
                 [agents.sh.env_set]\nWORKER = {name:?}\n",
                dir.join("data"),
                agent.image,
                agent.argv
            ),
        )
        .unwrap();
        let log = dir.join("worker.log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_threadline"))
            .arg("--config")
            .arg(&config)
            .arg("worker")
            .env("RUST_LOG", "threadline=info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The runs each live worker owns, by worker name.
async fn owned(orch: &Orchestrator) -> HashMap<String, Vec<Run>> {
    let instances = orch.queries().instances().await.unwrap();
    let mut by_worker: HashMap<String, Vec<Run>> = HashMap::new();
    for (run, owner) in orch.store().active_runs_with_owner().await.unwrap() {
        if let Some(i) = instances.iter().find(|i| Some(&i.id) == owner.as_ref()) {
            by_worker.entry(i.worker_name.clone()).or_default().push(run);
        }
    }
    by_worker
}

async fn wait_until_running_on(orch: &Orchestrator, worker: &str) -> Vec<Run> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let runs: Vec<Run> = owned(orch)
            .await
            .remove(worker)
            .unwrap_or_default()
            .into_iter()
            .filter(|r| r.state == RunState::Running)
            .collect();
        if !runs.is_empty() {
            return runs;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker {worker} never ran anything"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The script of run `n` of a pipeline: a line naming the run and the worker that
/// executed it, whether the agent was told of the runs before, and a moment of work.
fn script(marker: &str) -> String {
    format!(
        "echo \"{marker} by $WORKER\" >> runs.txt\n\
         if grep -q 'Run 1' /threadline/history.md 2>/dev/null; then echo \"{marker} saw history\" >> history-seen.txt; fi\n\
         sleep 2\n"
    )
}

/// Every commit on `branch` in the origin with its `Threadline-Run` trailer.
fn runs_committed(origin: &Path, branch: &str) -> Vec<String> {
    git(
        origin,
        &["log", "--format=%(trailers:key=Threadline-Run,valueonly)", branch],
    )
    .lines()
    .map(str::trim)
    .filter(|l| !l.is_empty())
    .map(str::to_owned)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_queue_through_a_kill_and_a_partition() {
    let mut env = TestEnv::new();
    let url = env.config.database_url();
    // Workers on several hosts share a database server: the suite's PostgreSQL pass.
    if !url.starts_with("postgres") {
        return;
    }
    // The front end: this process, executing nothing (as `serve --no-worker`).
    env.config.data_dir = env.dir.path().join("front");
    let front = env.orchestrator_unstarted().await;
    front.start_as(Scope::All, Role::FrontEnd).await.unwrap();
    let mut updates = front.subscribe();
    let (a, b) = (Worker::start(&env, "wa", &url, ""), Worker::start(&env, "wb", &url, ""));
    // The third reaches PostgreSQL through a link the test can cut.
    let (proxy, c_url) = crate::harness::cuttable_database(&url).await;
    let c = Worker::start(&env, "wc", &c_url, "");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while front
        .queries()
        .instances()
        .await
        .unwrap()
        .iter()
        .filter(|i| !i.worker_id.is_empty())
        .count()
        < 3
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the workers never registered:\n{}",
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Sees what the workers do, through the database: every run's end reaches this
    // front end's watchers though no run executes here.
    let seen_ends = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let relay = tokio::spawn({
        let seen = seen_ends.clone();
        async move {
            while let Ok(update) = updates.recv().await {
                if let RunUpdate::State(run) = update
                    && run.state.is_terminal()
                {
                    seen.lock().unwrap().insert(run.id.clone());
                }
            }
        }
    });

    // 20 pipelines of 3 runs each: a first prompt and two follow-ups, queued at once.
    let mut pipelines = Vec::new();
    let mut runs = Vec::new();
    for p in 0..20 {
        let sub = env.start(&front, &script(&format!("p{p} run1"))).await;
        runs.push(sub.run.id.clone());
        for n in 2..=3 {
            let f = front
                .submit_follow_up(follow_up(&sub.pipeline.id, &script(&format!("p{p} run{n}"))))
                .await
                .unwrap();
            runs.push(f.run.id);
        }
        pipelines.push(sub.pipeline);
    }

    // A worker killed with runs in flight.
    let on_a = wait_until_running_on(&front, "wa").await;
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // A worker cut off from the database with runs in flight, past its lease, then healed.
    let cut_runs = wait_until_running_on(&front, "wc").await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(9)).await;
    proxy.heal();

    // Everything ends.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        let unfinished = front.queries().runs_in_states(&RunState::UNFINISHED).await.unwrap();
        if unfinished.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} runs never ended: {:?}\n--- wb ---\n{}\n--- wc ---\n{}",
            unfinished.len(),
            unfinished.iter().map(|r| (&r.id, r.state)).collect::<Vec<_>>(),
            b.log(),
            c.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 0 runs lost: every one succeeded.
    let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
    for id in &runs {
        let run = front.queries().run(id).await.unwrap().unwrap();
        assert_eq!(
            run.state,
            RunState::Succeeded,
            "run {id}: {:?}\n--- wb ---\n{}\n--- wc ---\n{}",
            run.error,
            b.log(),
            c.log()
        );
        let events = front.queries().events(id).await.unwrap();
        assert_eq!(
            events.iter().filter(|e| e.state.is_terminal()).count(),
            1,
            "run {id} ended once: {events:?}"
        );
        let last = git(
            &env.origin,
            &["show", &format!("{}:runs.txt", run.head_commit.clone().unwrap())],
        );
        let worker = last.lines().last().unwrap().rsplit(' ').next().unwrap().to_owned();
        *by_worker.entry(worker).or_default() += 1;
    }
    // Every pipeline's branch: each run's commit on it once, its lines once and in order
    // (0 runs executed twice, nothing from an attempt that lost its run), and each
    // follow-up continued from the branch with its history, wherever it ran.
    for (p, pipeline) in pipelines.iter().enumerate() {
        let committed = runs_committed(&env.origin, &pipeline.branch);
        let mut expected: Vec<String> = (1..=3).map(|n| format!("{}-{n}", pipeline.id)).collect();
        expected.reverse();
        assert_eq!(committed, expected, "pipeline p{p}'s commits");
        let lines = env.origin_file(&pipeline.branch, "runs.txt").unwrap();
        let markers: Vec<&str> = lines.lines().map(|l| l.split(" by ").next().unwrap()).collect();
        assert_eq!(
            markers,
            vec![format!("p{p} run1"), format!("p{p} run2"), format!("p{p} run3")],
            "pipeline p{p}'s work"
        );
        let history = env
            .origin_file(&pipeline.branch, "history-seen.txt")
            .unwrap_or_default();
        assert_eq!(
            history,
            format!("p{p} run2 saw history\np{p} run3 saw history\n"),
            "pipeline p{p}'s follow-ups were told what happened before"
        );
    }
    assert!(by_worker.len() >= 2, "the work was shared: {by_worker:?}");

    // The killed worker's runs were taken over and finished elsewhere.
    for run in &on_a {
        let events = front.queries().events(&run.id).await.unwrap();
        assert!(
            events.iter().any(|e| e.detail.contains("taken over by worker")),
            "run {} of the killed worker: {events:?}",
            run.id
        );
    }
    // The cut-off worker's: taken over, and let go by it once healed, storing nothing.
    {
        for run in &cut_runs {
            let events = front.queries().events(&run.id).await.unwrap();
            assert!(
                events.iter().any(|e| e.detail.contains("from worker wc")),
                "run {} of the cut-off worker: {events:?}\n{}",
                run.id,
                c.log()
            );
        }
        crate::harness::poll_until(
            "the healed worker lets its lost runs go",
            || c.log().contains("another worker took the run over"),
            || c.log(),
        )
        .await;
        assert!(!c.log().contains("panicked"), "{}", c.log());
    }
    // The front end was told of every run's end, though it executed none.
    crate::harness::poll_until(
        "the front end saw every run end",
        || seen_ends.lock().unwrap().len() == runs.len(),
        || format!("{} of {}", seen_ends.lock().unwrap().len(), runs.len()),
    )
    .await;
    // Logs and shells of runs on other hosts say where they are.
    let config = crate::harness::write_cli_config(&env, "");
    let out = crate::harness::cli(&config, &["logs", &runs[0]]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && said.contains("is on worker w"), "{said}");
    let out = crate::harness::cli(&config, &["shell", &pipelines[0].id])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("workspace is on worker w"),
        "{said}"
    );
    let out = crate::harness::cli(&config, &["workers"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("wb") && listed.contains("front end"), "{listed}");
    relay.abort();
    front.shutdown().await;
    drop((b, c));
}

fn prompt_on(repo: &str, agent: &str, script: &str) -> threadline::orchestrator::NewPipeline {
    threadline::orchestrator::NewPipeline {
        repo: repo.into(),
        base_branch: None,
        agent: Some(agent.into()),
        prompt: script.into(),
        requested_by: "tester".into(),
        origin: threadline::model::Origin::cli(),
        idempotency_key: None,
        mode: Default::default(),
        attachments: Vec::new(),
    }
}

/// What a queued run says it waits for, once it says so.
async fn waiting(orch: &Orchestrator, run_id: &str, what: &str) -> String {
    let run = crate::harness::wait_for(orch.store(), run_id, what, |r| {
        r.state == RunState::Queued && r.progress.as_ref().is_some_and(|p| p.waiting.is_some())
    })
    .await;
    run.progress.unwrap().waiting.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_go_to_workers_with_the_labels_they_need() {
    let mut env = TestEnv::new();
    let mut gpu = sh_agent();
    gpu.requires = vec!["gpu".into()];
    env.config.agents.insert("gpu".into(), gpu);
    let front = env.in_process("front", &[], Role::FrontEnd).await;
    let plain = env.in_process("w-plain", &[], Role::Worker).await;
    let origin = env.origin_url();
    let wants_gpu = front
        .submit_pipeline(prompt_on(&origin, "gpu", "echo \"by $WORKER\" > who.txt"))
        .await
        .unwrap();
    let any = front
        .submit_pipeline(prompt_on(&origin, "sh", "echo \"by $WORKER\" > who.txt"))
        .await
        .unwrap();
    // The plain worker takes what it can, and the run it cannot take says why.
    let done = crate::harness::finished(front.store(), &any.run.id).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.error);
    assert_eq!(
        env.origin_file(&any.pipeline.branch, "who.txt").as_deref(),
        Some("by w-plain\n")
    );
    let why = waiting(&front, &wants_gpu.run.id, "waiting for a gpu worker").await;
    assert!(why.contains("labelled gpu"), "{why}");
    assert_eq!(
        front.store().run(&wants_gpu.run.id).await.unwrap().unwrap().state,
        RunState::Queued
    );
    // A worker with the label comes: the run goes there.
    let gpu_worker = env.in_process("w-gpu", &["gpu", "arm64"], Role::Worker).await;
    let done = crate::harness::finished(front.store(), &wants_gpu.run.id).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.error);
    assert_eq!(
        env.origin_file(&wants_gpu.pipeline.branch, "who.txt").as_deref(),
        Some("by w-gpu\n")
    );
    for orch in [gpu_worker, plain, front] {
        orch.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_only_pipeline_waits_for_its_worker_and_says_so() {
    let env = TestEnv::new();
    // A checkout with no remote: its branch lives in the worker's own mirror.
    let checkout = env.dir.path().join("checkout");
    std::fs::create_dir_all(&checkout).unwrap();
    git(&checkout, &["init", "-q", "-b", "main"]);
    std::fs::write(checkout.join("README.md"), "# local\n").unwrap();
    git(&checkout, &["add", "."]);
    git(&checkout, &["commit", "-q", "-m", "initial"]);
    let repo = checkout.display().to_string();
    let front = env.in_process("front", &[], Role::FrontEnd).await;
    let holder = env.in_process("w-holder", &[], Role::Worker).await;
    let first = front
        .submit_pipeline(prompt_on(&repo, "sh", "echo \"one by $WORKER\" >> runs.txt"))
        .await
        .unwrap();
    assert!(first.pipeline.local_only);
    let done = crate::harness::finished(front.store(), &first.run.id).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.error);
    // Its worker stops; another runs. The follow-up waits for the holder, and says so.
    holder.shutdown().await;
    let other = env.in_process("w-other", &[], Role::Worker).await;
    let next = front
        .submit_follow_up(follow_up(&first.pipeline.id, "echo \"two by $WORKER\" >> runs.txt"))
        .await
        .unwrap();
    let why = waiting(&front, &next.run.id, "waiting for its worker").await;
    assert!(why.contains("worker w-holder"), "{why}");
    crate::harness::holds_for("the follow-up stays queued", Duration::from_secs(3), || async {
        front.store().run(&next.run.id).await.unwrap().unwrap().state == RunState::Queued
    })
    .await;
    // The holder comes back (the same home): the pipeline goes on there.
    let holder = env.in_process("w-holder", &[], Role::Worker).await;
    let done = crate::harness::finished(front.store(), &next.run.id).await;
    assert_eq!(done.state, RunState::Succeeded, "{:?}", done.error);
    let mirror = holder.mirror_path(&first.pipeline);
    assert_eq!(
        git(&mirror, &["show", &format!("{}:runs.txt", first.pipeline.branch)]),
        "one by w-holder\ntwo by w-holder"
    );
    for orch in [holder, other, front] {
        orch.shutdown().await;
    }
}

/// The front end that took a prompt keeps its status message from the start: another
/// one that sees the run first (through the database) does not post it. Its follow-ups
/// too; the other may take a run over only once the first is gone. A front end that
/// posts nothing on the thread's surface (a web-only `serve`) leaves it to one that does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_front_end_that_took_the_prompt_keeps_its_status_message() {
    let env = TestEnv::new();
    let f1 = env.in_process("f1", &[], Role::FrontEnd).await;
    let f2 = env.in_process("f2", &[], Role::FrontEnd).await;
    let web_only = env.in_process("web", &[], Role::FrontEnd).await;
    for f in [&f1, &f2] {
        f.posts_status_on("slack");
    }
    let origin = env.origin_url();
    let mut prompt = prompt_on(&origin, "sh", "true");
    prompt.origin.surface = "slack".into();
    prompt.origin.thread = "C1/1.0".into();
    let first = f1.submit_pipeline(prompt).await.unwrap();
    assert!(
        !f2.claim_status_message(&first.run.id).await.unwrap(),
        "f2 took f1's prompt's message"
    );
    assert!(f1.claim_status_message(&first.run.id).await.unwrap());
    let next = f2
        .submit_follow_up(follow_up(&first.pipeline.id, "true"))
        .await
        .unwrap();
    assert!(
        !f1.claim_status_message(&next.run.id).await.unwrap(),
        "f1 took f2's follow-up's message"
    );
    let retried = web_only
        .submit_follow_up(follow_up(&first.pipeline.id, "true"))
        .await
        .unwrap();
    assert!(
        f1.claim_status_message(&retried.run.id).await.unwrap(),
        "a web-only front end kept a Slack message"
    );
    // The poster gone, the other front end keeps its messages.
    f1.shutdown().await;
    assert!(f2.claim_status_message(&first.run.id).await.unwrap());
    for f in [f2, web_only] {
        f.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_front_end_keeps_each_status_message_and_another_takes_over_when_it_dies() {
    use threadline::bots::chat::testing::{CallKind, RecordingSurface};
    use threadline::bots::chat::{ChatCore, Message, Outcome, StatusUpdater};
    let mut env = TestEnv::new();
    // Front ends learn of the runs workers execute through PostgreSQL's notifications.
    if !env.config.database_url().starts_with("postgres") {
        return;
    }
    env.add_demo_repo();
    let bindings = crate::harness::one_channel("C1", "demo", &["U1"], &["U1"]);
    let worker = env.in_process("w", &[], Role::Worker).await;
    let mut fronts = Vec::new();
    for name in ["f1", "f2"] {
        let orch = env.in_process(name, &[], Role::FrontEnd).await;
        let core = ChatCore::new(orch.clone(), "slack", bindings.clone());
        let surface = std::sync::Arc::new(RecordingSurface::new("slack"));
        let stop = tokio_util::sync::CancellationToken::new();
        let updater = tokio::spawn(StatusUpdater::new(core.clone(), surface.clone()).run(stop.clone()));
        fronts.push((orch, core, surface, stop, updater));
    }
    let mention = |id: &str, text: &str| Message {
        channel: "C1".into(),
        thread: None,
        id: id.into(),
        sender: crate::harness::sender("U1"),
        text: format!("<@UBOT> {text}"),
        mentions_bot: true,
        attachments: Vec::new(),
        link: None,
    };
    // A prompt to the first front end: it alone posts and keeps the message, though
    // the second sees every change too.
    let first = match fronts[0].1.on_message(mention("1.0", "echo one > one.txt")).await {
        Outcome::Queued { submitted, .. } => submitted,
        other => panic!("{other:?}"),
    };
    crate::harness::finished(worker.store(), &first.run.id).await;
    let (f1, f2) = (fronts[0].2.clone(), fronts[1].2.clone());
    crate::harness::poll_until(
        "the end shown",
        || {
            f1.last_shown()
                .is_some_and(|c| c.terminal && c.state == RunState::Succeeded)
        },
        || format!("{:?}", f1.calls()),
    )
    .await;
    assert_eq!(f1.calls().iter().filter(|c| c.kind == CallKind::Post).count(), 1);
    // A second run; its front end dies while it runs: the other one finishes its message.
    let second = match fronts[0]
        .1
        .on_message(mention("2.0", "sleep 3; echo two > two.txt"))
        .await
    {
        Outcome::Queued { submitted, .. } => submitted,
        other => panic!("{other:?}"),
    };
    crate::harness::wait_for(worker.store(), &second.run.id, "running", |r| {
        r.state == RunState::Running
    })
    .await;
    crate::harness::poll_until(
        "the second run's message posted",
        || f1.calls().iter().filter(|c| c.kind == CallKind::Post).count() == 2,
        || format!("{:?}", f1.calls()),
    )
    .await;
    let (orch, _, _, stop, updater) = fronts.remove(0);
    stop.cancel();
    updater.await.unwrap();
    orch.shutdown().await;
    crate::harness::finished(worker.store(), &second.run.id).await;
    crate::harness::poll_until(
        "the second front end shows the end",
        || f2.last_shown().is_some_and(|c| c.terminal),
        || format!("{:?}", f2.calls()),
    )
    .await;
    let calls = f2.calls();
    assert!(
        calls
            .iter()
            .all(|c| c.kind == CallKind::Update(format!("msg-{}", second.run.id))),
        "the second front end only edits the second run's message, never posts: {calls:?}"
    );
    let (orch, _, _, stop, updater) = fronts.remove(0);
    stop.cancel();
    updater.await.unwrap();
    orch.shutdown().await;
    worker.shutdown().await;
}

/// On an engine workers share, the worker that took a run over starts its own container
/// of the run while the worker that lost it is still removing its one: the new one waits
/// for the name to be free and starts, and neither removal touches the other's container.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_run_starts_its_container_while_the_lost_one_is_removed() {
    use threadline::orchestrator::ContainerRuntime;
    use threadline::orchestrator::container::{AgentSpec, ContainerStatus, LABEL_WORKER, Whose};
    crate::harness::ensure_image();
    let runtime = ContainerRuntime::connect().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("threadline-test-takeover-{}", uuid::Uuid::new_v4().simple());
    let spec = |worker: &str| AgentSpec {
        name: name.clone(),
        image: crate::harness::IMAGE.into(),
        // sh as PID 1 ignores SIGTERM: each stop lasts its whole grace.
        argv: vec!["sh".into(), "-c".into(), "sleep 30".into()],
        env: Vec::new(),
        user: "1000:1000".into(),
        workspace: dir.path().to_owned(),
        workspace_read_only: true,
        context: dir.path().to_owned(),
        state: None,
        objects: None,
        labels: HashMap::from([(LABEL_WORKER.to_owned(), worker.to_owned())]),
        memory_bytes: 64 << 20,
        nano_cpus: 500_000_000,
        pids_limit: 16,
        network: "none".into(),
        dns: Vec::new(),
        volumes: Vec::new(),
        read_only_rootfs: true,
        log_file_bytes: 1 << 16,
    };
    for round in 0..4 {
        let old = runtime.start_agent(&spec("wa")).await.unwrap();
        // wa lets the run go (its own container) as wb starts the run again.
        let again = spec("wb");
        let (let_go, started) = tokio::join!(
            runtime.remove_run_container(&name, Whose::Own("wa"), Duration::from_secs(1)),
            runtime.start_agent(&again),
        );
        let_go.unwrap();
        let new = started.unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_ne!(old, new, "round {round}: the lost worker's container was used");
        assert_eq!(runtime.status(&old).await.unwrap(), None, "round {round}");
        assert_eq!(
            runtime.status(&new).await.unwrap(),
            Some(ContainerStatus::Running),
            "round {round}"
        );
        // wa, late, lets go again: wb's container is not its own and stays.
        assert!(
            !runtime
                .remove_run_container(&name, Whose::Own("wa"), Duration::from_secs(1))
                .await
                .unwrap()
        );
        assert_eq!(
            runtime.status(&new).await.unwrap(),
            Some(ContainerStatus::Running),
            "round {round}"
        );
        runtime.remove(&new).await.unwrap();
        assert_eq!(runtime.status(&new).await.unwrap(), None);
    }
}
