//! The run lifecycle in one place: its states, the moves allowed between them, and a
//! pure function from what happened to a run (how its agent ended, how saving went) to
//! its final state and the sentence that explains it. No I/O: the executor does the
//! work and asks [`ending`] what follows; the store persists moves and refuses any that
//! [`RunState::can_transition_to`] does not allow, with state lists in SQL made by
//! [`RunState::sql_list`].

use std::fmt;
use std::str::FromStr;

use crate::model::{Millis, format_duration};

/// The lifecycle of a run. Transitions are only those `can_transition_to` allows;
/// the store refuses any other, so two processes can never move a run twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Queued,
    Preparing,
    Running,
    Saving,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl RunState {
    pub const ALL: [RunState; 8] = [
        RunState::Queued,
        RunState::Preparing,
        RunState::Running,
        RunState::Saving,
        RunState::Succeeded,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Cancelled,
    ];
    pub const UNFINISHED: [RunState; 4] = [
        RunState::Queued,
        RunState::Preparing,
        RunState::Running,
        RunState::Saving,
    ];
    /// States in which a run holds a slot of the concurrency limit.
    pub const ACTIVE: [RunState; 3] = [RunState::Preparing, RunState::Running, RunState::Saving];

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Preparing => "preparing",
            RunState::Running => "running",
            RunState::Saving => "saving",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::TimedOut => "timed_out",
            RunState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::TimedOut | RunState::Cancelled
        )
    }

    pub fn is_active(self) -> bool {
        Self::ACTIVE.contains(&self)
    }

    /// Cancel is accepted in every state that is not terminal.
    pub fn can_cancel(self) -> bool {
        !self.is_terminal()
    }

    /// Retry makes sense once a run has ended without success.
    pub fn can_retry(self) -> bool {
        matches!(self, RunState::Failed | RunState::TimedOut | RunState::Cancelled)
    }

    pub fn can_transition_to(self, next: RunState) -> bool {
        use RunState::*;
        match self {
            Queued => matches!(next, Preparing | Cancelled),
            // Preparation can fail (diverged branch, missing image) or be cancelled
            // before any container exists; nothing is left to save then.
            Preparing => matches!(next, Running | Saving | Failed | Cancelled),
            Running => matches!(next, Saving),
            Saving => matches!(next, Succeeded | Failed | TimedOut | Cancelled),
            Succeeded | Failed | TimedOut | Cancelled => false,
        }
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown run state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for RunState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

/// Why the agent's container stopped; decides the terminal state after saving.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The agent exited on its own (exit code says how).
    Exited,
    TimedOut,
    Cancelled,
    /// The container vanished (removed by hand, engine reset).
    Lost,
    /// The run never reached a container (preparation failed).
    NotStarted,
    /// Stopped when its cost passed its budget.
    OverBudget,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Exited => "exited",
            EndReason::TimedOut => "timed_out",
            EndReason::Cancelled => "cancelled",
            EndReason::Lost => "lost",
            EndReason::NotStarted => "not_started",
            EndReason::OverBudget => "over_budget",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            EndReason::Exited,
            EndReason::TimedOut,
            EndReason::Cancelled,
            EndReason::Lost,
            EndReason::NotStarted,
            EndReason::OverBudget,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

impl RunState {
    /// `('a', 'b')`, for `state IN …` in SQL: the store's lists come from here.
    pub fn sql_list(states: &[RunState]) -> String {
        let quoted: Vec<String> = states.iter().map(|s| format!("'{}'", s.as_str())).collect();
        format!("({})", quoted.join(", "))
    }

    pub const TERMINAL: [RunState; 4] = [
        RunState::Succeeded,
        RunState::Failed,
        RunState::TimedOut,
        RunState::Cancelled,
    ];
}

/// How saving a run's work went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// Nothing to save: the run never reached a workspace.
    NothingToSave,
    /// Committed; pushed unless `push_error` says why not.
    Saved { push_error: Option<String> },
    /// Saving failed; the work is still in the workspace.
    Failed(String),
    /// Saving ran past its limit.
    TimedOut { limit: Millis },
    /// Cancelled while saving.
    Cancelled,
}

/// The final state of a run and, unless it succeeded, what happened in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub state: RunState,
    pub error: Option<String>,
}

/// The limits a run was held to, for the words of its ending.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// The agent's time limit.
    pub time: Millis,
    /// Its budget in US dollars, if it had one.
    pub budget_usd: Option<f64>,
}

