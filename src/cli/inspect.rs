//! The commands that read: `pipelines`, `runs`, `logs`. They open the store's read side
//! only, so they work beside a running daemon and without Docker.

use std::process::ExitCode;

use super::execute::{exit_for, watch};
use crate::config::Config;
use crate::model::{Run, RunMode, format_duration, now_millis};
use crate::orchestrator::Queries;

/// `threadline workers`
pub(super) async fn workers(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let store = Queries::open(&config.database_url()).await?;
    let list = store.instances().await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        println!(
            "no Threadline process holds a lease on this database; start `threadline serve` or `threadline worker`"
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<20} {:<10} {:<20} {:>7} {:>4}  {:<12} LEASE",
        "NAME", "ROLE", "HOST", "PID", "RUNS", "LABELS"
    );
    for i in list {
        let lease = if i.silent_ms > crate::orchestrator::LEASE_MILLIS {
            format!("expired {} ago", format_duration(i.silent_ms))
        } else {
            format!("renewed {:.1} s ago", i.silent_ms as f64 / 1000.0)
        };
        println!(
            "{:<20} {:<10} {:<20} {:>7} {:>4}  {:<12} {lease}",
            i.worker_name,
            if i.worker_id.is_empty() { "front end" } else { "worker" },
            i.hostname,
            i.pid,
            i.active_runs,
            if i.labels.is_empty() {
                "-".to_owned()
            } else {
                i.labels.join(",")
            },
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `threadline pipelines`
pub(super) async fn pipelines(config: &Config, limit: i64, json: bool) -> anyhow::Result<ExitCode> {
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

/// `threadline runs`
pub(super) async fn runs(config: &Config, pipeline: &str, json: bool) -> anyhow::Result<ExitCode> {
    let store = Queries::open(&config.database_url()).await?;
    let Some(p) = store.find_pipeline(pipeline).await? else {
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
        let mut prompt: String = r.prompt.lines().next().unwrap_or_default().chars().take(50).collect();
        if r.mode == RunMode::Ask {
            prompt.insert_str(0, "(ask) ");
        }
        println!(
            "{:<12} {:<10} {:>4} {:>8}  {:<10} {:<20} {}",
            r.id, r.state, exit, time, commit, changes, prompt
        );
        if let Some(e) = &r.error {
            println!("{:<12} └ {}", "", e);
        }
        if let Some(usage) = r.usage.describe() {
            println!("{:<12} └ {usage}", "");
        }
        if let Some(answer) = &r.summary {
            // The agent's own words: cleaned again, in case they were stored before.
            let answer = crate::untrusted::clean(&redactor.redact(answer));
            let lines: Vec<&str> = answer.lines().collect();
            for line in lines.iter().take(ANSWER_LINES_SHOWN) {
                println!("{:<12} │ {line}", "");
            }
            if lines.len() > ANSWER_LINES_SHOWN {
                println!(
                    "{:<12} │ … {} more lines (--json has them all)",
                    "",
                    lines.len() - ANSWER_LINES_SHOWN
                );
            }
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

/// How much of a run's answer `threadline runs` prints.
const ANSWER_LINES_SHOWN: usize = 12;

/// `threadline logs`
pub(super) async fn logs(config: &Config, run: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let store = Queries::open(&config.database_url()).await?;
    let run = find_run(&store, run).await?;
    let path = crate::orchestrator::log_path(&config.data_dir, &run.id);
    if follow {
        let end = watch(&store, &path, &run.id, |_| {}, |line| println!("{line}")).await?;
        Ok(exit_for(&end))
    } else {
        match std::fs::read_to_string(&path) {
            // Written cleaned; cleaned again for logs older than that.
            Ok(text) => print!("{}", crate::untrusted::clean(&text)),
            Err(_) => {
                // Executed on another host: its whole log is there; the tail is stored.
                if let Some((name, host)) = store.worker_of_run(&run.id).await? {
                    eprintln!(
                        "run {} is on worker {name} (host {host}): its whole log is in that worker's data_dir; the stored tail follows",
                        run.id
                    );
                }
                if run.log_tail.is_empty() {
                    eprintln!("run {} has no log yet (it is {})", run.id, run.state);
                } else {
                    println!("{}", run.log_tail);
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}

/// Resolves a run id; a pipeline id means its latest run. Needs only the store.
pub(super) async fn find_run(store: &Queries, id: &str) -> anyhow::Result<Run> {
    store
        .find_run(id)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no run {id:?}; `threadline runs <PIPELINE>` lists them"))
}
