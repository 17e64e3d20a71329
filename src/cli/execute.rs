//! The commands that act: `run`, `follow-up`, `retry` (which execute their own runs in
//! the foreground and follow them) and `cancel`.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use super::inspect::find_run;
use super::{FAILED, INTERRUPTED, open};
use crate::config::Config;
use crate::model::{Run, RunEvent, RunState, format_duration, now_millis};
use crate::orchestrator::container::container_name;
use crate::orchestrator::{Orchestrator, Queries, Scope, Submitted};

/// `threadline cancel`
pub(super) async fn cancel(config: Config, target: &str) -> anyhow::Result<ExitCode> {
    let orch = open(config).await?;
    let done = orch.cancel(target).await?;
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

pub(super) fn read_prompt(words: &[String]) -> anyhow::Result<String> {
    if words.len() == 1 && words[0] == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
        return Ok(text);
    }
    Ok(words.join(" "))
}

pub(super) fn whoami() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "cli".into())
}

pub(super) async fn execute_and_watch(
    orch: Orchestrator,
    submitted: Submitted,
    detach: bool,
) -> anyhow::Result<ExitCode> {
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

pub(super) fn exit_for(run: &Run) -> ExitCode {
    if run.state == RunState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(FAILED)
    }
}

pub(super) async fn print_outcome(orch: &Orchestrator, run: &Run) {
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
