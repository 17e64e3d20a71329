//! The command line: `threadline run`, `follow-up`, `serve`, and the commands that inspect
//! and steer pipelines. Parses nothing itself beyond clap; all work is the orchestrator's.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::model::{Origin, Run, RunEvent, RunState, format_duration, now_millis};
use crate::orchestrator::Queries;
use crate::orchestrator::container::{AgentSpec, container_name};
use crate::orchestrator::{FollowUp, NewPipeline, Orchestrator, Scope, Submitted};

mod doctor;

#[derive(Debug, Parser)]
#[command(
    name = "threadline",
    version,
    about = "Prompt AI coding agents from a thread; each runs in a hardened local container and its work lands on its own git branch",
    after_help = "Configuration: defaults, then the TOML file (--config or THREADLINE_CONFIG), then THREADLINE_* variables.\n`threadline config` prints the configuration in effect; `threadline doctor` checks the machine.\n\nExit codes: 0 success; 1 the run did not succeed (failed, timed out or cancelled); 2 bad input or setup; 130 interrupted while waiting for a run (a second Ctrl-C).\n`serve` stops gracefully on SIGINT or SIGTERM and exits 0; agents keep running and the next start adopts them."
)]
pub struct Cli {
    /// The TOML configuration file.
    #[arg(long, global = true, env = "THREADLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where the database, mirrors, workspaces and logs live (overrides `data_dir`).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a pipeline with a first prompt and follow it to the end.
    Run(RunArgs),
    /// Add a prompt to a pipeline; it starts from the branch as the last run left it.
    FollowUp(FollowUpArgs),
    /// Run again, with the same prompt, a run that failed, timed out or was cancelled.
    Retry {
        /// The run (or a pipeline: its latest run).
        run: String,
        #[command(flatten)]
        watch: WatchArgs,
    },
    /// Cancel a run, or every unfinished run of a pipeline. Work so far is saved.
    Cancel {
        /// A run id, or a pipeline id.
        target: String,
    },
    /// List pipelines, newest first.
    Pipelines {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show a pipeline's runs (state, exit code, duration, commit, diffstat), its pull
    /// request and every Open PR decision (who, when, approved or refused).
    Runs {
        pipeline: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a run's log (redacted).
    Logs {
        /// A run id, or a pipeline id (its latest run).
        run: String,
        /// Keep printing until the run ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Open a shell in a container on a pipeline's workspace, hardened like an agent's.
    Shell {
        pipeline: String,
        /// The agent profile whose image and limits to use (default: the pipeline's).
        #[arg(long)]
        agent: Option<String>,
    },
    /// Run the daemon: the web chat and dashboard, the Slack and Discord bots when
    /// configured, and every queued or interrupted run.
    Serve {
        /// Exit once nothing is queued or running (for scripts and cron); no web server.
        #[arg(long)]
        until_idle: bool,
        /// A repository the chat may use, named after its directory (repeatable); adds to
        /// the [repos] of the config.
        #[arg(long = "repo", value_name = "PATH_OR_URL")]
        repos: Vec<String>,
        /// Where the web chat listens (overrides web.listen). Off loopback it needs web.token.
        #[arg(long)]
        listen: Option<String>,
    },
    /// Check Docker, git, the configuration, the store and the images; say what to fix.
    Doctor,
    /// Print the configuration in effect (secrets redacted).
    Config {
        /// Print the built-in defaults instead.
        #[arg(long)]
        default: bool,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The repository: a path (checkout or bare) or a URL.
    #[arg(long)]
    pub repo: String,
    /// The branch to start from (default: `default_base_branch`, "main").
    #[arg(long)]
    pub base: Option<String>,
    #[command(flatten)]
    pub prompt: PromptArgs,
}

#[derive(Debug, Args)]
pub struct FollowUpArgs {
    /// The pipeline (its id, or a unique prefix of it).
    pub pipeline: String,
    #[command(flatten)]
    pub prompt: PromptArgs,
}

/// What `run` and `follow-up` share.
#[derive(Debug, Args)]
pub struct PromptArgs {
    /// The agent profile (default: the pipeline's, else `default_agent`).
    #[arg(long)]
    pub agent: Option<String>,
    /// Makes the command safe to repeat: a second call with the same key starts nothing.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// What the agent should do ("-" reads it from standard input).
    #[arg(required = true, num_args = 1..)]
    pub prompt: Vec<String>,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Queue the run and return at once; `threadline serve` executes it.
    #[arg(long)]
    pub detach: bool,
}

/// Exit codes (also in `--help` and the README): 0 success, 1 the run did not succeed,
/// 2 bad input or setup, 130 interrupted while waiting for a run (a second Ctrl-C).
const FAILED: u8 = 1;
const USAGE: u8 = 2;
const INTERRUPTED: u8 = 130;

pub async fn run(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(USAGE)
        }
    }
}

pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

async fn open(config: Config) -> anyhow::Result<Orchestrator> {
    Ok(Orchestrator::open(Arc::new(config)).await?)
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(&cli)?;
    match cli.command {
        Command::Config { default } => {
            let shown = if default { Config::default() } else { config };
            print!("{}", shown.to_redacted_toml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor => Ok(doctor::doctor(config).await),
        Command::Pipelines { limit, json } => {
            let store = Queries::open(&config.database_url()).await?;
            let list = store.pipelines(limit).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!("no pipelines yet; start one with `threadline run --repo <path> \"<prompt>\"`");
            } else {
                println!("{:<9} {:<11} {:>4}  {:<44} REPO", "ID", "STATE", "RUNS", "BRANCH");
                for s in list {
                    let state = s.latest_state.map(|s| s.as_str()).unwrap_or("-");
                    println!(
                        "{:<9} {:<11} {:>4}  {:<44} {}",
                        s.pipeline.id, state, s.runs, s.pipeline.branch, s.pipeline.repo
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Runs { pipeline, json } => {
            let store = Queries::open(&config.database_url()).await?;
            let Some(p) = store.find_pipeline(&pipeline).await? else {
                anyhow::bail!("no pipeline {pipeline:?}; `threadline pipelines` lists them");
            };
            let redactor = crate::redact::Redactor::new(config.secret_values());
            let mut runs = store.runs(&p.id).await?;
            for r in &mut runs {
                r.prompt = redactor.redact(&r.prompt);
            }
            let pull_request = store.pull_request(&p.id).await?;
            let approvals = store.approvals(&p.id).await?;
            if json {
                let shown = serde_json::json!({
                    "pipeline": p, "runs": runs, "pull_request": pull_request, "approvals": approvals,
                });
                println!("{}", serde_json::to_string_pretty(&shown)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "pipeline {}  {}  branch {}  base {}",
                p.id, p.repo, p.branch, p.base_branch
            );
            println!(
                "{:<12} {:<10} {:>4} {:>8}  {:<10} {:<20} PROMPT",
                "RUN", "STATE", "EXIT", "TIME", "COMMIT", "CHANGES"
            );
            for r in runs {
                let exit = r.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
                let time = r.duration_millis().map(format_duration).unwrap_or_else(|| "-".into());
                let commit = r.head_commit.as_deref().map(|c| &c[..10.min(c.len())]).unwrap_or("-");
                let changes = match (&r.diffstat, r.changed) {
                    (Some(d), true) => d.short(),
                    (Some(_), false) => "no changes".into(),
                    _ => "-".into(),
                };
                let prompt: String = r.prompt.lines().next().unwrap_or_default().chars().take(50).collect();
                println!(
                    "{:<12} {:<10} {:>4} {:>8}  {:<10} {:<20} {}",
                    r.id, r.state, exit, time, commit, changes, prompt
                );
                if let Some(e) = &r.error {
                    println!("{:<12} └ {}", "", e);
                }
            }
            if let Some(pr) = pull_request {
                let how = if pr.found { "found, opened by hand" } else { "opened" };
                println!(
                    "\npull request #{} {} ({how}; approved by {})",
                    pr.number, pr.url, pr.opened_by
                );
            }
            if !approvals.is_empty() {
                println!("\nOPEN PR DECISIONS");
                for a in approvals {
                    let when = format!("{:>8} ago", format_duration(now_millis() - a.at));
                    let decision = if a.approved { "approved" } else { "refused" };
                    println!("{when}  {:<24} {decision:<8} {}  {}", a.actor, a.run_id, a.reason);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { run, follow } => {
            let store = Queries::open(&config.database_url()).await?;
            let run = find_run(&store, &run).await?;
            let path = crate::orchestrator::log_path(&config.data_dir, &run.id);
            if follow {
                let end = watch(&store, &path, &run.id, |_| {}, |line| println!("{line}")).await?;
                Ok(exit_for(&end))
            } else {
                match std::fs::read_to_string(&path) {
                    // Written cleaned; cleaned again for logs older than that.
                    Ok(text) => print!("{}", crate::untrusted::clean(&text)),
                    Err(_) if !run.log_tail.is_empty() => println!("{}", run.log_tail),
                    Err(_) => eprintln!("run {} has no log yet (it is {})", run.id, run.state),
                }
                Ok(ExitCode::SUCCESS)
            }
        }
        Command::Cancel { target } => {
            let orch = open(config).await?;
            let done = orch.cancel(&target).await?;
            if done.dequeued.is_empty() && done.stopping.is_empty() {
                println!("nothing to cancel: {target} has no unfinished run");
            }
            for id in &done.dequeued {
                println!("cancelled {id} (it had not started)");
            }
            for id in &done.stopping {
                println!("stopping {id}; its work so far is committed and pushed");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve {
            until_idle,
            repos,
            listen,
        } => {
            let mut config = config;
            add_repos(&mut config, &repos)?;
            if let Some(addr) = listen {
                config.web.listen = addr;
            }
            config.validate(cli.config.as_deref())?;
            serve(config, until_idle).await
        }
        Command::Shell { pipeline, agent } => shell(config, &pipeline, agent.as_deref()).await,
        Command::Run(args) => {
            let orch = open(config).await?;
            let submitted = orch
                .submit_pipeline(NewPipeline {
                    repo: args.repo,
                    base_branch: args.base,
                    agent: args.prompt.agent,
                    prompt: read_prompt(&args.prompt.prompt)?,
                    requested_by: whoami(),
                    origin: Origin::cli(),
                    idempotency_key: args.prompt.idempotency_key,
                })
                .await?;
            execute_and_watch(orch, submitted, args.prompt.watch.detach).await
        }
        Command::FollowUp(args) => {
            let orch = open(config).await?;
            let submitted = orch
                .submit_follow_up(FollowUp {
                    pipeline_id: args.pipeline,
                    prompt: read_prompt(&args.prompt.prompt)?,
                    agent: args.prompt.agent,
                    requested_by: whoami(),
                    idempotency_key: args.prompt.idempotency_key,
                })
                .await?;
            execute_and_watch(orch, submitted, args.prompt.watch.detach).await
        }
        Command::Retry { run, watch } => {
            let orch = open(config).await?;
            let submitted = orch.retry(&run, &whoami(), None).await?;
            execute_and_watch(orch, submitted, watch.detach).await
        }
    }
}

/// Resolves a run id; a pipeline id means its latest run. Needs only the store.
async fn find_run(store: &Queries, id: &str) -> anyhow::Result<Run> {
    store
        .find_run(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no run {id:?}; `threadline runs <PIPELINE>` lists them"))
}

fn read_prompt(words: &[String]) -> anyhow::Result<String> {
    if words.len() == 1 && words[0] == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        return Ok(text);
    }
    Ok(words.join(" "))
}

fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "cli".into())
}

async fn execute_and_watch(orch: Orchestrator, submitted: Submitted, detach: bool) -> anyhow::Result<ExitCode> {
    let Submitted {
        pipeline,
        run,
        created,
        ahead,
    } = submitted;
    println!("pipeline {}  repo {}", pipeline.id, pipeline.repo);
    println!("branch   {}  (from {})", pipeline.branch, pipeline.base_branch);
    println!("run      {}  agent {}", run.id, run.agent);
    if !created {
        println!(
            "(this request was made before: showing run {} instead of starting another)",
            run.id
        );
    }
    if ahead > 0 {
        println!("queued behind {ahead} earlier run(s) of this pipeline");
    }
    if detach {
        println!(
            "queued; `threadline serve` runs it. Follow it with `threadline logs --follow {}`",
            run.id
        );
        return Ok(ExitCode::SUCCESS);
    }
    orch.start(Scope::Pipeline(pipeline.id.clone())).await?;
    let run_id = run.id.clone();
    let created_at = run.created_at;
    let watcher = {
        let orch = orch.clone();
        let run_id = run_id.clone();
        async move {
            let started = created_at;
            watch(
                &orch.queries(),
                &orch.log_path(&run_id),
                &run_id,
                move |e: &RunEvent| {
                    let detail = match e.state {
                        RunState::Running if e.detail.is_empty() => format!("in {}", container_name(&e.run_id)),
                        _ => e.detail.clone(),
                    };
                    println!("[{}] {} {}", format_duration(e.at - started), e.state, detail);
                },
                |line| println!("  │ {line}"),
            )
            .await
        }
    };
    tokio::pin!(watcher);
    let mut interrupts = 0;
    let end = loop {
        tokio::select! {
            end = &mut watcher => break end?,
            _ = tokio::signal::ctrl_c() => {
                interrupts += 1;
                if interrupts == 1 {
                    eprintln!(
                        "cancelling {run_id}: its work so far is saved (Ctrl-C again stops waiting; the cancel goes on)"
                    );
                    orch.cancel(&run_id).await?;
                } else {
                    eprintln!(
                        "stopped waiting; {run_id} is cancelled, and `threadline serve` (or the next `threadline run` \
                         on this pipeline) finishes saving its work"
                    );
                    return Ok(ExitCode::from(INTERRUPTED));
                }
            }
        }
    };
    print_outcome(&orch, &end).await;
    orch.shutdown().await;
    Ok(exit_for(&end))
}

fn exit_for(run: &Run) -> ExitCode {
    if run.state == RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED)
    }
}

async fn print_outcome(orch: &Orchestrator, run: &Run) {
    let pipeline = orch.queries().pipeline(&run.pipeline_id).await.ok().flatten();
    let took = run.duration_millis().map(format_duration).unwrap_or_default();
    let mark = if run.state == RunState::Succeeded { "✔" } else { "✘" };
    let exit = run.exit_code.map(|c| format!(" (exit {c})")).unwrap_or_default();
    println!("{mark} {} in {took}{exit}", run.state);
    if let Some(e) = &run.error {
        println!("  {e}");
    }
    if let Some(p) = pipeline {
        let place = if p.local_only {
            format!(
                "kept in Threadline's mirror; to get it: git fetch {} {}",
                orch.mirror_path(&p).display(),
                p.branch
            )
        } else {
            format!("on {}", p.remote_url)
        };
        let pushed = match (&run.push_error, run.pushed) {
            (Some(e), _) => format!("not pushed: {e}"),
            (None, true) => format!("pushed, {place}"),
            (None, false) if run.changed => "not pushed".to_owned(),
            (None, false) => "unchanged".to_owned(),
        };
        println!("branch  {}  ({pushed})", p.branch);
    }
    if let Some(c) = &run.head_commit {
        println!("commit  {c}");
    }
    match (&run.diffstat, run.changed) {
        (Some(d), true) => println!("changes {d}"),
        (Some(_), false) => println!("changes none: the agent changed nothing, so no commit was made"),
        _ => {}
    }
    if let Some(s) = &run.summary {
        println!("summary {s}");
    }
}

/// Follows a run through the store and its log file until it ends, whichever process
/// executes it. Calls `on_state` on each new state and `on_line` on each log line.
pub async fn watch(
    store: &Queries,
    path: &std::path::Path,
    run_id: &str,
    mut on_event: impl FnMut(&RunEvent),
    mut on_line: impl FnMut(&str),
) -> anyhow::Result<Run> {
    let mut offset = 0usize;
    let mut partial = String::new();
    let mut seen = 0;
    let mut quiet_since = tokio::time::Instant::now();
    loop {
        let run = find_run(store, run_id).await?;
        // Every transition, even those quicker than a poll; log lines belong after
        // `running` and before `saving`.
        let events = store.events(&run.id).await?;
        let fresh = events.get(seen..).unwrap_or_default();
        seen = events.len();
        let (early, late): (Vec<&RunEvent>, Vec<&RunEvent>) = fresh
            .iter()
            .partition(|e| matches!(e.state, RunState::Queued | RunState::Preparing | RunState::Running));
        early.into_iter().for_each(&mut on_event);
        if !fresh.is_empty() {
            quiet_since = tokio::time::Instant::now();
        }
        if let Ok(bytes) = std::fs::read(path) {
            if bytes.len() < offset {
                offset = 0; // rewritten from the start after a restart
            }
            if bytes.len() > offset {
                partial.push_str(&String::from_utf8_lossy(&bytes[offset..]));
                offset = bytes.len();
                while let Some(pos) = partial.find('\n') {
                    let line: String = partial.drain(..=pos).collect();
                    on_line(line.trim_end_matches('\n'));
                }
                quiet_since = tokio::time::Instant::now();
            }
        }
        late.into_iter().for_each(&mut on_event);
        if run.state.is_terminal() {
            if !partial.is_empty() {
                on_line(&partial);
            }
            return Ok(run);
        }
        if quiet_since.elapsed() >= Duration::from_secs(15) && std::io::stdout().is_terminal() {
            println!(
                "… still {} ({} so far)",
                run.state,
                format_duration(now_millis() - run.created_at)
            );
            let _ = std::io::stdout().flush();
            quiet_since = tokio::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

async fn serve(config: Config, until_idle: bool) -> anyhow::Result<ExitCode> {
    if until_idle {
        let orch = open(config).await?;
        orch.start(Scope::All).await?;
        tokio::select! {
            idle = orch.wait_until_idle(&Scope::All) => idle?,
            signal = stop_signal() => eprintln!("threadline: {signal}: stopping"),
        }
        orch.shutdown().await;
        return Ok(ExitCode::SUCCESS);
    }
    // Bound first: a bad or unsafe address fails before anything starts.
    let listeners = crate::daemon::Listeners::bind(&config).await?;
    let orch = open(config).await?;
    match listeners.web_addr() {
        Some(addr) => {
            let repos = orch.config().repos.keys().cloned().collect::<Vec<_>>().join(", ");
            eprintln!(
                "threadline: web chat and dashboard on http://{addr}/ (repositories: {}); Ctrl-C stops",
                if repos.is_empty() {
                    "none yet: pass --repo PATH".to_owned()
                } else {
                    repos
                }
            );
        }
        None => eprintln!("threadline: executing queued runs (web chat disabled); Ctrl-C stops"),
    }
    if let Some(addr) = listeners.slack_events_addr() {
        eprintln!("threadline: Slack Events API on http://{addr}/slack/events (point your public URL there)");
    }
    eprintln!(
        "threadline: at most {} runs at once; running agents keep going across restarts",
        orch.config().max_concurrent_runs
    );
    let shutdown = async {
        let signal = stop_signal().await;
        eprintln!("threadline: {signal}: stopping; running agents keep going and the next start adopts them");
    };
    crate::daemon::serve(orch, listeners, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves at the first SIGINT (Ctrl-C) or SIGTERM (`systemctl stop`, `docker stop`),
/// naming it. `serve` then stops taking work, answers what is in flight, releases its
/// lease and exits 0 within seconds; agents keep running and are adopted at the next start.
async fn stop_signal() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops gracefully");
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

/// Adds `--repo` paths or URLs to the configured repositories, named after their last
/// path component.
fn add_repos(config: &mut Config, repos: &[String]) -> anyhow::Result<()> {
    for url in repos {
        let resolved = std::fs::canonicalize(url)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| url.clone());
        let base = resolved
            .trim_end_matches('/')
            .rsplit(['/', ':'])
            .next()
            .unwrap_or("repo")
            .trim_end_matches(".git")
            .to_owned();
        let mut name = if base.is_empty() { "repo".to_owned() } else { base };
        let mut n = 2;
        while config.repos.contains_key(&name) {
            name = format!("{}-{n}", name.trim_end_matches(char::is_numeric).trim_end_matches('-'));
            n += 1;
        }
        config.repos.insert(
            name,
            crate::config::RepoConfig {
                url: resolved,
                ..Default::default()
            },
        );
    }
    Ok(())
}

/// Makes `owner` the owner of every entry of a work tree, never following a link.
fn hand_over(ws: &std::path::Path, owner: (u32, u32)) -> std::io::Result<()> {
    let how = crate::orchestrator::scrub::Walk {
        owner: Some(owner),
        scrub: false,
    };
    crate::orchestrator::scrub::walk(ws, how).map(drop)
}

async fn shell(config: Config, pipeline: &str, agent: Option<&str>) -> anyhow::Result<ExitCode> {
    let orch = open(config).await?;
    let Some(p) = orch.queries().find_pipeline(pipeline).await? else {
        anyhow::bail!("no pipeline {pipeline:?}; `threadline pipelines` lists them");
    };
    let agent_name = agent.unwrap_or(&p.agent);
    let Some(profile) = orch.config().agent(agent_name).cloned() else {
        anyhow::bail!(
            "no agent {agent_name:?}; known: {}",
            orch.config().agent_names().join(", ")
        );
    };
    // The daemon must have the work tree to itself while it prepares or saves.
    if let Some(active) = orch.queries().runs(&p.id).await?.iter().find(|r| r.state.is_active()) {
        anyhow::bail!(
            "run {} of pipeline {} is {}; open a shell once it has finished (`threadline logs --follow {}`)",
            active.id,
            p.id,
            active.state,
            active.id
        );
    }
    let ws = orch.workspace_path(&p.id);
    if !ws.exists() {
        anyhow::bail!("pipeline {} has no workspace yet: its first run has not started", p.id);
    }
    let context = ws.with_extension("shell-context");
    std::fs::create_dir_all(context.join("objects"))?;
    let me = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&ws)?;
        (m.uid(), m.gid())
    };
    let user = if me.0 == 0 { (1000, 1000) } else { me };
    if user != me {
        hand_over(&ws, user)?;
    }
    let spec = AgentSpec {
        name: format!("threadline-shell-{}", p.id),
        image: profile.image.clone(),
        argv: vec!["sh".into()],
        env: Vec::new(),
        user: format!("{}:{}", user.0, user.1),
        workspace: ws.clone(),
        context: context.clone(),
        objects: Some(orch.objects_path(&p.id)),
        labels: [("threadline.pipeline".to_owned(), p.id.clone())].into(),
        memory_bytes: (profile.memory_mb * 1024 * 1024) as i64,
        nano_cpus: (profile.cpus * 1e9) as i64,
        pids_limit: profile.pids_limit,
        network: profile.network.clone(),
        read_only_rootfs: profile.read_only_rootfs,
        log_file_bytes: 0,
    };
    eprintln!(
        "shell on {} (branch {}); changes are committed with the pipeline's next run",
        ws.display(),
        p.branch
    );
    let status = std::process::Command::new("docker")
        .args(spec.docker_run_args(std::io::stdin().is_terminal()))
        .status();
    if user != me {
        hand_over(&ws, me)?;
    }
    let _ = std::fs::remove_dir_all(&context);
    match status {
        Ok(s) if s.success() => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::from(FAILED)),
        Err(e) => anyhow::bail!("cannot run the docker command ({e}); is the docker CLI installed?"),
    }
}
