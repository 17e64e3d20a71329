//! `threadline serve`: binds, says where it listens, and runs the daemon until SIGINT or
//! SIGTERM.

use std::process::ExitCode;

use super::open;
use crate::config::Config;
use crate::orchestrator::{Role, Scope};

/// `threadline worker`: executes runs until SIGINT or SIGTERM.
pub(super) async fn worker(config: Config) -> anyhow::Result<ExitCode> {
    let orch = open(config).await?;
    if orch.config().database_url().starts_with("sqlite") {
        eprintln!(
            "threadline: note: the database is SQLite ({}): workers on other hosts cannot share it; set database_url to a PostgreSQL server to scale out",
            orch.config().database_url()
        );
    }
    orch.start_as(Scope::All, Role::Worker).await?;
    let labels = &orch.config().worker.labels;
    eprintln!(
        "threadline: worker {} executing runs on this host's Docker engine, at most {} at once{}; Ctrl-C stops",
        orch.worker_name(),
        orch.config().max_concurrent_runs,
        if labels.is_empty() {
            String::new()
        } else {
            format!(" (labels: {})", labels.join(", "))
        }
    );
    let signal = stop_signal().await;
    eprintln!("threadline: {signal}: stopping; running agents keep going and the next start adopts them");
    orch.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn serve(config: Config, until_idle: bool, role: Role) -> anyhow::Result<ExitCode> {
    if role == Role::FrontEnd && !config.database_url().starts_with("postgres") {
        anyhow::bail!(
            "`serve --no-worker` needs database_url to be a PostgreSQL server shared with the workers: a front end learns of the runs they execute through PostgreSQL's notifications"
        );
    }
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
    let orch = if role == Role::FrontEnd {
        crate::orchestrator::Orchestrator::open_front_end(std::sync::Arc::new(config)).await?
    } else {
        open(config).await?
    };
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
    if role == Role::FrontEnd {
        eprintln!(
            "threadline: executing no runs here (--no-worker): `threadline worker` processes on this database do"
        );
    } else {
        eprintln!(
            "threadline: at most {} runs at once; running agents keep going across restarts",
            orch.config().max_concurrent_runs
        );
    }
    let shutdown = async {
        let signal = stop_signal().await;
        eprintln!("threadline: {signal}: stopping; running agents keep going and the next start adopts them");
    };
    crate::daemon::serve_as(orch, listeners, role, shutdown).await?;
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
pub(super) fn add_repos(config: &mut Config, repos: &[String]) -> anyhow::Result<()> {
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