/// What a run ends as, from how its agent ended (`reason`, `exit_code`), how saving
/// went, the limits it was held to, and the run's id (named in the hint to its log).
pub fn ending(reason: EndReason, exit_code: Option<i64>, save: &SaveOutcome, limits: &Limits, run_id: &str) -> Ending {
    let agent_limit = limits.time;
    let end = |state, error: Option<String>| Ending { state, error };
    match (save, reason, exit_code) {
        (SaveOutcome::Failed(e), _, _) => end(
            RunState::Failed,
            Some(format!(
                "saving the run's work failed: {e}. The changes are still in the workspace and the next run commits them"
            )),
        ),
        (SaveOutcome::TimedOut { limit }, _, _) => end(
            RunState::Failed,
            Some(format!(
                "saving the run's work took longer than {}; the changes are still in the workspace and the next run commits them",
                format_duration(*limit)
            )),
        ),
        (SaveOutcome::Cancelled, _, _) => end(
            RunState::Cancelled,
            Some("cancelled while its work was being saved; what the save did not finish, the next run commits".into()),
        ),
        (_, EndReason::Cancelled, _) => end(RunState::Cancelled, None),
        (_, EndReason::TimedOut, _) => end(
            RunState::TimedOut,
            Some(format!(
                "the agent ran past its limit of {} and was stopped; its work so far is saved",
                format_duration(agent_limit)
            )),
        ),
        (_, EndReason::OverBudget, _) => end(
            RunState::Failed,
            Some(format!(
                "the run cost more than its budget of ${:.2} and was stopped; its work so far is saved. Raise \
                 `max_cost_usd` or narrow the request, then retry",
                limits.budget_usd.unwrap_or(0.0)
            )),
        ),
        (SaveOutcome::Saved { push_error: Some(e) }, EndReason::Exited, Some(0)) => end(
            RunState::Failed,
            Some(format!(
                "the agent finished and its work is committed in the workspace, but the push failed: {e}. \
                 Fix the cause and retry; the next run pushes it too"
            )),
        ),
        (_, EndReason::Exited, Some(0)) => end(RunState::Succeeded, None),
        (_, EndReason::Exited, Some(code)) => end(
            RunState::Failed,
            Some(format!(
                "the agent exited with code {code}; its work so far is saved. `threadline logs {run_id}` shows why"
            )),
        ),
        _ => end(
            RunState::Failed,
            Some("the agent's container disappeared before it finished; whatever it left is saved".to_owned()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_moves_only_forward_and_terminal_states_never_move() {
        for from in RunState::ALL {
            for to in RunState::ALL {
                if from.can_transition_to(to) {
                    let rank = |s: RunState| RunState::ALL.iter().position(|x| *x == s).unwrap().min(4);
                    assert!(rank(to) > rank(from), "{from} → {to} goes back");
                }
            }
            assert_eq!(from.is_terminal(), RunState::TERMINAL.contains(&from));
            if from.is_terminal() {
                assert!(RunState::ALL.iter().all(|to| !from.can_transition_to(*to)));
                assert!(!from.can_cancel());
            } else {
                // Every unfinished state can end, directly or through saving.
                assert!(from.can_transition_to(RunState::Cancelled) || from.can_transition_to(RunState::Saving));
            }
            assert_eq!(from.as_str().parse::<RunState>().unwrap(), from);
        }
        assert_eq!(
            RunState::sql_list(&RunState::ACTIVE),
            "('preparing', 'running', 'saving')"
        );
    }

    #[test]
    fn the_ending_follows_from_what_happened() {
        use EndReason::*;
        let saved = SaveOutcome::Saved { push_error: None };
        let unpushed = SaveOutcome::Saved {
            push_error: Some("rejected".into()),
        };
        let cases: Vec<(EndReason, Option<i64>, SaveOutcome, RunState, &str)> = vec![
            (Exited, Some(0), saved.clone(), RunState::Succeeded, ""),
            (Exited, Some(0), SaveOutcome::NothingToSave, RunState::Succeeded, ""),
            (
                Exited,
                Some(0),
                unpushed.clone(),
                RunState::Failed,
                "push failed: rejected",
            ),
            (Exited, Some(3), saved.clone(), RunState::Failed, "exited with code 3"),
            (
                Exited,
                Some(3),
                unpushed.clone(),
                RunState::Failed,
                "exited with code 3",
            ),
            (
                TimedOut,
                None,
                saved.clone(),
                RunState::TimedOut,
                "past its limit of 1:00",
            ),
            (Cancelled, None, saved.clone(), RunState::Cancelled, ""),
            (Lost, None, saved.clone(), RunState::Failed, "disappeared"),
            (
                NotStarted,
                None,
                SaveOutcome::NothingToSave,
                RunState::Failed,
                "disappeared",
            ),
            (
                Exited,
                Some(0),
                SaveOutcome::Failed("disk full".into()),
                RunState::Failed,
                "failed: disk full",
            ),
            (
                Exited,
                Some(0),
                SaveOutcome::TimedOut { limit: 300_000 },
                RunState::Failed,
                "longer than 5:00",
            ),
            (
                Exited,
                Some(0),
                SaveOutcome::Cancelled,
                RunState::Cancelled,
                "while its work was being saved",
            ),
            (
                TimedOut,
                None,
                SaveOutcome::Cancelled,
                RunState::Cancelled,
                "while its work was being saved",
            ),
            (OverBudget, None, saved.clone(), RunState::Failed, "budget of $0.50"),
        ];
        let limits = Limits {
            time: 60_000,
            budget_usd: Some(0.5),
        };
        for (reason, code, save, state, says) in cases {
            let e = ending(reason, code, &save, &limits, "r-1");
            assert_eq!(e.state, state, "{reason:?} {code:?} {save:?}");
            assert!(e.state.is_terminal());
            match (says.is_empty(), &e.error) {
                (true, None) => {}
                (false, Some(error)) => assert!(error.contains(says), "{error} should say {says}"),
                other => panic!("{reason:?} {code:?} {save:?}: {other:?}"),
            }
        }
    }
}
