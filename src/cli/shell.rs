//! `threadline shell`: a shell in a container on a pipeline's workspace, hardened like an
//! agent's.

use std::io::IsTerminal;
use std::process::ExitCode;

use super::{FAILED, open};
use crate::config::Config;
use crate::orchestrator::container::AgentSpec;

pub(super) async fn shell(config: Config, pipeline: &str, agent: Option<&str>) -> anyhow::Result<ExitCode> {
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
    if let Some((name, host)) = orch.workspace_elsewhere(&p.id).await? {
        anyhow::bail!(
            "pipeline {}'s workspace is on worker {name} (host {host}): run `threadline shell {}` there",
            p.id,
            p.id
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
        crate::orchestrator::scrub::hand_over(&ws, user)?;
    }
    // The repository's environment, as the pipeline's runs have it (not built here).
    let image = orch.existing_environment(&p, &profile, user).await;
    let spec = AgentSpec {
        name: format!("threadline-shell-{}", p.id),
        image: image.image,
        argv: vec!["sh".into()],
        env: Vec::new(),
        user: format!("{}:{}", user.0, user.1),
        workspace: ws.clone(),
        workspace_read_only: false,
        context: context.clone(),
        state: None,
        objects: Some(orch.objects_path(&p.id)),
        labels: [("threadline.pipeline".to_owned(), p.id.clone())].into(),
        memory_bytes: (profile.memory_mb * 1024 * 1024) as i64,
        nano_cpus: (profile.cpus * 1e9) as i64,
        pids_limit: profile.pids_limit,
        // A shell has no egress proxy: an allowlisted agent's shell gets no network.
        network: match orch.repo_settings(&p).1.environment.network.clone() {
            Some(n) if n != "allowlist" => n,
            Some(_) => "none".into(),
            None if profile.network == "allowlist" => "none".into(),
            None => profile.network.clone(),
        },
        dns: profile.dns.clone(),
        volumes: image.volumes,
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
        crate::orchestrator::scrub::hand_over(&ws, me)?;
    }
    let _ = std::fs::remove_dir_all(&context);
    match status {
        Ok(s) if s.success() => Ok(ExitCode::SUCCESS),
        Ok(_) => Ok(ExitCode::from(FAILED)),
        Err(e) => anyhow::bail!("cannot run the docker command ({e}); is the docker CLI installed?"),
    }
}
