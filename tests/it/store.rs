//! The store under concurrent writers, as two processes sharing one SQLite file are.

use threadline::model::{Pipeline, RunState};
use threadline::store::{Claimer, NewRun, Store};

fn pipeline(id: &str) -> Pipeline {
    crate::harness::pipeline_on(id, "/r")
}

fn new_run(key: Option<String>) -> NewRun {
    crate::harness::new_run("p", key)
}

/// The suite's PostgreSQL database when it runs there, else a SQLite file `name` in `dir`.
fn database_in(dir: &std::path::Path, name: &str) -> String {
    crate::harness::test_database().unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.join(name).display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_neither_fail_nor_double_up() {
    let dir = tempfile::tempdir().unwrap();
    // On PostgreSQL too when the suite runs there (writers run concurrently there).
    let url = database_in(dir.path(), "t.db");
    let a = Store::open(&url).await.unwrap();
    let b = Store::open(&url).await.unwrap();
    for p in ["p1", "p2", "p3"] {
        a.insert_pipeline(&pipeline(p), &new_run(None)).await.unwrap();
    }
    // 60 follow-ups from two "processes" at once, every third one delivered twice.
    let mut tasks = Vec::new();
    for i in 0..60 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let p = ["p1", "p2", "p3"][i % 3];
        tasks.push(tokio::spawn(async move {
            let key = Some(format!("evt-{}", i - i % 3 * usize::from(i % 3 == 2)));
            store.insert_run(p, &new_run(key)).await.map(|ins| ins.created)
        }));
    }
    let mut created = 0;
    for t in tasks {
        created += t.await.unwrap().expect("no writer fails") as usize;
    }
    let mut total = 0;
    for p in ["p1", "p2", "p3"] {
        let runs = a.runs(p).await.unwrap();
        let seqs: Vec<i64> = runs.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (1..=runs.len() as i64).collect::<Vec<_>>(),
            "gapless, unique sequence in {p}"
        );
        total += runs.len() - 1;
    }
    assert_eq!(total, created, "one run per distinct key");

    // One worker's claims from both stores at once: never more than its limit, never a
    // run twice.
    let mut claims = Vec::new();
    for i in 0..10 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        claims.push(tokio::spawn(async move {
            let claimer = Claimer {
                instance: "worker",
                worker_id: "home",
                labels: &[],
                limit: 2,
            };
            store.claim_next(&claimer, None).await
        }));
    }
    let mut claimed = Vec::new();
    for c in claims {
        if let Some(run) = c.await.unwrap().unwrap() {
            claimed.push(run.id);
        }
    }
    assert_eq!(claimed.len(), 2, "the limit of 2 holds across writers: {claimed:?}");
    assert_ne!(claimed[0], claimed[1]);
    let active = a.runs_in_states(&RunState::ACTIVE).await.unwrap();
    assert_eq!(active.len(), 2);
    let pipelines: std::collections::HashSet<_> = active.iter().map(|r| r.pipeline_id.clone()).collect();
    assert_eq!(pipelines.len(), 2, "one run per pipeline");

    // Ten workers claiming at once, round after round, until the queue is empty: never
    // two runs of one pipeline at once, every run claimed exactly once, in its order.
    let mut ended = active.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
    for run in &active {
        finish(&a, "worker", &run.id).await;
    }
    let queued = a.runs_in_states(&[RunState::Queued]).await.unwrap().len();
    let mut rounds = 0;
    loop {
        let mut claims = Vec::new();
        for i in 0..10 {
            let store = if i % 2 == 0 { a.clone() } else { b.clone() };
            claims.push(tokio::spawn(async move {
                let (instance, home) = (format!("w{i}"), format!("home{i}"));
                let claimer = Claimer {
                    instance: &instance,
                    worker_id: &home,
                    labels: &[],
                    limit: 5,
                };
                let run = store.claim_next(&claimer, None).await.unwrap();
                run.map(|r| (instance.clone(), r))
            }));
        }
        let mut round = Vec::new();
        for c in claims {
            round.extend(c.await.unwrap());
        }
        if round.is_empty() {
            break;
        }
        let active = a.runs_in_states(&RunState::ACTIVE).await.unwrap();
        let pipelines: std::collections::HashSet<_> = active.iter().map(|r| r.pipeline_id.clone()).collect();
        assert_eq!(pipelines.len(), active.len(), "one active run per pipeline: {active:?}");
        for (instance, run) in &round {
            let older = a.runs(&run.pipeline_id).await.unwrap();
            assert!(
                older.iter().all(|o| o.seq >= run.seq || o.state.is_terminal()),
                "{} claimed before an older run of its pipeline",
                run.id
            );
            finish(&a, instance, &run.id).await;
            ended.push(run.id.clone());
        }
        rounds += 1;
        assert!(rounds < 200, "the queue drains");
    }
    assert!(a.runs_in_states(&[RunState::Queued]).await.unwrap().is_empty());
    let distinct: std::collections::HashSet<_> = ended.iter().collect();
    assert_eq!(distinct.len(), ended.len(), "no run claimed twice");
    assert_eq!(ended.len(), queued + 2, "every run claimed");
}

