//! Crash safety, proven by fault injection: the real binary is stopped dead
//! (`THREADLINE_CRASH_AT`, an abort as sudden as `kill -9`) at each step of a run's life,
//! then again by the first recovery right after it adopts the run, and a third process
//! finishes. Each story asserts the run ended once, in the right state, with its work
//! on the branch once, no container or git lock left behind, and a follow-up working.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use threadline::crash::Step;
use threadline::model::{Run, RunState};
use threadline::store::Store;

use crate::harness::{TestEnv, cli, write_cli_config};

/// The agent: leaves one line naming its run, so work done twice shows.
const AGENT: &str = "echo \"$THREADLINE_RUN_ID\" >> work.txt\nsleep 1";

struct Story {
    env: TestEnv,
    config: PathBuf,
}

impl Story {
    fn new() -> Story {
        let env = TestEnv::new();
        let config = write_cli_config(&env, "[web]\nenabled = false\n");
        Story { env, config }
    }

    fn threadline(&self, args: &[&str], crash_at: Option<Step>) -> Output {
        let mut command = cli(&self.config, args);
        match crash_at {
            Some(step) => command.env("THREADLINE_CRASH_AT", step.name()),
            None => command.env_remove("THREADLINE_CRASH_AT"),
        };
        command.output().expect("the threadline binary")
    }

    async fn store(&self) -> Store {
        Store::open(&self.env.config.database_url()).await.unwrap()
    }

    async fn only_run(&self) -> Run {
        let store = self.store().await;
        let pipelines = store.pipelines(10).await.unwrap();
        assert_eq!(pipelines.len(), 1, "one pipeline");
        let mut runs = store.runs(&pipelines[0].pipeline.id).await.unwrap();
        assert_eq!(runs.len(), 1, "one run");
        runs.pop().unwrap()
    }
}

fn said(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `*.lock` files anywhere below `dir` (libgit2's, left by a process that died).
fn git_locks(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(here) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&here) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "lock") {
                found.push(path);
            }
        }
    }
    found
}

