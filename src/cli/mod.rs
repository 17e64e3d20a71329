//! The command line: `threadline run`, `follow-up`, `serve`, and the commands that inspect
//! and steer pipelines. Parses nothing itself beyond clap; all work is the orchestrator's.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::model::{Origin, RunMode};
use crate::orchestrator::{FollowUp, NewAttachment, NewPipeline, Orchestrator, Role, SubmitError};

mod doctor;
mod execute;
mod inspect;
mod serve;
mod shell;

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
        /// Execute no runs here: only the front ends (chat, web, API). Runs are executed
        /// by `threadline worker` processes sharing the same PostgreSQL database.
        #[arg(long)]
        no_worker: bool,
    },
    /// Execute runs on this host's Docker engine, sharing the configured database (PostgreSQL)
    /// with other workers and with `serve`; touches no chat platform. Takes the runs its
    /// labels allow, up to max_concurrent_runs at once, and takes over the runs of workers
    /// whose lease expired. Ctrl-C or SIGTERM stops taking runs; running agents keep going:
    /// the next start here adopts them, or after 30 s another worker takes them over.
    Worker {
        /// This worker's name, shown to people (overrides worker.name; default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// A label runs may require, e.g. gpu (repeatable; overrides worker.labels).
        #[arg(long = "label", value_name = "LABEL")]
        labels: Vec<String>,
        /// Runs executed here at once (overrides max_concurrent_runs).
        #[arg(long)]
        max_runs: Option<u32>,
    },
    /// List the processes sharing the database: workers (name, host, labels, runs) and
    /// front ends, with how long since each renewed its lease.
    Workers {
        #[arg(long)]
        json: bool,
    },
    /// Manage repository environments: the images agents run in, built from a setup
    /// script or a devcontainer on the base branch.
    #[command(subcommand)]
    Env(EnvCommand),
    /// Copy everything this installation stored (pipelines, runs, pull requests,
    /// approvals, thread context) into another, empty database, e.g. from the SQLite default
    /// to PostgreSQL; then point `database_url` at it. Stop `serve` first.
    MigrateStore {
        /// The destination, e.g. postgres://user:password@host/threadline (migrated first).
        #[arg(long)]
        to: String,
        /// The source (default: the configured store).
        #[arg(long)]
        from: Option<String>,
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

#[derive(Debug, Subcommand)]
pub enum EnvCommand {
    /// Build a repository's environment now (from its base branch as the remote has it),
    /// or say that the one its inputs call for is built already.
    Build {
        /// The repository, by its name under [repos].
        repo: String,
        /// The agent profile whose image it builds on (default: the repository's).
        #[arg(long)]
        agent: Option<String>,
    },
    /// List the environment images.
    Ls {
        /// Only this repository's.
        repo: Option<String>,
    },
    /// Remove environment images (those a container uses stay); runs build them again.
    Rm {
        /// Only this repository's.
        repo: Option<String>,
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
    /// Ask a question instead: the agent answers on a read-only workspace and nothing
    /// is committed.
    #[arg(long)]
    pub ask: bool,
    /// A file for the agent, under /threadline/attachments/ (repeatable).
    #[arg(long = "attach", value_name = "FILE")]
    pub attach: Vec<PathBuf>,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// What the agent should do ("-" reads it from standard input).
    #[arg(required = true, num_args = 1..)]
    pub prompt: Vec<String>,
}

impl PromptArgs {
    fn mode(&self) -> RunMode {
        if self.ask { RunMode::Ask } else { RunMode::Change }
    }

    fn attachments(&self) -> anyhow::Result<Vec<NewAttachment>> {
        self.attach
            .iter()
            .map(|path| {
                let bytes = std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                Ok(NewAttachment::Upload { name, bytes })
            })
            .collect()
    }
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
            let hint = match e.downcast_ref::<SubmitError>() {
                Some(SubmitError::UnknownPipeline(_)) => "; `threadline pipelines` lists them",
                Some(SubmitError::UnknownRun(_)) => "; `threadline runs <PIPELINE>` lists them",
                _ => "",
            };
            eprintln!("error: {e:#}{hint}");
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
        Command::Env(command) => env(config, command).await,
        Command::MigrateStore { to, from } => {
            let from = from.unwrap_or_else(|| config.database_url());
            let counts = crate::orchestrator::copy_store(&from, &to).await?;
            for (table, n) in counts {
                println!("{table:<16} {n:>8}");
            }
            println!(
                "copied; now set database_url to the destination ({}) and start Threadline again",
                hide_password(&to)
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Pipelines { limit, json } => inspect::pipelines(&config, limit, json).await,
        Command::Runs { pipeline, json } => inspect::runs(&config, &pipeline, json).await,
        Command::Logs { run, follow } => inspect::logs(&config, &run, follow).await,
        Command::Cancel { target } => execute::cancel(config, &target).await,
        Command::Serve {
            until_idle,
            repos,
            listen,
            no_worker,
        } => {
            let mut config = config;
            serve::add_repos(&mut config, &repos)?;
            if let Some(addr) = listen {
                config.web.listen = addr;
            }
            config.validate(cli.config.as_deref())?;
            let role = if no_worker { Role::FrontEnd } else { Role::Both };
            serve::serve(config, until_idle, role).await
        }
        Command::Worker { name, labels, max_runs } => {
            let mut config = config;
            if let Some(name) = name {
                config.worker.name = name;
            }
            if !labels.is_empty() {
                config.worker.labels = labels;
            }
            if let Some(n) = max_runs {
                config.max_concurrent_runs = n;
            }
            config.validate(cli.config.as_deref())?;
            serve::worker(config).await
        }
        Command::Workers { json } => inspect::workers(&config, json).await,
        Command::Shell { pipeline, agent } => shell::shell(config, &pipeline, agent.as_deref()).await,
        Command::Run(args) => {
            let orch = open(config).await?;
            let mode = args.prompt.mode();
            let attachments = args.prompt.attachments()?;
            let submitted = orch
                .submit_pipeline(NewPipeline {
                    repo: args.repo,
                    base_branch: args.base,
                    agent: args.prompt.agent,
                    prompt: execute::read_prompt(&args.prompt.prompt)?,
                    requested_by: execute::whoami(),
                    origin: Origin::cli(),
                    idempotency_key: args.prompt.idempotency_key,
                    mode,
                    attachments,
                })
                .await?;
            execute::execute_and_watch(orch, submitted, args.prompt.watch.detach).await
        }
        Command::FollowUp(args) => {
            let orch = open(config).await?;
            let mode = args.prompt.mode();
            let attachments = args.prompt.attachments()?;
            let submitted = orch
                .submit_follow_up(FollowUp {
                    pipeline_id: args.pipeline,
                    prompt: execute::read_prompt(&args.prompt.prompt)?,
                    agent: args.prompt.agent,
                    requested_by: execute::whoami(),
                    idempotency_key: args.prompt.idempotency_key,
                    mode,
                    attachments,
                })
                .await?;
            execute::execute_and_watch(orch, submitted, args.prompt.watch.detach).await
        }
        Command::Retry { run, watch } => {
            let orch = open(config).await?;
            let submitted = orch.retry(&run, &execute::whoami(), None).await?;
            execute::execute_and_watch(orch, submitted, watch.detach).await
        }
    }
}

/// `threadline env build|ls|rm`.
async fn env(config: Config, command: EnvCommand) -> anyhow::Result<ExitCode> {
    let orch = open(config).await?;
    match command {
        EnvCommand::Build { repo, agent } => {
            let started = std::time::Instant::now();
            eprintln!("preparing the environment of {repo}…");
            match orch.build_environment(&repo, agent.as_deref()).await {
                Ok(Some(tag)) => {
                    println!("{tag} ({:.1} s)", started.elapsed().as_secs_f64());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(None) => {
                    println!(
                        "{repo} has no environment: no setup script, command, devcontainer or caches; its agents run on their profile's image"
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::from(FAILED))
                }
            }
        }
        EnvCommand::Ls { repo } => {
            let images = orch
                .environment_images(repo.as_deref())
                .await
                .map_err(anyhow::Error::msg)?;
            if images.is_empty() {
                println!("no environment images");
            }
            for i in images {
                println!(
                    "{:<20} {:<44} {:>8}  {}",
                    i.repo,
                    i.tag,
                    crate::orchestrator::environment::describe_size(i.size),
                    crate::model::format_utc(i.created * 1000)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        EnvCommand::Rm { repo } => {
            let (removed, kept) = orch
                .remove_environments(repo.as_deref())
                .await
                .map_err(anyhow::Error::msg)?;
            println!("removed {removed} environment image(s); {kept} in use kept");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A database URL with its password left out, for printing.
fn hide_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_end = url[scheme + 3..at].find(':').map_or(at, |i| scheme + 3 + i);
            format!("{}{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    }
}
