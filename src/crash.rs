//! Crash points: the named steps of a run's life where a test build stops the process
//! dead, to prove that recovery holds at every one of them. `THREADLINE_CRASH_AT=<step>`
//! aborts the process (no destructors, no flushing: as `kill -9` would) when the step is
//! reached. Compiled in only with the `crash-points` feature, which the tests enable; in
//! any other build `point` does nothing.

/// A step of a run's life, in order, and one of recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The run is stored as queued.
    Queued,
    /// A process claimed it (`preparing`).
    Claimed,
    /// Its workspace is prepared (git), before the start commit is stored.
    Prepared,
    /// Its container is created, not started.
    ContainerCreated,
    /// Its container is started, before the run is stored as `running`.
    ContainerStarted,
    /// The agent exited, before its exit is stored.
    AgentExited,
    /// The run's work is committed, not pushed.
    Committed,
    /// The branch is pushed, before the outcome is stored.
    Pushed,
    /// The final state is stored.
    Stored,
    /// Recovery adopted a dead process's run, before resuming it.
    Adopted,
}

impl Step {
    pub const ALL: [Step; 10] = [
        Step::Queued,
        Step::Claimed,
        Step::Prepared,
        Step::ContainerCreated,
        Step::ContainerStarted,
        Step::AgentExited,
        Step::Committed,
        Step::Pushed,
        Step::Stored,
        Step::Adopted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Claimed => "claimed",
            Step::Prepared => "prepared",
            Step::ContainerCreated => "container-created",
            Step::ContainerStarted => "container-started",
            Step::AgentExited => "agent-exited",
            Step::Committed => "committed",
            Step::Pushed => "pushed",
            Step::Stored => "stored",
            Step::Adopted => "adopted",
        }
    }
}

/// Stops the process dead if this build has crash points and the environment asks for
/// this step.
#[inline]
pub fn point(step: Step) {
    #[cfg(feature = "crash-points")]
    if std::env::var("THREADLINE_CRASH_AT").is_ok_and(|s| s == step.name()) {
        eprintln!("threadline: crash point {} reached; aborting", step.name());
        std::process::abort();
    }
    #[cfg(not(feature = "crash-points"))]
    let _ = step;
}