fn containers_of(run_id: &str) -> String {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=threadline.run={run_id}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

async fn crash_at(step: Step) {
    let story = Story::new();
    let origin = story.env.origin_url();
    let first = story.threadline(&["run", "--repo", &origin, AGENT], Some(step));
    assert_eq!(
        first.status.code(),
        None,
        "the process was to die at {}: {}",
        step.name(),
        said(&first)
    );

    // The first recovery dies right after adopting the run; the second finishes it.
    let second = story.threadline(&["serve", "--until-idle"], Some(Step::Adopted));
    // (Nothing to adopt after a crash once queued or once stored: then it ends normally.)
    assert!(matches!(second.status.code(), None | Some(0)), "{}", said(&second));
    let third = story.threadline(&["serve", "--until-idle"], None);
    assert_eq!(third.status.code(), Some(0), "{}", said(&third));

    let run = story.only_run().await;
    assert_eq!(
        run.state,
        RunState::Succeeded,
        "crash at {}: {:?}\n{}\n{}",
        step.name(),
        run.error,
        said(&second),
        said(&third)
    );
    assert!(run.pushed, "the outcome says it was pushed");
    let events = story.store().await.events(&run.id).await.unwrap();
    let endings = events.iter().filter(|e| e.state.is_terminal()).count();
    assert_eq!(endings, 1, "the run ended once: {events:#?}");
    let pipeline = story.store().await.pipeline(&run.pipeline_id).await.unwrap().unwrap();
    assert_eq!(
        story.env.origin_file(&pipeline.branch, "work.txt"),
        Some(format!("{}\n", run.id)),
        "the agent's work is on the branch once"
    );
    assert_eq!(containers_of(&run.id), "", "no container is left");
    let data = &story.env.config.data_dir;
    let locks = [git_locks(&data.join("gitdirs")), git_locks(&data.join("mirrors"))].concat();
    assert!(locks.is_empty(), "git locks left: {locks:?}");

    let next = story.threadline(&["follow-up", &pipeline.id, "echo next >> work.txt"], None);
    assert_eq!(next.status.code(), Some(0), "{}", said(&next));
    assert_eq!(
        story.env.origin_file(&pipeline.branch, "work.txt"),
        Some(format!("{}\nnext\n", run.id))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_queued_loses_nothing() {
    crash_at(Step::Queued).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_claimed_loses_nothing() {
    crash_at(Step::Claimed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_the_workspace_is_prepared_loses_nothing() {
    crash_at(Step::Prepared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_creating_and_starting_the_container_still_runs_the_agent() {
    crash_at(Step::ContainerCreated).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_the_container_started_loses_nothing() {
    crash_at(Step::ContainerStarted).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_the_agent_exited_loses_nothing() {
    crash_at(Step::AgentExited).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_the_work_is_committed_pushes_it_once() {
    crash_at(Step::Committed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_pushed_stores_the_outcome_once() {
    crash_at(Step::Pushed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_once_the_final_state_is_stored_changes_nothing() {
    crash_at(Step::Stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_git_locks_left_by_a_dead_process_are_removed() {
    let story = Story::new();
    let origin = story.env.origin_url();
    let first = story.threadline(&["run", "--repo", &origin, "echo one > one.txt"], None);
    assert_eq!(first.status.code(), Some(0), "{}", said(&first));
    let run = story.only_run().await;
    let pipeline = story.store().await.pipeline(&run.pipeline_id).await.unwrap().unwrap();
    // What a process killed in the middle of updating refs leaves.
    let data = &story.env.config.data_dir;
    let gitdir = data.join("gitdirs").join(format!("{}.git", pipeline.id));
    let stale = [
        gitdir.join(format!("refs/remotes/origin/{}.lock", pipeline.branch)),
        gitdir.join("index.lock"),
        gitdir.join("HEAD.lock"),
    ];
    for lock in &stale {
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        std::fs::write(lock, "").unwrap();
    }
    let mirror = std::fs::read_dir(data.join("mirrors"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "git"))
        .unwrap();
    std::fs::write(mirror.join("refs/heads/main.lock"), "").unwrap();

    let started = Instant::now();
    let next = story.threadline(&["follow-up", &pipeline.id, "echo two > two.txt"], None);
    assert_eq!(next.status.code(), Some(0), "{}", said(&next));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(
        story.env.origin_file(&pipeline.branch, "two.txt").as_deref(),
        Some("two\n")
    );
    let left = [git_locks(&data.join("gitdirs")), git_locks(&data.join("mirrors"))].concat();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_removed_while_the_daemon_was_down_keeps_its_log() {
    let story = Story::new();
    let origin = story.env.origin_url();
    let script = "echo the agent spoke\necho change > change.txt";
    let first = story.threadline(&["run", "--repo", &origin, script], Some(Step::AgentExited));
    assert_eq!(first.status.code(), None, "{}", said(&first));
    let run = story.only_run().await;
    let log_path = story.env.config.data_dir.join("runs").join(&run.id).join("agent.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("the agent spoke"), "{log}");
    let removed = Command::new("docker")
        .args(["rm", "-f", &format!("threadline-run-{}", run.id)])
        .output()
        .unwrap();
    assert!(removed.status.success());

    let recovery = story.threadline(&["serve", "--until-idle"], None);
    assert_eq!(recovery.status.code(), Some(0), "{}", said(&recovery));
    let run = story.only_run().await;
    assert_eq!(run.state, RunState::Failed, "{:?}", run.error);
    assert!(
        run.error.as_deref().unwrap_or("").contains("disappeared"),
        "{:?}",
        run.error
    );
    assert_eq!(std::fs::read_to_string(&log_path).unwrap(), log, "the log is kept");
    assert!(run.log_tail.contains("the agent spoke") || run.log_tail.is_empty());
    // Whatever it left is saved.
    let pipeline = story.store().await.pipeline(&run.pipeline_id).await.unwrap().unwrap();
    assert_eq!(
        story.env.origin_file(&pipeline.branch, "change.txt").as_deref(),
        Some("change\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_opening_a_fresh_data_dir_at_once_all_start() {
    for round in 0..2 {
        let story = Story::new();
        let children: Vec<_> = (0..8)
            .map(|_| {
                cli(&story.config, &["pipelines"])
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for child in children {
            let out = child.wait_with_output().unwrap();
            assert_eq!(out.status.code(), Some(0), "round {round}: {}", said(&out));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_serve_gracefully_and_the_next_start_adopts_at_once() {
    let story = Story::new();
    let origin = story.env.origin_url();
    let queued = story.threadline(
        &["run", "--detach", "--repo", &origin, "sleep 4\necho done > done.txt"],
        None,
    );
    assert_eq!(queued.status.code(), Some(0), "{}", said(&queued));
    let mut serve = cli(&story.config, &["serve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = story.store().await;
    let run_id = story.only_run().await.id;
    crate::harness::wait_for(&store, &run_id, "running", |r| r.state == RunState::Running).await;

    let signalled = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &serve.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(15), "serve did not stop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(0), "serve exits 0 on SIGTERM");
    assert!(
        signalled.elapsed() < Duration::from_secs(12),
        "{:?}",
        signalled.elapsed()
    );
    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Running, "the agent keeps going");
    assert_ne!(containers_of(&run_id), "", "its container is left running");

    // Its lease was released: the next start adopts without waiting for it to expire.
    let adopted = Instant::now();
    let next = story.threadline(&["serve", "--until-idle"], None);
    assert_eq!(next.status.code(), Some(0), "{}", said(&next));
    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Succeeded, "{:?}", run.error);
    assert!(adopted.elapsed() < Duration::from_secs(15));
    let pipeline = store.pipeline(&run.pipeline_id).await.unwrap().unwrap();
    assert_eq!(
        story.env.origin_file(&pipeline.branch, "done.txt").as_deref(),
        Some("done\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_ctrl_c_stops_waiting_and_the_cancel_stands() {
    let story = Story::new();
    let origin = story.env.origin_url();
    let run = cli(&story.config, &["run", "--repo", &origin, "sleep 30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let store = story.store().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let run_id = loop {
        let pipelines = store.pipelines(1).await.unwrap();
        if let Some(p) = pipelines.first()
            && let Some(r) = store.runs(&p.pipeline.id).await.unwrap().pop()
            && r.state == RunState::Running
        {
            break r.id;
        }
        assert!(Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pid = run.id().to_string();
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    // The first Ctrl-C asks for the cancel; the second one comes after it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !store.cancel_requested(&run_id).await.unwrap() {
        assert!(Instant::now() < deadline, "the first Ctrl-C asked for no cancel");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", said(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("stopped waiting") && stderr.contains("is cancelled"),
        "{stderr}"
    );

    let next = story.threadline(&["serve", "--until-idle"], None);
    assert_eq!(next.status.code(), Some(0), "{}", said(&next));
    let run = store.run(&run_id).await.unwrap().unwrap();
    assert_eq!(run.state, RunState::Cancelled, "the run ends as the CLI said");
}
