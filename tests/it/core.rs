//! The core issue's stories: runs in real containers, their work saved to real git.

use std::process::{Command, Stdio};
use std::time::Duration;

use threadline::config::{Config, Secret};
use threadline::model::{EndReason, Origin, RunState};
use threadline::orchestrator::{NewPipeline, SubmitError};
use threadline::store::Store;

use crate::harness::{TestEnv, finished, follow_up, git, wait_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_pushes_a_branch_with_the_agents_change() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env
        .start(
            &orch,
            "echo hello > hello.txt\necho junk > scratch.tmp\nmkdir -p .threadline\necho 'wrote hello.txt' > .threadline/summary.md\necho done",
        )
        .await;
    assert!(sub.created);
    assert!(
        sub.pipeline.branch.starts_with("threadline/echo-hello-hello-txt"),
        "{}",
        sub.pipeline.branch
    );

    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert_eq!(run.exit_code, Some(0));
    assert!(run.changed && run.pushed);
    assert_eq!(
        run.diffstat.as_ref().unwrap().files_changed,
        1,
        "only hello.txt: .gitignore and .threadline are respected"
    );
    assert_eq!(run.summary.as_deref(), Some("wrote hello.txt"));
    assert!(run.log_tail.contains("done"), "log tail: {:?}", run.log_tail);

    let branch = &sub.pipeline.branch;
    assert_eq!(env.origin_file(branch, "hello.txt").as_deref(), Some("hello\n"));
    assert_eq!(env.origin_file(branch, "scratch.tmp"), None);
    assert_eq!(env.origin_file(branch, ".threadline/summary.md"), None);
    assert_eq!(env.origin_head(branch), run.head_commit);
    let message = env.origin_message(branch);
    assert!(
        message.contains(&format!("Threadline-Pipeline: {}", sub.pipeline.id)),
        "{message}"
    );
    assert!(message.contains(&format!("Threadline-Run: {}", run.id)), "{message}");
    // The base branch is untouched.
    assert_eq!(env.origin_file("main", "hello.txt"), None);

    let states: Vec<RunState> = orch
        .store()
        .events(&run.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(
        states,
        [
            RunState::Queued,
            RunState::Preparing,
            RunState::Running,
            RunState::Saving,
            RunState::Succeeded
        ]
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_builds_on_the_last_commit_and_sees_the_history() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let first = env.start(&orch, "echo one > a.txt").await;
    let second = orch
        .submit_follow_up(follow_up(
            &first.pipeline.id,
            "cat a.txt > b.txt\ncp /threadline/history.md history.txt",
        ))
        .await
        .unwrap();
    assert_eq!(second.ahead, 1, "queued behind the first run");

    let r1 = finished(orch.store(), &first.run.id).await;
    let r2 = finished(orch.store(), &second.run.id).await;
    assert_eq!(r2.state, RunState::Succeeded, "{:?}", r2.error);
    assert_eq!(
        r2.start_commit, r1.head_commit,
        "the follow-up starts where the first run ended"
    );
    let branch = &first.pipeline.branch;
    assert_eq!(env.origin_file(branch, "b.txt").as_deref(), Some("one\n"));
    let history = env.origin_file(branch, "history.txt").unwrap();
    assert!(
        history.contains("echo one > a.txt") && history.contains("succeeded"),
        "{history}"
    );
    assert!(history.contains(r1.head_commit.as_deref().unwrap()), "{history}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_agents_work_is_still_committed_and_pushed() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "echo partial > p.txt\nexit 3").await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(run.exit_code, Some(3));
    assert!(
        run.error.as_deref().unwrap().contains("exited with code 3"),
        "{:?}",
        run.error
    );
    assert!(run.pushed);
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "p.txt").as_deref(),
        Some("partial\n")
    );
    assert!(
        env.origin_message(&sub.pipeline.branch)
            .contains("Threadline-Outcome: exited 3")
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_kills_the_container_and_commits_the_partial_work() {
    let mut env = TestEnv::new();
    env.agent_mut().timeout_secs = 2;
    let orch = env.orchestrator().await;
    let sub = env
        .start(&orch, "echo before > t.txt\nsleep 60\necho after > t2.txt")
        .await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::TimedOut);
    assert_eq!(run.end_reason, Some(EndReason::TimedOut));
    assert!(
        run.duration_millis().unwrap() < 30_000,
        "stopped long before the agent's sleep ended"
    );
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "t.txt").as_deref(),
        Some("before\n")
    );
    assert_eq!(env.origin_file(&sub.pipeline.branch, "t2.txt"), None);
    assert!(
        docker_inspect(&format!("threadline-run-{}", run.id)).is_none(),
        "container removed"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_while_queued_and_while_running() {
    let mut env = TestEnv::new();
    env.config.max_concurrent_runs = 1;
    let orch = env.orchestrator().await;
    let running = env.start(&orch, "echo x > x.txt\nsleep 60").await;
    let queued = env.start(&orch, "echo never > never.txt").await;
    wait_for(orch.store(), &running.run.id, "running", |r| {
        r.state == RunState::Running
    })
    .await;
    // The agent has written its file before it is cancelled.
    let x = orch.workspace_path(&running.pipeline.id).join("x.txt");
    crate::harness::poll_until("the agent's x.txt", || x.exists(), || format!("{}", x.display())).await;

    let c = orch.cancel(&queued.pipeline.id).await.unwrap();
    assert_eq!(c.dequeued, std::slice::from_ref(&queued.run.id));
    let q = orch.store().run(&queued.run.id).await.unwrap().unwrap();
    assert_eq!(q.state, RunState::Cancelled);
    assert!(q.start_commit.is_none(), "a cancelled queued run never started");

    let c = orch.cancel(&running.run.id).await.unwrap();
    assert_eq!(c.stopping, std::slice::from_ref(&running.run.id));
    let r = finished(orch.store(), &running.run.id).await;
    assert_eq!(r.state, RunState::Cancelled);
    assert!(r.duration_millis().unwrap() < 30_000);
    assert_eq!(
        env.origin_file(&running.pipeline.branch, "x.txt").as_deref(),
        Some("x\n"),
        "the cancelled run's work is pushed: {:?}",
        (&r.error, &r.push_error, r.pushed, &r.head_commit, &r.summary)
    );
    assert!(env.origin_head(&queued.pipeline.branch).is_none());
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_container_is_hardened_and_holds_no_host_credential() {
    let mut env = TestEnv::new();
    env.config.git.token = Secret::new("ghp_host_token_0123456789");
    env.agent_mut().env_set.insert("VISIBLE".into(), "plain".into());
    let orch = env.orchestrator().await;
    let script = r#"
{
  echo "uid=$(id -u)"
  env | sort
  touch /etc/evil 2>/dev/null && echo "wrote /etc" || echo "etc read-only"
  touch /threadline/evil 2>/dev/null && echo "wrote context" || echo "context read-only"
  touch /evil 2>/dev/null && echo "wrote root" || echo "root read-only"
  ls /var/run/docker.sock 2>/dev/null && echo "docker socket!" || echo "no docker socket"
  grep CapEff /proc/self/status
  grep NoNewPrivs /proc/self/status
  ls /threadline
} > probe.txt 2>&1
sleep 4
"#;
    let sub = env.start(&orch, script).await;
    let running = wait_for(orch.store(), &sub.run.id, "running", |r| r.state == RunState::Running).await;
    let inspect = docker_inspect(running.container_id.as_deref().unwrap()).expect("container exists while running");
    let hc = &inspect["HostConfig"];
    assert_eq!(hc["CapDrop"], serde_json::json!(["ALL"]));
    assert!(
        hc["SecurityOpt"].to_string().contains("no-new-privileges"),
        "{}",
        hc["SecurityOpt"]
    );
    assert_eq!(hc["PidsLimit"], 64);
    assert_eq!(hc["Memory"], 256 * 1024 * 1024);
    assert_eq!(hc["NanoCpus"], 1_000_000_000i64);
    assert_eq!(hc["ReadonlyRootfs"], true);
    assert_eq!(hc["Privileged"], false);
    assert_eq!(hc["NetworkMode"], "none");
    let user = inspect["Config"]["User"].as_str().unwrap();
    assert!(
        !user.is_empty() && !user.starts_with("0:") && user != "root",
        "user {user}"
    );
    assert_eq!(inspect["Config"]["Labels"]["threadline.run"], running.id.as_str());
    let mounts = inspect["Mounts"].as_array().unwrap();
    let mut targets: Vec<(String, bool)> = mounts
        .iter()
        .map(|m| {
            (
                m["Destination"].as_str().unwrap().to_owned(),
                m["RW"].as_bool().unwrap(),
            )
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        [
            ("/threadline".to_owned(), false),
            ("/threadline/objects".to_owned(), false),
            ("/workspace".to_owned(), true)
        ],
        "only the workspace, the context and the pipeline's objects (read-only)"
    );

    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let probe = env.origin_file(&sub.pipeline.branch, "probe.txt").unwrap();
    assert!(
        !probe.contains("ghp_host_token"),
        "the git token reached the container:\n{probe}"
    );
    assert!(!probe.contains("uid=0"), "{probe}");
    for expected in [
        "etc read-only",
        "context read-only",
        "root read-only",
        "no docker socket",
        "CapEff:\t0000000000000000",
        "NoNewPrivs:\t1",
        "VISIBLE=plain",
        "THREADLINE_PROMPT_FILE=/threadline/prompt.md",
        "history.md",
    ] {
        assert!(probe.contains(expected), "missing {expected:?} in:\n{probe}");
    }
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_redacted_from_logs() {
    let mut env = TestEnv::new();
    env.config.git.token = Secret::new("tok-abcdef-123456");
    let orch = env.orchestrator().await;
    // The prompt carries the secret only so the agent can print it: logs must not.
    let sub = env
        .start(&orch, "echo the token is tok-abcdef-123456\necho x > x.txt\nexit 1")
        .await;
    assert!(!sub.pipeline.branch.contains("tok-abcdef"), "{}", sub.pipeline.branch);
    assert!(!sub.pipeline.title.contains("tok-abcdef"), "{}", sub.pipeline.title);
    let run = finished(orch.store(), &sub.run.id).await;
    assert!(run.log_tail.contains("the token is [REDACTED]"), "{}", run.log_tail);
    let file = std::fs::read_to_string(orch.log_path(&run.id)).unwrap();
    assert!(
        !file.contains("tok-abcdef-123456") && file.contains("[REDACTED]"),
        "{file}"
    );
    let msg = env.origin_message(&sub.pipeline.branch);
    assert!(!msg.contains("tok-abcdef-123456"), "{msg}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_pipelines_run_at_once_within_the_limit() {
    let mut env = TestEnv::new();
    env.config.max_concurrent_runs = 2;
    let orch = env.orchestrator().await;
    let mut ids = Vec::new();
    // Each run lasts long enough that the next one's claim, however loaded the machine
    // (the whole suite runs at once), comes while it still runs.
    for i in 0..4 {
        ids.push(env.start(&orch, &format!("sleep 4\necho {i} > n.txt")).await);
    }
    let mut spans = Vec::new();
    for sub in &ids {
        let run = finished(orch.store(), &sub.run.id).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
        let events = orch.store().events(&run.id).await.unwrap();
        let start = events.iter().find(|e| e.state == RunState::Preparing).unwrap().at;
        let end = events.last().unwrap().at;
        spans.push((start, end));
    }
    // The most runs active at any instant: at a start, count the spans that cover it.
    let most = spans
        .iter()
        .map(|(s, _)| spans.iter().filter(|(a, b)| a <= s && s < b).count())
        .max()
        .unwrap();
    assert_eq!(most, 2, "limit 2 held and used: {spans:?}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diverged_remote_branch_stops_the_run_and_overwrites_nothing() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let first = env.start(&orch, "echo mine > mine.txt").await;
    finished(orch.store(), &first.run.id).await;
    let branch = first.pipeline.branch.clone();

    // Someone pushes on top of our branch: the next run fast-forwards to it.
    let other = env.dir.path().join("other");
    git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), other.to_str().unwrap()],
    );
    git(&other, &["checkout", "-q", &branch]);
    std::fs::write(other.join("theirs.txt"), "theirs\n").unwrap();
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "a human commit"]);
    git(&other, &["push", "-q", "origin", &branch]);
    let ff = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "cat theirs.txt > seen.txt"))
        .await
        .unwrap();
    let ff = finished(orch.store(), &ff.run.id).await;
    assert_eq!(ff.state, RunState::Succeeded, "{:?}", ff.error);
    assert_eq!(env.origin_file(&branch, "seen.txt").as_deref(), Some("theirs\n"));

    // Now someone rewrites the branch: the workspace and the remote have diverged.
    git(&other, &["fetch", "-q"]);
    git(&other, &["reset", "-q", "--hard", "main"]);
    std::fs::write(other.join("rewrite.txt"), "rewritten\n").unwrap();
    git(&other, &["add", "."]);
    git(&other, &["commit", "-q", "-m", "rewrite"]);
    git(&other, &["push", "-q", "--force", "origin", &branch]);
    let remote_before = env.origin_head(&branch);
    let ws = orch.workspace_path(&first.pipeline.id);
    let ws_before = git(&ws, &["rev-parse", "HEAD"]);

    let div = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "echo lost > lost.txt"))
        .await
        .unwrap();
    let div = finished(orch.store(), &div.run.id).await;
    assert_eq!(div.state, RunState::Failed);
    let error = div.error.unwrap();
    assert!(
        error.contains("nothing was changed") && error.contains(&branch),
        "{error}"
    );
    assert_eq!(
        env.origin_head(&branch),
        remote_before,
        "the remote branch is untouched"
    );
    assert_eq!(
        git(&ws, &["rev-parse", "HEAD"]),
        ws_before,
        "the workspace is untouched"
    );
    assert!(!ws.join("lost.txt").exists(), "the agent never ran");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_with_no_change_says_so_and_makes_no_commit() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "echo looking around; ls").await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert!(!run.changed);
    assert_eq!(run.diffstat.unwrap().files_changed, 0);
    assert_eq!(run.head_commit, run.start_commit, "no empty commit");
    assert!(
        env.origin_head(&sub.pipeline.branch).is_none(),
        "a branch identical to its base is not pushed"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_checkout_is_never_modified() {
    let env = TestEnv::new();
    // A checkout with an origin pushes there; one without keeps the branch in the mirror.
    let with_origin = env.dir.path().join("checkout");
    git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), with_origin.to_str().unwrap()],
    );
    let lonely = env.dir.path().join("lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    git(&lonely, &["init", "-q", "-b", "main"]);
    std::fs::write(lonely.join("f.txt"), "x\n").unwrap();
    git(&lonely, &["add", "."]);
    git(&lonely, &["commit", "-q", "-m", "init"]);
    let snapshot = |dir: &std::path::Path| {
        (
            git(dir, &["for-each-ref"]),
            git(dir, &["status", "--porcelain", "--ignored"]),
            git(dir, &["rev-parse", "HEAD"]),
        )
    };
    let (before_a, before_b) = (snapshot(&with_origin), snapshot(&lonely));

    let orch = env.orchestrator().await;
    for (repo, local_only) in [(&with_origin, false), (&lonely, true)] {
        let sub = orch
            .submit_pipeline(NewPipeline {
                repo: repo.display().to_string(),
                base_branch: None,
                agent: None,
                prompt: "echo new > new.txt".into(),
                requested_by: "tester".into(),
                origin: Origin::cli(),
                idempotency_key: None,
                mode: Default::default(),
                attachments: Vec::new(),
            })
            .await
            .unwrap();
        assert_eq!(sub.pipeline.local_only, local_only);
        let run = finished(orch.store(), &sub.run.id).await;
        assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
        assert!(run.pushed);
        if !local_only {
            assert_eq!(
                env.origin_file(&sub.pipeline.branch, "new.txt").as_deref(),
                Some("new\n")
            );
        }
    }
    assert_eq!(snapshot(&with_origin), before_a);
    assert_eq!(snapshot(&lonely), before_b);
    assert!(!with_origin.join("new.txt").exists() && !lonely.join("new.txt").exists());
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_redeliveries_start_nothing() {
    let mut env = TestEnv::new();
    env.config.agents.insert(
        "ghost".into(),
        threadline::config::AgentProfile {
            image: "threadline/agent-ghost:latest".into(),
            ..crate::harness::sh_agent()
        },
    );
    let orch = env.orchestrator().await;
    let req = |prompt: &str, agent: Option<&str>, key: Option<&str>| NewPipeline {
        repo: env.origin_url(),
        base_branch: None,
        agent: agent.map(str::to_owned),
        prompt: prompt.into(),
        requested_by: "tester".into(),
        origin: Origin::cli(),
        idempotency_key: key.map(str::to_owned),
        mode: Default::default(),
        attachments: Vec::new(),
    };
    assert!(matches!(
        orch.submit_pipeline(req("  ", None, None)).await,
        Err(SubmitError::EmptyPrompt)
    ));
    let long = "x".repeat(env.config.max_prompt_bytes + 1);
    assert!(matches!(
        orch.submit_pipeline(req(&long, None, None)).await,
        Err(SubmitError::PromptTooLong { .. })
    ));
    let err = orch
        .submit_pipeline(req("hi", Some("nope"), None))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope") && err.contains("ghost, sh"), "{err}");
    let err = orch
        .submit_pipeline(NewPipeline {
            repo: "/no/such/repo".into(),
            ..req("hi", None, None)
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("/no/such/repo"), "{err}");

    // The same request twice: one run.
    let a = orch
        .submit_pipeline(req("echo once >> once.txt", None, Some("evt-1")))
        .await
        .unwrap();
    let b = orch
        .submit_pipeline(req("echo once >> once.txt", None, Some("evt-1")))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    assert_eq!(a.run.id, b.run.id);
    assert_eq!(orch.store().pipelines(100).await.unwrap().len(), 1);
    finished(orch.store(), &a.run.id).await;

    // A missing image fails the run with the image's name and how to build it.
    let ghost = orch.submit_pipeline(req("true", Some("ghost"), None)).await.unwrap();
    let run = finished(orch.store(), &ghost.run.id).await;
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains("threadline/agent-ghost:latest") && error.contains("docker build"),
        "{error}"
    );

    // A missing base branch names the branches there are.
    let nobase = orch
        .submit_pipeline(NewPipeline {
            base_branch: Some("develop".into()),
            ..req("true", None, None)
        })
        .await
        .unwrap();
    let run = finished(orch.store(), &nobase.run.id).await;
    let error = run.error.unwrap();
    assert!(error.contains("develop") && error.contains("main"), "{error}");
    orch.shutdown().await;
}

#[test]
fn a_bad_config_names_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("threadline.toml");
    std::fs::write(&path, "max_concurrent_runs = 0\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(
        err.contains("max_concurrent_runs") && err.contains("threadline.toml"),
        "{err}"
    );

    std::fs::write(&path, "max_concurent_runs = 3\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(
        err.contains("max_concurent_runs") && err.contains("threadline.toml"),
        "{err}"
    );

    std::fs::write(&path, "[agents.x]\nimage = \"i\"\nargv = [\"a\"]\ncpus = \"many\"\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(err.contains("cpus") && err.contains("threadline.toml"), "{err}");

    let err = Config::load(Some(&dir.path().join("missing.toml")))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.toml"), "{err}");

    // The binary says the same and exits 2.
    std::fs::write(&path, "max_concurrent_runs = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_threadline"))
        .args(["--config", path.to_str().unwrap(), "pipelines"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_concurrent_runs"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_push_keeps_the_commit_and_a_retry_pushes_it() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "echo one > one.txt\nsleep 2").await;
    wait_for(orch.store(), &sub.run.id, "running", |r| r.state == RunState::Running).await;
    // The origin goes away while the agent works.
    let away = env.dir.path().join("origin-away.git");
    std::fs::rename(&env.origin, &away).unwrap();
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Failed);
    assert!(!run.pushed);
    let error = run.error.clone().unwrap();
    assert!(error.contains("push failed") && error.contains("retry"), "{error}");
    // In the daemon's own git directory, which no container sees.
    let objects = orch.objects_path(&sub.pipeline.id);
    let gitdir = objects.parent().unwrap();
    assert_eq!(
        Some(git(gitdir, &["rev-parse", &sub.pipeline.branch])),
        run.head_commit,
        "the commit is kept"
    );

    std::fs::rename(&away, &env.origin).unwrap();
    let retry = orch.retry(&run.id, "tester", None).await.unwrap();
    let again = finished(orch.store(), &retry.run.id).await;
    assert_eq!(again.state, RunState::Succeeded, "{:?}", again.error);
    assert!(again.pushed);
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "one.txt").as_deref(),
        Some("one\n")
    );
    assert_eq!(
        env.origin_head(&sub.pipeline.branch),
        run.head_commit,
        "the earlier commit is what got pushed"
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_run_finishes_its_runs_on_restart_once() {
    let env = TestEnv::new();
    let config_path = crate::harness::write_cli_config(&env, "");
    let cli = |args: &[&str]| crate::harness::cli(&config_path, args);
    let mut daemon = cli(&["serve", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let store = Store::open(&env.config.database_url()).await.unwrap();
    let submit = |prompt: &str| {
        let out = cli(&["run", "--detach", "--repo", &env.origin_url(), prompt])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("run      "))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_owned()
    };
    // One agent exits while the daemon is dead; the other is still running at restart.
    let short = submit("echo a > a.txt\nsleep 1\necho a2 > a2.txt");
    let long = submit("echo b > b.txt\nsleep 8\necho b2 > b2.txt");
    for id in [&short, &long] {
        wait_for(&store, id, "running", |r| r.state == RunState::Running).await;
    }
    let long_pipeline = store.run(&long).await.unwrap().unwrap().pipeline_id;
    // A follow-up queued meanwhile must still run after the restart.
    let out = cli(&["follow-up", "--detach", &long_pipeline, "echo again > c.txt"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    daemon.kill().unwrap(); // SIGKILL
    daemon.wait().unwrap();
    while docker_inspect(&format!("threadline-run-{short}")).unwrap()["State"]["Running"] == true {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        docker_inspect(&format!("threadline-run-{long}")).unwrap()["State"]["Running"],
        true
    );
    for id in [&short, &long] {
        assert_eq!(
            store.run(id).await.unwrap().unwrap().state,
            RunState::Running,
            "killed mid-run"
        );
    }

    let mut serve = cli(&["serve", "--until-idle"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while serve.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("`serve --until-idle` never finished the interrupted runs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(serve.wait().unwrap().success());
    for (id, files) in [(&short, ["a.txt", "a2.txt"]), (&long, ["b.txt", "b2.txt"])] {
        let run = store.run(id).await.unwrap().unwrap();
        assert_eq!(run.state, RunState::Succeeded, "{id}: {:?}", run.error);
        let pipeline = store.pipeline(&run.pipeline_id).await.unwrap().unwrap();
        for f in files {
            assert!(env.origin_file(&pipeline.branch, f).is_some(), "{f} pushed for {id}");
        }
        let events = store.events(id).await.unwrap();
        let count = |s: RunState| events.iter().filter(|e| e.state == s).count();
        assert_eq!(
            (count(RunState::Running), count(RunState::Succeeded)),
            (1, 1),
            "ran once: {events:?}"
        );
    }
    let pipeline = store.pipeline(&long_pipeline).await.unwrap().unwrap();
    assert_eq!(
        env.origin_file(&pipeline.branch, "c.txt").as_deref(),
        Some("again\n"),
        "the queued follow-up ran"
    );
    let commits = git(
        &env.origin,
        &["rev-list", "--count", &format!("main..{}", pipeline.branch)],
    );
    assert_eq!(commits, "2", "one commit per run, none twice");

    let out = cli(&["runs", &pipeline.id]).output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&long) && table.contains("succeeded") && table.contains("2 files +2 -0"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_pipeline_shows_its_config_and_opens_a_shell() {
    let env = TestEnv::new();
    let extra = format!(
        "[git]\ntoken = \"supersecret-xyz-123\"\n[repos.app]\nurl = {:?}\n",
        env.origin_url()
    );
    let config_path = crate::harness::write_cli_config(&env, &extra);
    let cli = |args: &[&str]| crate::harness::cli(&config_path, args);

    let out = cli(&["config"])
        .env("THREADLINE_MAX_CONCURRENT_RUNS", "7")
        .env("THREADLINE_REPOS__APP__FORGE__KIND", "gitlab")
        .env("THREADLINE_REPOS__APP__FORGE__TOKEN", "forge-secret-456")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("max_concurrent_runs = 7"),
        "environment overrides the file:\n{text}"
    );
    assert!(
        !text.contains("supersecret-xyz-123") && text.contains("[REDACTED]"),
        "{text}"
    );
    // A forge token from the environment is taken, and never printed.
    let forge = &text[text.find("[repos.app.forge]").expect("the forge section")..];
    assert!(forge.contains("kind = \"gitlab\""), "{text}");
    assert!(forge.contains("token = \"[REDACTED]\""), "{text}");
    assert!(!text.contains("forge-secret-456"), "{text}");

    let out = cli(&[
        "run",
        "--repo",
        &env.origin_url(),
        "echo hello > hello.txt\necho working",
    ])
    .output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "preparing",
        "running",
        "│ working",
        "succeeded",
        "branch  threadline/",
        "commit  ",
        "changes 1 file changed",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let out = cli(&["run", "--repo", &env.origin_url(), "exit 4"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a failed run exits 1");

    let store = Store::open(&env.config.database_url()).await.unwrap();
    let first = store.pipelines(10).await.unwrap().pop().unwrap().pipeline;
    let mut shell = cli(&["shell", &first.id])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    shell
        .stdin
        .take()
        .unwrap()
        .write_all(b"cat hello.txt\nid -u\ntouch /etc/x || echo no-etc\n")
        .unwrap();
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("hello") && text.contains("no-etc") && !text.lines().any(|l| l == "0"),
        "{text}"
    );
    // The workspace is the daemon's again afterwards.
    use std::os::unix::fs::MetadataExt;
    let ws = env.config.data_dir.join("workspaces").join(&first.id);
    assert_eq!(
        std::fs::metadata(&ws).unwrap().uid(),
        std::fs::metadata(&env.config.data_dir).unwrap().uid()
    );

    let out = cli(&["logs", &first.id]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("working"));
}

/// `docker inspect` of a container, or None when it does not exist.
fn docker_inspect(id: &str) -> Option<serde_json::Value> {
    let out = Command::new("docker").args(["inspect", id]).output().unwrap();
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()?.first().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_made_during_the_run_are_kept_under_the_runs_own() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "sleep 2\necho after > after.txt").await;
    wait_for(orch.store(), &sub.run.id, "running", |r| r.state == RunState::Running).await;
    // What an agent with git does: commit inside the workspace while it runs. Its
    // `.git` borrows the pipeline's objects from where the container has them mounted.
    let ws = orch.workspace_path(&sub.pipeline.id);
    let objects = orch.objects_path(&sub.pipeline.id);
    let agent_git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "safe.directory=*"])
            .args(args)
            .current_dir(&ws)
            .env("GIT_ALTERNATE_OBJECT_DIRECTORIES", &objects)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    std::fs::write(ws.join("own.txt"), "the agent's own commit\n").unwrap();
    agent_git(&["add", "own.txt"]);
    agent_git(&["commit", "-q", "-m", "agent: own commit"]);
    let own = agent_git(&["rev-parse", "HEAD"]);

    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let branch = &sub.pipeline.branch;
    assert_eq!(
        env.origin_file(branch, "own.txt").as_deref(),
        Some("the agent's own commit\n")
    );
    assert_eq!(env.origin_file(branch, "after.txt").as_deref(), Some("after\n"));
    let parent = git(&env.origin, &["rev-parse", &format!("{branch}~1")]);
    assert_eq!(parent, own, "the run's commit sits on top of the agent's");
    assert_eq!(run.diffstat.unwrap().files_changed, 2, "the diffstat covers both");
    orch.shutdown().await;
}

#[test]
fn only_a_pipeline_branch_is_ever_pushed() {
    use threadline::orchestrator::{Git, GitError};
    let env = TestEnv::new();
    let git = Git::new(&env.config);
    let mut pipeline = crate::harness::pipeline_on("p", &env.origin_url());
    for branch in ["main", "feature/x", "threadline/"] {
        pipeline.branch = branch.into();
        assert!(
            matches!(git.push(&pipeline, &|| true), Err(GitError::ForbiddenBranch { .. })),
            "{branch} must be refused"
        );
    }
    pipeline.base_branch = "threadline/base".into();
    pipeline.branch = "threadline/base".into();
    assert!(matches!(
        git.push(&pipeline, &|| true),
        Err(GitError::ForbiddenBranch { .. })
    ));
}

#[test]
fn a_push_too_late_for_its_lease_sends_nothing() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use threadline::orchestrator::{Git, GitError};
    let env = TestEnv::new();
    let daemon = Git::new(&env.config);
    let pipeline = crate::harness::pipeline_on("late", &env.origin_url());
    let ws = daemon.prepare(&pipeline).unwrap().workspace;
    std::fs::write(ws.join("late.txt"), "late\n").unwrap();
    let gitdir = daemon.gitdir_path(&pipeline.id).display().to_string();
    let daemon_git = |args: &[&str]| {
        git(
            &ws,
            &[&["--git-dir", gitdir.as_str(), "--work-tree", "."], args].concat(),
        )
    };
    daemon_git(&["add", "late.txt"]);
    daemon_git(&["commit", "-q", "-m", "late"]);

    // A worker whose lease may run out pushes nothing: asked before the push, and last
    // in its negotiation, when the remote is connected and the pack about to be sent.
    for allowed_asks in [0, 1] {
        let asked = AtomicUsize::new(0);
        let result = daemon.push(&pipeline, &|| asked.fetch_add(1, Ordering::SeqCst) < allowed_asks);
        assert!(matches!(result, Err(GitError::PushTooLate { .. })), "{result:?}");
        assert_eq!(asked.load(Ordering::SeqCst), allowed_asks + 1, "asked until refused");
        assert_eq!(env.origin_head(&pipeline.branch), None, "nothing reached the remote");
    }
    // With its lease, it pushes.
    daemon.push(&pipeline, &|| true).unwrap();
    assert_eq!(env.origin_file(&pipeline.branch, "late.txt").as_deref(), Some("late\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_work_tree_whose_git_directory_was_lost_keeps_its_files() {
    // As after an upgrade from the layout where the work tree's `.git` was the daemon's,
    // with a run's work left unsaved in it.
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "echo one > one.txt").await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let gitdir = orch.objects_path(&sub.pipeline.id).parent().unwrap().to_path_buf();
    std::fs::remove_dir_all(&gitdir).unwrap();
    let ws = orch.workspace_path(&sub.pipeline.id);
    std::fs::write(ws.join("unsaved.txt"), "left by an earlier run\n").unwrap();

    let next = orch
        .submit_follow_up(follow_up(&sub.pipeline.id, "echo two > two.txt"))
        .await
        .unwrap();
    let run = finished(orch.store(), &next.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let branch = &sub.pipeline.branch;
    assert_eq!(
        env.origin_file(branch, "unsaved.txt").as_deref(),
        Some("left by an earlier run\n")
    );
    assert_eq!(env.origin_file(branch, "one.txt").as_deref(), Some("one\n"));
    assert_eq!(env.origin_file(branch, "two.txt").as_deref(), Some("two\n"));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_function_serves_runs_and_the_web_until_told_to_stop() {
    use std::io::{Read, Write};
    use threadline::daemon::{Listeners, serve};
    // What `threadline serve` runs, started the way the binary starts it, on port 0.
    let mut env = TestEnv::new();
    env.config.web.listen = "127.0.0.1:0".into();
    let listeners = Listeners::bind(&env.config).await.unwrap();
    let addr = listeners.web_addr().expect("the web chat is on by default");
    let orch = env.orchestrator_unstarted().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let daemon = tokio::spawn(serve(orch.clone(), listeners, async move {
        let _ = stop_rx.await;
    }));
    let sub = env.start(&orch, "echo daemon > daemon.txt").await;
    let run = finished(orch.store(), &sub.run.id).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    let health = tokio::task::spawn_blocking(move || {
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        write!(
            conn,
            "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        conn.read_to_string(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(15), daemon)
        .await
        .expect("the daemon stops when told")
        .unwrap()
        .unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "the web chat stopped with it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repository_that_is_gone_says_so() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let first = env.start(&orch, "echo one > one.txt").await;
    assert_eq!(finished(orch.store(), &first.run.id).await.state, RunState::Succeeded);
    std::fs::remove_dir_all(&env.origin).unwrap();
    let next = orch
        .submit_follow_up(follow_up(&first.pipeline.id, "echo two > two.txt"))
        .await
        .unwrap();
    let run = finished(orch.store(), &next.run.id).await;
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.unwrap_or_default();
    assert!(error.contains("no longer there"), "{error}");
    orch.shutdown().await;
}
