//! `threadline doctor`: checks everything a run needs and says what to fix.

use std::process::ExitCode;

use crate::config::Config;
use crate::model::RunState;
use crate::orchestrator::ContainerRuntime;
use crate::orchestrator::Queries;

struct Report {
    failures: usize,
}

impl Report {
    fn ok(&self, what: &str) {
        println!("ok    {what}");
    }
    fn warn(&self, what: &str, fix: &str) {
        println!("warn  {what}\n      → {fix}");
    }
    fn fail(&mut self, what: &str, fix: &str) {
        self.failures += 1;
        println!("FAIL  {what}\n      → {fix}");
    }
}

pub async fn doctor(config: Config) -> ExitCode {
    let mut r = Report { failures: 0 };
    r.ok(&format!(
        "configuration valid ({} agents: {}; at most {} runs at once)",
        config.agents.len(),
        config.agent_names().join(", "),
        config.max_concurrent_runs
    ));

    for (name, enabled, channels) in [
        ("slack", config.slack.enabled, config.slack.channels.len()),
        ("discord", config.discord.enabled, config.discord.channels.len()),
    ] {
        match (enabled, channels) {
            (false, _) => {}
            (true, 0) => r.warn(
                &format!("{name} is enabled but no channel is bound: every mention will be told how to bind one"),
                &format!("add [{name}.channels.<CHANNEL_ID>] with repos = [\"NAME\"] (see the README)"),
            ),
            (true, n) => r.ok(&format!("{name} enabled, {n} channel(s) bound")),
        }
    }
    if config.slack.enabled && config.slack.mode == crate::config::SlackMode::Events {
        r.ok(&format!(
            "slack: Events API on {}/slack/events; Slack must reach it through your public URL",
            config.slack.events_listen
        ));
    }

    match std::fs::create_dir_all(&config.data_dir).and_then(|_| {
        let probe = config.data_dir.join(".doctor-probe");
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(probe)
    }) {
        Ok(()) => r.ok(&format!("data directory {} is writable", config.data_dir.display())),
        Err(e) => r.fail(
            &format!("data directory {} is not writable: {e}", config.data_dir.display()),
            "set data_dir (or --data-dir) to a directory this user can write",
        ),
    }

    match Queries::open(&config.database_url()).await {
        Ok(store) => {
            r.ok("database opens and its schema is up to date");
            if let Ok(active) = store.runs_in_states(&RunState::ACTIVE).await
                && !active.is_empty()
            {
                r.warn(
                    &format!("{} run(s) are in progress or were interrupted", active.len()),
                    "if no Threadline process is running, `threadline serve` finishes them",
                );
            }
        }
        Err(e) => r.fail(&format!("database: {e}"), "check database_url and the data directory"),
    }

    let v = git2::Version::get();
    let (maj, min, rev) = v.libgit2_version();
    r.ok(&format!(
        "libgit2 {maj}.{min}.{rev} (https: {}, ssh: {})",
        v.https(),
        v.ssh()
    ));
    if config.git.token.is_empty() && std::env::var_os("SSH_AUTH_SOCK").is_none() {
        r.warn(
            "no git token and no ssh-agent: pushes to remote repositories that need authentication will fail",
            "set git.token or THREADLINE_GIT_TOKEN, or start ssh-agent with your key (local repositories need neither)",
        );
    } else {
        r.ok("git credentials available (token or ssh-agent)");
    }

    for (name, repo) in &config.repos {
        let source = match crate::orchestrator::workspace::resolve_repo(&repo.url) {
            Ok(source) => source,
            Err(e) => {
                r.fail(&format!("repo {name}: {e}"), &format!("fix repos.{name}.url"));
                continue;
            }
        };
        if source.local_only {
            r.ok(&format!("repo {name}: local-only (no remote), so no pull requests"));
            continue;
        }
        match crate::orchestrator::forge::resolve(&source.remote_url, &repo.forge) {
            Ok(Some(target)) if repo.forge.token.is_empty() && config.git.token.is_empty() => r.warn(
                &format!(
                    "repo {name}: {} {} has no token: Open PR will fail",
                    target.kind.name(),
                    target.project
                ),
                &format!("set repos.{name}.forge.token (or git.token)"),
            ),
            Ok(Some(target)) => r.ok(&format!(
                "repo {name}: pull requests on {} {} ({})",
                target.kind.name(),
                target.project,
                target.api_url
            )),
            Ok(None) => r.warn(
                &format!("repo {name}: no forge is known for its remote, so Open PR is not offered"),
                &format!("set repos.{name}.forge.kind (github, gitlab or gitea) if it has one"),
            ),
            Err(reason) => r.fail(
                &format!("repo {name}: forge settings: {reason}"),
                &format!("fix [repos.{name}.forge]"),
            ),
        }
    }

    match ContainerRuntime::connect().await {
        Err(e) => r.fail(&format!("docker: {e}"), "start Docker, or set DOCKER_HOST"),
        Ok(runtime) => {
            match runtime.version().await {
                Ok(v) => {
                    r.ok(&format!("docker engine {v}"));
                    // Before 26 (and 25.0.4, 23.0.11) Docker's DNS on internal networks
                    // forwards outside lookups: a way out for allowlisted agents.
                    let major: u32 = v.split('.').next().and_then(|m| m.trim().parse().ok()).unwrap_or(0);
                    let allowlisted = config.agents.values().any(|a| a.network == "allowlist");
                    if allowlisted && major < 26 {
                        r.warn(
                            &format!(
                                "docker {v}: its DNS on internal networks can forward lookups outside (CVE-2024-29018), a way out for agents on the egress allowlist"
                            ),
                            "upgrade the Docker engine to 26 or later",
                        );
                    }
                }
                Err(e) => r.fail(&format!("docker: {e}"), "start Docker, or set DOCKER_HOST"),
            }
            for (name, agent) in &config.agents {
                match runtime.ensure_image(&agent.image).await {
                    Ok(()) => r.ok(&format!("agent {name}: image {} present", agent.image)),
                    Err(e) if name == &config.default_agent => r.fail(
                        &format!("agent {name} (the default): {e}"),
                        "build the image, or pick another default_agent",
                    ),
                    Err(e) => r.warn(&format!("agent {name}: {e}"), "build it before using this agent"),
                }
                for var in &agent.env {
                    if std::env::var_os(var).is_none() {
                        r.warn(
                            &format!("agent {name}: {var} is not set"),
                            &format!("export {var} where Threadline runs before using this agent"),
                        );
                    }
                }
            }
        }
    }

    // Each repository's environment, as its next run would have it.
    let with_env: Vec<&String> = config.repos.keys().collect();
    if !with_env.is_empty()
        && let Ok(orch) = crate::orchestrator::Orchestrator::open(std::sync::Arc::new(config.clone())).await
    {
        for name in with_env {
            match orch.check_environment(name).await {
                Ok(None) => r.ok(&format!(
                    "repo {name}: no environment (agents run on their profile's image)"
                )),
                Ok(Some((tag, true))) => r.ok(&format!("repo {name}: environment {tag} is built")),
                Ok(Some((tag, false))) => r.warn(
                    &format!("repo {name}: environment {tag} is not built yet: the next run builds it"),
                    &format!("threadline env build {name}"),
                ),
                Err(e) => r.fail(
                    &format!("repo {name}: {e}"),
                    &format!("fix [repos.{name}.environment] or the repository's setup files"),
                ),
            }
        }
    }

    if r.failures == 0 {
        println!("\nall checks passed");
        ExitCode::SUCCESS
    } else {
        println!("\n{} check(s) failed", r.failures);
        ExitCode::from(1)
    }
}
