//! The agent is untrusted: one story per attack class, each played by a real agent in a
//! real container against the daemon as it runs in production (root, real git). What
//! the agent writes under `/workspace` (its `.git` included) must never steer the
//! daemon's git, reach a host file or credential, or flood what the daemon keeps.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use threadline::config::Secret;
use threadline::model::{Run, RunState};
use threadline::orchestrator::Orchestrator;

use crate::harness::{TestEnv, finished, follow_up, git};

const CANARY_TOKEN: &str = "ghp_canary_0123456789abcdef";

/// An HTTP server on loopback that answers every request with a Basic-auth challenge and
/// records what it was sent: where a redirected push or fetch would have gone.
struct Recorder {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Recorder {
    fn start() -> Recorder {
        Recorder::on("127.0.0.1", None)
    }

    /// A recorder on `ip` (in 127.0.0.0/8) that sends every request on to `redirect`.
    fn on(ip: &str, redirect: Option<String>) -> Recorder {
        let listener = TcpListener::bind((ip, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
                    match stream.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => break,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                seen.lock().unwrap().push(head);
                let answer = match &redirect {
                    Some(to) => format!(
                        "HTTP/1.1 302 Found\r\nLocation: {to}{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        path.trim_start_matches('/')
                    ),
                    None => "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
                             Content-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_owned(),
                };
                let _ = stream.write_all(answer.as_bytes());
            }
        });
        Recorder { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

async fn run_to_end(env: &TestEnv, orch: &Orchestrator, script: &str) -> Run {
    let sub = env.start(orch, script).await;
    finished(orch.store(), &sub.run.id).await
}

async fn follow(orch: &Orchestrator, pipeline: &str, script: &str) -> Run {
    let sub = orch.submit_follow_up(follow_up(pipeline, script)).await.unwrap();
    finished(orch.store(), &sub.run.id).await
}

/// The branch a run's pipeline pushes.
async fn branch_of(orch: &Orchestrator, run: &Run) -> String {
    orch.store().pipeline(&run.pipeline_id).await.unwrap().unwrap().branch
}

fn succeeded(run: &Run) {
    assert_eq!(run.state, RunState::Succeeded, "{:?}: {}", run.error, run.log_tail);
}

/// Every file below `dir` with its content, to compare before and after.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        if meta.is_dir() {
            for e in std::fs::read_dir(&path).unwrap() {
                stack.push(e.unwrap().path());
            }
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

async fn notes(orch: &Orchestrator, run: &Run) -> String {
    let events = orch.store().events(&run.id).await.unwrap();
    events.last().map(|e| e.detail.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_rewrites_in_the_agents_git_config_steer_no_push_or_fetch() {
    let recorder = Recorder::start();
    let mut env = TestEnv::new();
    env.config.git.token = Secret::new(CANARY_TOKEN);
    let orch = env.orchestrator().await;
    let mirrors = env.config.data_dir.join("mirrors");
    // Rewrites for the origin (the push), the mirror (the next fetch), and everything.
    let script = format!(
        "echo one > one.txt\n\
         printf '[url \"{r}\"]\\n\\tpushInsteadOf = {origin}\\n\\tinsteadOf = {origin}\\n\\tinsteadOf = {mirrors}\\n\\tinsteadOf = /\\n' >> .git/config\n",
        r = recorder.url(),
        origin = env.origin_url(),
        mirrors = mirrors.display(),
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    assert!(run.pushed);
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "one.txt").as_deref(), Some("one\n"));

    let again = follow(&orch, &run.pipeline_id, "echo two > two.txt").await;
    succeeded(&again);
    assert_eq!(env.origin_file(&branch, "two.txt").as_deref(), Some("two\n"));
    let seen = recorder.requests();
    assert!(
        seen.is_empty(),
        "the agent's git config sent the daemon's git elsewhere:\n{seen:#?}"
    );
    orch.shutdown().await;
}

#[test]
fn credentials_go_only_to_the_configured_remotes_host() {
    use threadline::orchestrator::Git;
    // The remote in the store is on 127.0.0.2; it redirects to 127.0.0.1, which asks
    // for credentials.
    let elsewhere = Recorder::start();
    let remote = Recorder::on("127.0.0.2", Some(format!("http://127.0.0.1:{}/", elsewhere.port)));
    let mut env = TestEnv::new();
    env.config.git.token = Secret::new(CANARY_TOKEN);
    let git = Git::new(&env.config);
    let err = git
        .sync_mirror(&format!("http://127.0.0.2:{}/demo.git", remote.port))
        .unwrap_err()
        .to_string();
    assert!(
        !remote.requests().is_empty() && !elsewhere.requests().is_empty(),
        "{err}"
    );
    assert!(err.contains("refusing to send credentials to 127.0.0.1"), "{err}");
    let seen = elsewhere.requests();
    assert!(
        seen.iter().all(|r| !r.to_ascii_lowercase().contains("authorization")),
        "credentials went to a host other than the remote's: {seen:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_swapped_in_the_agents_git_config_brings_nothing_in() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let secret = env.dir.path().join("secret.git");
    let script = format!(
        "echo one > one.txt\n\
         printf '[remote \"origin\"]\\n\\turl = {}\\n\\tfetch = +refs/heads/*:refs/remotes/origin/*\\n' > .git/config\n",
        secret.display()
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    let branch = branch_of(&orch, &run).await;
    // Another repository on the host, whose copy of the branch goes further.
    git(
        env.dir.path(),
        &["clone", "-q", "--bare", &env.origin_url(), secret.to_str().unwrap()],
    );
    let scratch = env.dir.path().join("scratch");
    git(
        env.dir.path(),
        &[
            "clone",
            "-q",
            "-b",
            &branch,
            secret.to_str().unwrap(),
            scratch.to_str().unwrap(),
        ],
    );
    std::fs::write(scratch.join("secret.txt"), "host secret\n").unwrap();
    git(&scratch, &["add", "secret.txt"]);
    git(&scratch, &["commit", "-q", "-m", "secret"]);
    git(&scratch, &["push", "-q", "origin", &branch]);

    let again = follow(
        &orch,
        &run.pipeline_id,
        "cat secret.txt > leaked.txt 2>&1; ls > listing.txt",
    )
    .await;
    succeeded(&again);
    assert_eq!(env.origin_file(&branch, "secret.txt"), None);
    let listing = env.origin_file(&branch, "listing.txt").unwrap();
    assert!(!listing.contains("secret"), "{listing}");
    let leaked = env.origin_file(&branch, "leaked.txt").unwrap_or_default();
    assert!(!leaked.contains("host secret"), "{leaked}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_worktree_in_the_agents_git_config_commits_no_host_directory() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let host_dir = env.dir.path().join("host-dir");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("host-secret.txt"), "not for the branch\n").unwrap();
    let before = snapshot(&host_dir);
    let script = format!(
        "echo mine > mine.txt\nprintf '[core]\\n\\tworktree = {}\\n' >> .git/config\n",
        host_dir.display()
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "host-secret.txt"), None);
    assert_eq!(env.origin_file(&branch, "mine.txt").as_deref(), Some("mine\n"));

    // A follow-up whose agent also deleted its branch: the next preparation must not
    // write into the host directory either.
    let again = follow(
        &orch,
        &run.pipeline_id,
        "rm -f .git/refs/heads/$THREADLINE_BRANCH; echo again > again.txt",
    )
    .await;
    succeeded(&again);
    let third = follow(&orch, &run.pipeline_id, "echo third > third.txt").await;
    succeeded(&third);
    assert_eq!(snapshot(&host_dir), before, "the host directory changed");
    assert_eq!(env.origin_file(&branch, "third.txt").as_deref(), Some("third\n"));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitdir_file_pointing_at_a_users_checkout_leaves_it_untouched() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    // The user's own checkout of the project, with an uncommitted change.
    let checkout = env.dir.path().join("checkout");
    git(
        env.dir.path(),
        &["clone", "-q", &env.origin_url(), checkout.to_str().unwrap()],
    );
    std::fs::write(checkout.join("wip.txt"), "the user's work in progress\n").unwrap();
    git(&checkout, &["add", "wip.txt"]);
    let before = snapshot(&checkout.join(".git"));
    let script = format!(
        "echo hi > hi.txt\nrm -rf .git\necho 'gitdir: {}/.git' > .git\n",
        checkout.display()
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    let again = follow(&orch, &run.pipeline_id, "echo more > more.txt").await;
    succeeded(&again);
    let after = snapshot(&checkout.join(".git"));
    assert!(before == after, "the user's checkout's git directory changed");
    assert_eq!(git(&checkout, &["branch", "--list"]), "* main");
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "more.txt").as_deref(), Some("more\n"));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_in_place_of_git_files_write_nothing_on_the_host() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let victim = env.dir.path().join("victim.txt");
    std::fs::write(&victim, "host file\n").unwrap();
    let created = env.dir.path().join("created-by-daemon");
    let script = format!(
        "echo one > one.txt\n\
         for f in index config FETCH_HEAD HEAD ORIG_HEAD packed-refs; do rm -f .git/$f; done\n\
         ln -s {victim} .git/index\nln -s {victim} .git/config\nln -s {created} .git/FETCH_HEAD\n\
         ln -s {victim} .git/packed-refs\nln -s {created}-head .git/HEAD\n\
         rm -rf .git/objects && ln -s / .git/objects\n",
        victim = victim.display(),
        created = created.display(),
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    let again = follow(&orch, &run.pipeline_id, "echo two > two.txt").await;
    succeeded(&again);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "host file\n");
    assert!(!created.exists() && !env.dir.path().join("created-by-daemon-head").exists());
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "two.txt").as_deref(), Some("two\n"));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_summary_is_never_read_through_a_link_a_fifo_or_whole() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let host_file = env.dir.path().join("host-secret.txt");
    std::fs::write(&host_file, "HOST-CANARY-42\n").unwrap();
    let host_dir = env.dir.path().join("host-dir");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("summary.md"), "HOST-CANARY-43\n").unwrap();

    // A link to a host file.
    let script = format!(
        "mkdir -p .threadline\nln -s {} .threadline/summary.md\n",
        host_file.display()
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    assert_eq!(run.summary, None);
    assert!(
        notes(&orch, &run).await.contains("link"),
        "{}",
        notes(&orch, &run).await
    );
    let p = run.pipeline_id.clone();

    // The control directory itself a link to a host directory.
    let run = follow(&orch, &p, &format!("ln -s {} .threadline", host_dir.display())).await;
    succeeded(&run);
    assert_eq!(run.summary, None);
    assert!(host_dir.join("summary.md").exists(), "the host directory was emptied");

    // A FIFO: nothing will ever write to it.
    let run = follow(&orch, &p, "mkdir -p .threadline\nmkfifo .threadline/summary.md").await;
    succeeded(&run);
    assert_eq!(run.summary, None);

    // A 200 MB sparse file: its beginning, capped.
    let run = follow(
        &orch,
        &p,
        "mkdir -p .threadline\necho 'the start' > .threadline/summary.md\ntruncate -s 200M .threadline/summary.md",
    )
    .await;
    succeeded(&run);
    let summary = run.summary.unwrap();
    assert!(
        summary.starts_with("the start") && summary.len() <= 16 * 1024,
        "{}",
        summary.len()
    );

    // History given to the next agent holds none of it.
    let run = follow(&orch, &p, "cat /threadline/history.md > history-seen.md").await;
    let branch = orch.store().pipeline(&p).await.unwrap().unwrap().branch;
    let history = env.origin_file(&branch, "history-seen.md").unwrap();
    assert!(!history.contains("HOST-CANARY"), "{history}");
    succeeded(&run);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_output_without_newlines_is_bounded() {
    let mut env = TestEnv::new();
    env.config.max_log_bytes = 1024 * 1024;
    let orch = env.orchestrator().await;
    let run = run_to_end(
        &env,
        &orch,
        "head -c 30000000 /dev/zero | tr '\\000' x\necho\necho the end",
    )
    .await;
    succeeded(&run);
    assert!(
        run.log_tail.len() <= 64 * 1024,
        "the stored tail is {} bytes",
        run.log_tail.len()
    );
    // Whole lines of at most 4 KB. (Which lines: Docker's follow of a json-file log may
    // stop at the log's rotation, 10 MB on this machine, so the last may never arrive.)
    assert!(run.log_tail.lines().count() > 1);
    assert!(
        run.log_tail
            .lines()
            .all(|l| l.len() <= 4096 && (l == "the end" || l.bytes().all(|b| b == b'x')))
    );
    let log = std::fs::read_to_string(orch.log_path(&run.id)).unwrap();
    assert!(log.len() <= 1024 * 1024 + 200, "agent.log is {} bytes", log.len());
    assert!(log.contains("truncated"), "the log says it was truncated");
    assert!(log.lines().all(|l| l.len() <= 4096));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escape_sequences_never_reach_a_terminal_or_the_store() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let run = run_to_end(
        &env,
        &orch,
        "printf 'real failure\\n\\033]0;owned\\007\\033[1A\\033[2K\\rrun succeeded\\n'\n\
         mkdir -p .threadline\nprintf 'done \\033[32m✓\\033[0m\\n' > .threadline/summary.md\nexit 3",
    )
    .await;
    assert_eq!(run.state, RunState::Failed);
    assert!(
        !run.log_tail.contains('\u{1b}') && !run.log_tail.contains('\u{7}'),
        "{:?}",
        run.log_tail
    );
    assert!(run.log_tail.contains("run succeeded"));
    assert_eq!(run.summary.as_deref(), Some("done ✓"));
    let log = std::fs::read(orch.log_path(&run.id)).unwrap();
    assert!(!log.contains(&0x1b), "agent.log holds an escape");

    // What the CLI prints.
    let config = crate::harness::write_cli_config(&env, "");
    orch.shutdown().await;
    for args in [vec!["logs", run.id.as_str()], vec!["runs", run.pipeline_id.as_str()]] {
        let out = crate::harness::cli(&config, &args).output().unwrap();
        assert!(!out.stdout.contains(&0x1b), "`threadline {args:?}` printed an escape");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_may_write_its_home_in_tmp() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let run = run_to_end(
        &env,
        &orch,
        "set -e\nmkdir -p \"$HOME/.config\"\necho state > \"$HOME/.config/agent\"\ncat \"$HOME/.config/agent\" > home.txt",
    )
    .await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}: {}", run.error, run.log_tail);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_very_deep_directory_does_not_break_the_pipeline() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let run = run_to_end(
        &env,
        &orch,
        "echo top > top.txt\nmkdir deep && cd deep && i=0\nwhile [ $i -lt 2000 ]; do mkdir d && cd d; i=$((i+1)); done\necho bottom > bottom.txt",
    )
    .await;
    succeeded(&run);
    assert!(
        notes(&orch, &run).await.contains("too long"),
        "{}",
        notes(&orch, &run).await
    );
    let again = follow(&orch, &run.pipeline_id, "echo ok > ok.txt").await;
    succeeded(&again);
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "ok.txt").as_deref(), Some("ok\n"));
    assert_eq!(env.origin_file(&branch, "top.txt").as_deref(), Some("top\n"));
    orch.shutdown().await;
}

/// An agent image with git: the tests' busybox plus the host's own git and the libraries
/// it links (there is no registry to pull one from).
fn ensure_git_image() -> &'static str {
    const GIT_IMAGE: &str = "threadline-test-agent-git:1";
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        crate::harness::ensure_image();
        let ctx = tempfile::tempdir().unwrap();
        let root = ctx.path().join("rootfs");
        let git_bin = Path::new("/usr/bin/git");
        let ldd = Command::new("ldd").arg(git_bin).output().expect("ldd");
        let mut files = vec![git_bin.to_path_buf()];
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            if let Some(path) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push(PathBuf::from(path));
            }
        }
        for file in files {
            let dest = root.join(file.strip_prefix("/").unwrap());
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(std::fs::canonicalize(&file).unwrap(), &dest).unwrap();
        }
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!("FROM {}\nCOPY rootfs/ /\n", crate::harness::IMAGE),
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", GIT_IMAGE])
            .arg(ctx.path())
            .env("DOCKER_BUILDKIT", "0")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    });
    GIT_IMAGE
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_has_a_working_git_and_its_own_commits_are_imported() {
    let mut env = TestEnv::new();
    env.agent_mut().image = ensure_git_image().into();
    let orch = env.orchestrator().await;
    let script = "set -e\n\
        git status --porcelain > /tmp/status\n\
        git log --format=%s > /tmp/log\n\
        git blame README.md > /tmp/blame\n\
        echo more >> README.md\n\
        git diff --stat > /tmp/diff\n\
        git diff origin/main --stat > /tmp/diff-base\n\
        git commit -qam 'agent: its own commit'\n\
        cp /tmp/status /tmp/log /tmp/blame /tmp/diff /tmp/diff-base .\n";
    let run = run_to_end(&env, &orch, script).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}: {}", run.error, run.log_tail);
    let branch = branch_of(&orch, &run).await;
    let file = |name: &str| env.origin_file(&branch, name).unwrap_or_default();
    assert_eq!(file("status"), "", "the agent's git status starts clean");
    assert_eq!(file("log"), "initial\n");
    assert!(file("blame").contains("Tester"), "{}", file("blame"));
    assert!(file("diff").contains("README.md"), "{}", file("diff"));
    assert_eq!(file("README.md"), "# demo\nmore\n");
    // The agent's commit, then the run's commit of what it left uncommitted.
    let log = git(&env.origin, &["log", "--format=%s", &branch]);
    let subjects: Vec<&str> = log.lines().collect();
    assert_eq!(subjects.len(), 3, "{log}");
    assert_eq!(subjects[1], "agent: its own commit");

    // A follow-up sees the whole history in its own git, and an orphan commit it makes
    // on the branch is not taken (its files are).
    let again = follow(
        &orch,
        &run.pipeline_id,
        "set -e\ngit log --format=%s > history.txt\n\
         git checkout -q --orphan stray\ngit rm -rq --cached .\necho x > stray.txt\ngit add stray.txt\n\
         git commit -qm stray\ngit update-ref refs/heads/$THREADLINE_BRANCH stray\n",
    )
    .await;
    succeeded(&again);
    let history = env.origin_file(&branch, "history.txt").unwrap();
    assert!(history.contains("agent: its own commit"), "{history}");
    assert!(
        notes(&orch, &again).await.contains("does not build on"),
        "{}",
        notes(&orch, &again).await
    );
    let log = git(&env.origin, &["log", "--format=%s", &branch]);
    assert!(!log.contains("stray"), "{log}");
    assert_eq!(env.origin_file(&branch, "stray.txt").as_deref(), Some("x\n"));
    assert_eq!(env.origin_file(&branch, "README.md").as_deref(), Some("# demo\nmore\n"));
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_left_ignored_are_not_written_through_by_the_next_checkout() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let victim = env.dir.path().join("victim.txt");
    std::fs::write(&victim, "host file\n").unwrap();
    // An ignore file that ignores itself and a link beside it: neither is committed.
    let script = format!(
        "mkdir sub\nprintf '.gitignore\\nX\\n' > sub/.gitignore\nln -s {} sub/X\necho one > one.txt",
        victim.display()
    );
    let run = run_to_end(&env, &orch, &script).await;
    succeeded(&run);
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "sub/X"), None);
    // Someone adds sub/X on the branch.
    let scratch = env.dir.path().join("scratch");
    git(
        env.dir.path(),
        &[
            "clone",
            "-q",
            "-b",
            &branch,
            &env.origin_url(),
            scratch.to_str().unwrap(),
        ],
    );
    std::fs::create_dir_all(scratch.join("sub")).unwrap();
    std::fs::write(scratch.join("sub/X"), "from the remote\n").unwrap();
    git(&scratch, &["add", "sub/X"]);
    git(&scratch, &["commit", "-q", "-m", "add sub/X"]);
    git(&scratch, &["push", "-q", "origin", &branch]);

    let again = follow(&orch, &run.pipeline_id, "cat sub/X > seen.txt").await;
    succeeded(&again);
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "host file\n",
        "written through the link"
    );
    assert_eq!(
        env.origin_file(&branch, "seen.txt").as_deref(),
        Some("from the remote\n")
    );
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_git_refuses_and_huge_files_do_not_wedge_the_pipeline() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let run = run_to_end(
        &env,
        &orch,
        "touch git~1 .GIT 'sub.git. ' 'back\\slash'\ntruncate -s 300M huge.bin\n\
         printf '[include]\\n\\tpath = /etc/passwd\\n' > .gitmodules\necho ok > ok.txt",
    )
    .await;
    succeeded(&run);
    let notes = notes(&orch, &run).await;
    assert!(
        notes.contains("git refuses") && notes.contains("larger than 100 MB"),
        "{notes}"
    );
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "ok.txt").as_deref(), Some("ok\n"));
    assert_eq!(env.origin_file(&branch, "huge.bin"), None);
    assert_eq!(env.origin_file(&branch, ".gitmodules"), None);
    let again = follow(&orch, &run.pipeline_id, "echo two > two.txt").await;
    succeeded(&again);
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packed_or_malformed_commits_of_the_agent_are_passed_over() {
    let mut env = TestEnv::new();
    env.agent_mut().image = ensure_git_image().into();
    let orch = env.orchestrator().await;
    // Packs are never read: a pack whose index loops would otherwise hang the daemon.
    let packed = "set -e\necho one > one.txt\ngit add one.txt\ngit commit -qm packed\ngit gc -q\n";
    let run = run_to_end(&env, &orch, packed).await;
    assert_eq!(run.state, RunState::Succeeded, "{:?}: {}", run.error, run.log_tail);
    assert!(
        notes(&orch, &run).await.contains("passed over"),
        "{}",
        notes(&orch, &run).await
    );
    let branch = branch_of(&orch, &run).await;
    assert_eq!(env.origin_file(&branch, "one.txt").as_deref(), Some("one\n"));

    // A commit whose identity lines are not git's: a forge would refuse it for good.
    let malformed = "set -e\necho two > two.txt\n\
        bad=$(printf 'tree %s\\nparent %s\\nauthor nobody\\ncommitter nobody\\n\\nodd\\n' \
          $(git rev-parse HEAD^{tree}) $(git rev-parse HEAD) | git hash-object --literally -t commit -w --stdin)\n\
        git update-ref refs/heads/$THREADLINE_BRANCH $bad\n";
    let again = follow(&orch, &run.pipeline_id, malformed).await;
    assert_eq!(
        again.state,
        RunState::Succeeded,
        "{:?}: {}",
        again.error,
        again.log_tail
    );
    assert!(
        notes(&orch, &again).await.contains("malformed"),
        "{}",
        notes(&orch, &again).await
    );
    assert_eq!(env.origin_file(&branch, "two.txt").as_deref(), Some("two\n"));
    let log = git(&env.origin, &["log", "--format=%an", &branch]);
    assert!(!log.contains("nobody"), "{log}");
    orch.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_open_on_the_workspace_stops_the_save_from_reading_it() {
    let env = TestEnv::new();
    let orch = env.orchestrator().await;
    let sub = env.start(&orch, "sleep 2\necho one > one.txt").await;
    crate::harness::wait_for(orch.store(), &sub.run.id, "running", |r| r.state == RunState::Running).await;
    // What `threadline shell` starts: a container labelled with the pipeline.
    let name = format!("tl-test-shell-{}", sub.pipeline.id);
    let started = Command::new("docker")
        .args(["run", "-d", "--rm", "--name", &name, "--label"])
        .arg(format!("threadline.pipeline={}", sub.pipeline.id))
        .args([crate::harness::IMAGE, "sleep", "60"])
        .output()
        .unwrap();
    assert!(started.status.success(), "{}", String::from_utf8_lossy(&started.stderr));
    let run = finished(orch.store(), &sub.run.id).await;
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.unwrap_or_default();
    assert!(error.contains("open on this pipeline's workspace"), "{error}");
    // Once it is gone, the next run commits what was left.
    let again = follow(&orch, &sub.pipeline.id, "echo two > two.txt").await;
    succeeded(&again);
    assert_eq!(
        env.origin_file(&sub.pipeline.branch, "one.txt").as_deref(),
        Some("one\n")
    );
    orch.shutdown().await;
}