/// Ends a claimed run as its executor would.
async fn finish(store: &Store, owner: &str, run_id: &str) {
    store
        .transition_owned(owner, run_id, RunState::Preparing, RunState::Saving, "")
        .await
        .unwrap();
    store
        .transition_owned(owner, run_id, RunState::Saving, RunState::Succeeded, "")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_store_copies_an_installation_into_an_empty_database() {
    // A SQLite installation with a finished pipeline, its pull request and an approval.
    let mut env = crate::harness::TestEnv::new();
    env.config.database_url = String::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "echo one > one.txt").await;
    crate::harness::finished(orch.store(), &sub.run.id).await;
    let store = orch.store().clone();
    store
        .set_pull_request(&threadline::model::PullRequestRecord {
            pipeline_id: sub.pipeline.id.clone(),
            forge: "github".into(),
            number: 7,
            url: "https://forge.example/pull/7".into(),
            found: false,
            opened_by: "slack:U1".into(),
            created_at: 1,
            state: "open".into(),
            state_at: None,
            state_by: None,
        })
        .await
        .unwrap();
    // An uploaded file, kept as bytes, with NUL and high bytes in it.
    let upload: Vec<u8> = (0..=255u8).chain([0, 0, 255]).collect();
    store.put_upload("batch/data.bin", &upload).await.unwrap();
    orch.shutdown().await;
    let source = env.config.database_url();

    // Into PostgreSQL when the suite has a server, else into another SQLite file.
    let dir = tempfile::tempdir().unwrap();
    let destination = database_in(dir.path(), "moved.db");
    let config = crate::harness::write_cli_config(&env, "");
    let out = crate::harness::cli(&config, &["migrate-store", "--from", &source, "--to", &destination])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{said}{}", String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("runs"), "{said}");
    assert!(!said.contains(":postgres@"), "the password is shown: {said}");

    let (before, after) = (
        Store::open(&source).await.unwrap(),
        Store::open(&destination).await.unwrap(),
    );
    // Field for field (their Debug forms: runs hold floats).
    let same = |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| assert_eq!(format!("{a:?}"), format!("{b:?}"));
    let (runs, events) = (
        before.runs(&sub.pipeline.id).await.unwrap(),
        before.events(&sub.run.id).await.unwrap(),
    );
    assert!(runs.len() == 1 && events.len() >= 4, "{runs:?} {events:?}");
    same(&after.runs(&sub.pipeline.id).await.unwrap(), &runs);
    same(&after.events(&sub.run.id).await.unwrap(), &events);
    assert_eq!(after.pull_request(&sub.pipeline.id).await.unwrap().unwrap().number, 7);
    assert_eq!(after.upload("batch/data.bin").await.unwrap(), Some(upload));
    same(
        &after.pipeline(&sub.pipeline.id).await.unwrap(),
        &before.pipeline(&sub.pipeline.id).await.unwrap(),
    );
    // The moved store takes new work (its sequences continue), and a second copy into
    // it is refused.
    after.insert_run(&sub.pipeline.id, &new_run(None)).await.unwrap();
    after
        .transition(
            &format!("{}-2", sub.pipeline.id),
            RunState::Queued,
            RunState::Cancelled,
            "moved",
        )
        .await
        .unwrap();
    let again = crate::harness::cli(&config, &["migrate-store", "--from", &source, "--to", &destination])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds 1 pipeline"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_tells_every_process_when_runs_are_queued() {
    let Some(url) = crate::harness::test_database() else {
        // SQLite has no notifications: the listener returns at once (the scheduler polls).
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()))
            .await
            .unwrap();
        let returned = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            store.on_run_changes(|| {}, None, tokio_util::sync::CancellationToken::new()),
        )
        .await;
        assert!(returned.is_ok());
        return;
    };
    let (listening, other) = (Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap());
    let (tx, mut woken) = tokio::sync::mpsc::unbounded_channel();
    let (updates_tx, mut updates) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            listening
                .on_run_changes(
                    move || {
                        let _ = tx.send(());
                    },
                    Some(Box::new(move |run_id| {
                        let _ = updates_tx.send(run_id);
                    })),
                    stop,
                )
                .await
        }
    });
    async fn wait(woken: &mut tokio::sync::mpsc::UnboundedReceiver<()>) -> Option<()> {
        tokio::time::timeout(std::time::Duration::from_secs(10), woken.recv())
            .await
            .ok()
            .flatten()
    }
    assert!(wait(&mut woken).await.is_some(), "the first wake, once listening");
    // Another process queues a run: this one is told.
    other.insert_pipeline(&pipeline("n1"), &new_run(None)).await.unwrap();
    assert!(wait(&mut woken).await.is_some(), "not told of the new run");
    // And when a run ends.
    other
        .transition("n1-1", RunState::Queued, RunState::Cancelled, "test")
        .await
        .unwrap();
    assert!(wait(&mut woken).await.is_some(), "not told of the ended run");
    // A front end is told which run changed, so it shows a run another process executes.
    let told = tokio::time::timeout(std::time::Duration::from_secs(10), updates.recv()).await;
    assert_eq!(
        told.ok().flatten().as_deref(),
        Some("n1-1"),
        "the change is told with the run's id"
    );
    stop.cancel();
    task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_losing_its_database_for_a_while() {
    // On PostgreSQL (a server over the network); SQLite is a local file.
    let Some(url) = crate::harness::test_database() else {
        return;
    };
    let (proxy, through) = crate::harness::cuttable_database(&url).await;
    let mut env = crate::harness::TestEnv::new();
    env.config.database_url = through;
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "sleep 4; echo survived > s.txt").await;
    crate::harness::wait_for(orch.store(), &sub.run.id, "running", |r| r.state == RunState::Running).await;
    // Cut off while the agent works, and past its end; then healed.
    proxy.cut();
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    proxy.heal();
    let run = crate::harness::finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(run.pushed);
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "s.txt").as_deref(),
        Some("survived\n")
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_ran_out_is_not_renewed_but_taken_again() {
    use threadline::store::{LEASE_MILLIS, NewInstance};
    let dir = tempfile::tempdir().unwrap();
    let url = database_in(dir.path(), "t.db");
    let store = Store::open(&url).await.unwrap();
    let me = NewInstance {
        id: format!("lease-{}", std::process::id()),
        worker_id: "home".into(),
        worker_name: "w".into(),
        hostname: "h".into(),
        pid: 1,
        labels: vec![],
    };
    store.register_instance(&me).await.unwrap();
    assert!(store.heartbeat(&me).await.unwrap(), "a live lease is renewed");
    // Silent past its length (cut off, or paused): what it fenced is void, so the
    // renewal says so; the lease is taken again from now.
    tokio::time::sleep(std::time::Duration::from_millis(LEASE_MILLIS as u64 + 500)).await;
    assert!(
        !store.heartbeat(&me).await.unwrap(),
        "an expired lease is not silently renewed"
    );
    let silent =
        |all: Vec<threadline::store::InstanceInfo>| all.into_iter().find(|i| i.id == me.id).map(|i| i.silent_ms);
    let taken_again = silent(store.instances().await.unwrap()).expect("registered again");
    assert!(taken_again < LEASE_MILLIS / 2, "{taken_again} ms");
    assert!(store.heartbeat(&me).await.unwrap(), "and renewed as usual after");
    store.remove_instance(&me.id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_started_again_forgets_its_lost_attempt_but_only_by_its_owner() {
    use threadline::store::RunPatch;
    let dir = tempfile::tempdir().unwrap();
    let url = database_in(dir.path(), "t.db");
    let store = Store::open(&url).await.unwrap();
    let id = format!("forget-{}", std::process::id());
    let run = store.insert_pipeline(&pipeline(&id), &new_run(None)).await.unwrap();
    let run_id = run.run.id;
    let claimer = Claimer {
        instance: "taker",
        worker_id: "home",
        labels: &[],
        limit: 1,
    };
    let claimed = store.claim_next(&claimer, Some(&id)).await.unwrap().expect("claimed");
    assert_eq!(claimed.id, run_id);
    let lost = RunPatch {
        exit_code: Some(3),
        error: Some("the lost attempt's error".into()),
        head_commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        pushed: Some(true),
        summary: Some("the lost attempt's summary".into()),
        ..Default::default()
    };
    store.update_run_owned("taker", &run_id, &lost).await.unwrap();

    let other = store.forget_attempt(&run_id, "someone-else").await;
    assert!(
        matches!(other, Err(threadline::store::StoreError::LeaseLost { .. })),
        "{other:?}"
    );
    assert_eq!(store.run(&run_id).await.unwrap().unwrap().exit_code, Some(3), "fenced");

    store.forget_attempt(&run_id, "taker").await.unwrap();
    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(
        (run.exit_code, run.error, run.head_commit, run.pushed, run.summary),
        (None, None, None, false, None)
    );
}
