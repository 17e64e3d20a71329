//! The store under concurrent writers, as two processes sharing one SQLite file are.

use threadline::model::{Pipeline, RunState};
use threadline::store::{NewRun, Store};

fn pipeline(id: &str) -> Pipeline {
    crate::harness::pipeline_on(id, "/r")
}

fn new_run(key: Option<String>) -> NewRun {
    NewRun {
        prompt: "p".into(),
        agent: "sh".into(),
        requested_by: "t".into(),
        idempotency_key: key,
        mode: Default::default(),
        attachments: Vec::new(),
        forge_request: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_neither_fail_nor_double_up() {
    let dir = tempfile::tempdir().unwrap();
    // On PostgreSQL too when the suite runs there (writers run concurrently there).
    let url = crate::harness::test_database()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()));
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

    // Claims from both stores at once: never more than the limit, never a run twice.
    let mut claims = Vec::new();
    for i in 0..10 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        claims.push(tokio::spawn(async move {
            store.claim_next(&format!("owner-{i}"), 2, None).await
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
    orch.shutdown().await;
    let source = env.config.database_url();

    // Into PostgreSQL when the suite has a server, else into another SQLite file.
    let dir = tempfile::tempdir().unwrap();
    let destination = crate::harness::test_database()
        .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", dir.path().join("moved.db").display()));
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
            store.on_run_changes(|| {}, tokio_util::sync::CancellationToken::new()),
        )
        .await;
        assert!(returned.is_ok());
        return;
    };
    let (listening, other) = (Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap());
    let (tx, mut woken) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            listening
                .on_run_changes(
                    move || {
                        let _ = tx.send(());
                    },
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
    stop.cancel();
    task.await.unwrap();
}

/// A TCP forwarder the test can cut: every connection through it dropped, and new ones
/// refused, until healed. A network partition between Threadline and its database.
struct Cuttable {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl Cuttable {
    async fn start(target: std::net::SocketAddr) -> Cuttable {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (generation, _) = tokio::sync::watch::channel(0u64);
        let (is_cut, cuts) = (cut.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let mut cuts = cuts.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cuts.changed() => {} // the partition: both ends dropped
                    }
                });
            }
        });
        Cuttable { addr, cut, generation }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn heal(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_survives_losing_its_database_for_a_while() {
    // On PostgreSQL (a server over the network); SQLite is a local file.
    let Some(url) = crate::harness::test_database() else {
        return;
    };
    let rest = url.split_once("@").unwrap().1;
    let (host_port, db) = rest.split_once('/').unwrap();
    let target: std::net::SocketAddr = tokio::net::lookup_host(host_port).await.unwrap().next().unwrap();
    let proxy = Cuttable::start(target).await;
    let mut env = crate::harness::TestEnv::new();
    env.config.database_url = format!("{}@{}/{db}", url.split_once('@').unwrap().0, proxy.addr);
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
