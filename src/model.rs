//! Domain types shared by the orchestrator, the store and the front ends: pipelines,
//! runs, and the run lifecycle state machine. Free of any storage or chat types.

use std::fmt;

/// Milliseconds since the Unix epoch; how every time is stored.
pub type Millis = i64;

pub fn now_millis() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub use crate::config::RunMode;
pub use crate::lifecycle::{EndReason, RunState, UnknownState};

/// Where a pipeline was started from, so front ends can find their own threads again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Origin {
    /// `cli`, `web`, `slack`, `discord`.
    pub surface: String,
    /// The thread on that surface (channel and thread ids); empty for the CLI.
    pub thread: String,
    /// A link to that thread, where the surface has one.
    pub url: String,
}

impl Origin {
    pub fn cli() -> Self {
        Origin {
            surface: "cli".into(),
            thread: String::new(),
            url: String::new(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Pipeline {
    pub id: String,
    /// The repository as the user named it (path or URL).
    pub repo: String,
    /// Where the mirror fetches from and the branch is pushed to.
    pub remote_url: String,
    /// True when the repo is a local checkout with no remote: the branch then lives
    /// only in Threadline's mirror and the checkout is never written to.
    pub local_only: bool,
    pub base_branch: String,
    pub branch: String,
    pub agent: String,
    pub title: String,
    pub origin: Origin,
    pub created_at: Millis,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Diffstat {
    pub files_changed: i64,
    pub insertions: i64,
    pub deletions: i64,
}

impl Diffstat {
    /// `3 files +10 -2`, for tables.
    pub fn short(&self) -> String {
        let files = if self.files_changed == 1 { "file" } else { "files" };
        format!(
            "{} {files} +{} -{}",
            self.files_changed, self.insertions, self.deletions
        )
    }
}

impl fmt::Display for Diffstat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: i64, one: &str, many: &str| {
            if n == 1 { one.to_owned() } else { many.to_owned() }
        };
        write!(
            f,
            "{} {} changed, {} {}(+), {} {}(-)",
            self.files_changed,
            plural(self.files_changed, "file", "files"),
            self.insertions,
            plural(self.insertions, "insertion", "insertions"),
            self.deletions,
            plural(self.deletions, "deletion", "deletions"),
        )
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Run {
    pub id: String,
    pub pipeline_id: String,
    /// 1 for the first prompt, then one more per follow-up or retry.
    pub seq: i64,
    pub prompt: String,
    pub agent: String,
    pub requested_by: String,
    pub state: RunState,
    pub created_at: Millis,
    pub started_at: Option<Millis>,
    pub finished_at: Option<Millis>,
    pub exit_code: Option<i64>,
    pub end_reason: Option<EndReason>,
    /// What went wrong, in words for the user (already redacted).
    pub error: Option<String>,
    /// The commit the run started from.
    pub start_commit: Option<String>,
    /// The branch head after the run was saved.
    pub head_commit: Option<String>,
    /// True when the run left a change (its own commit or commits by the agent).
    pub changed: bool,
    pub diffstat: Option<Diffstat>,
    pub pushed: bool,
    pub push_error: Option<String>,
    pub container_id: Option<String>,
    pub cancel_requested: bool,
    /// The agent's own answer: its final message where it reports one (structured
    /// events), else what it left in `$THREADLINE_SUMMARY_FILE`, else its last lines.
    pub summary: Option<String>,
    /// The last lines of the log, redacted.
    pub log_tail: String,
    /// A change, or a question answered on a read-only workspace.
    pub mode: RunMode,
    /// Tokens and cost as the agent reported them (or tokens times the profile's prices).
    pub usage: Usage,
    /// What the agent is doing, from its structured events.
    pub progress: Option<Progress>,
    /// It resumed its agent's session from an earlier run's state.
    pub resumed: bool,
    /// The session's total cost as the agent reported it (for a resumed session, since
    /// its first run); `usage.cost_usd` is this run's own.
    pub session_cost_usd: Option<f64>,
}

/// Tokens and cost of a run, where the agent reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Usage {
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub cost_usd: Option<f64>,
}

impl Usage {
    /// `12.3k in · 450 out · $0.04`, or nothing known.
    pub fn describe(&self) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(n) = self.tokens_in {
            parts.push(format!("{} in", compact(n)));
        }
        if let Some(n) = self.tokens_out {
            parts.push(format!("{} out", compact(n)));
        }
        if let Some(c) = self.cost_usd {
            parts.push(format!("${c:.2}"));
        }
        (!parts.is_empty()).then(|| parts.join(" · "))
    }
}

/// `950`, `12.3k`, `1.2M`.
fn compact(n: i64) -> String {
    match n {
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// What an agent is doing, as its structured events say.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// The current step.
    pub step: Option<StepKind>,
    /// What the step is on: a file, a command (already cleaned and redacted). Shown only
    /// where the channel's detail allows more than metadata.
    pub detail: Option<String>,
    pub tool_calls: u32,
    pub files_touched: u32,
    /// Since when (ms) the run's environment is being built, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_since: Option<Millis>,
    /// What the egress proxy refused the agent (`network = "allowlist"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked: Option<Blocked>,
    /// Why a queued run that is next in its pipeline does not start: the worker it needs
    /// is gone, or no live worker has the labels it needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// Requests the egress proxy refused one run's agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Blocked {
    pub count: u64,
    /// The refused hosts (the first few).
    pub hosts: std::collections::BTreeSet<String>,
}

impl Blocked {
    /// "blocked 3 requests to example.com, evil.test".
    pub fn describe(&self) -> Option<String> {
        if self.count == 0 {
            return None;
        }
        let hosts: Vec<&str> = self.hosts.iter().map(String::as_str).collect();
        Some(format!(
            "blocked {} request{} to {}",
            self.count,
            if self.count == 1 { "" } else { "s" },
            hosts.join(", ")
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    Reading,
    Editing,
    Running,
    Searching,
    Planning,
    Thinking,
}

impl StepKind {
    pub fn words(self) -> &'static str {
        match self {
            StepKind::Reading => "reading",
            StepKind::Editing => "editing",
            StepKind::Running => "running a command",
            StepKind::Searching => "searching the web",
            StepKind::Planning => "planning",
            StepKind::Thinking => "thinking",
        }
    }
}

impl Progress {
    /// `editing src/x.rs · 12 tool calls · 3 files`; the step's object only `with_detail`.
    pub fn describe(&self, with_detail: bool) -> Option<String> {
        let mut parts = Vec::new();
        if let Some(step) = self.step {
            match (&self.detail, with_detail) {
                (Some(d), true) => parts.push(format!("{} {d}", step.words())),
                _ => parts.push(step.words().to_owned()),
            }
        }
        if self.tool_calls > 0 {
            parts.push(format!("{} tool call{}", self.tool_calls, plural(self.tool_calls)));
        }
        if self.files_touched > 0 {
            parts.push(format!("{} file{}", self.files_touched, plural(self.files_touched)));
        }
        (!parts.is_empty()).then(|| parts.join(" · "))
    }
}

fn plural(n: u32) -> &'static str {
    if n == 1 { "" } else { "s" }
}

impl Run {
    pub fn duration_millis(&self) -> Option<Millis> {
        Some(self.finished_at? - self.started_at.unwrap_or(self.created_at))
    }
}

/// Unfinished runs before `run` in its pipeline (`runs` are that pipeline's runs).
pub fn runs_ahead(runs: &[Run], run: &Run) -> usize {
    runs.iter()
        .filter(|r| r.seq < run.seq && !r.state.is_terminal())
        .count()
}

/// The pull request of a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PullRequestRecord {
    pub pipeline_id: String,
    /// `github`, `gitlab` or `gitea`.
    pub forge: String,
    pub number: i64,
    pub url: String,
    /// True when it was opened by hand and found, not opened by Threadline.
    pub found: bool,
    pub opened_by: String,
    pub created_at: Millis,
    /// `open`, `merged` or `closed`, as the forge last said.
    pub state: String,
    /// When Threadline saw it become merged or closed.
    pub state_at: Option<Millis>,
    /// Who merged or closed it, where the forge said.
    pub state_by: Option<String>,
}

impl PullRequestRecord {
    pub fn is_open(&self) -> bool {
        self.state == "open"
    }
}

/// One Open PR decision.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Approval {
    pub pipeline_id: String,
    pub run_id: String,
    /// `surface:user id`.
    pub actor: String,
    pub approved: bool,
    /// Why it was refused, or what came of it.
    pub reason: String,
    pub at: Millis,
    /// The branch head it approved.
    pub commit: Option<String>,
}

/// One persisted state transition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunEvent {
    pub run_id: String,
    pub state: RunState,
    pub at: Millis,
    pub detail: String,
}

/// `text` with its first letter in upper case.
pub fn capitalize(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A sentence for people from a message (an error's `Display`): capitalized, with a
/// full stop.
pub fn sentence(text: &str) -> String {
    let stop = if text.is_empty() || text.ends_with('.') {
        ""
    } else {
        "."
    };
    format!("{}{stop}", capitalize(text))
}

/// Formats a duration as `m:ss` (or `h:mm:ss`).
pub fn format_duration(millis: Millis) -> String {
    let secs = millis.max(0) / 1000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip() {
        for st in RunState::ALL {
            assert_eq!(st.as_str().parse::<RunState>().unwrap(), st);
        }
        assert!("bogus".parse::<RunState>().is_err());
    }

    #[test]
    fn unfinished_means_not_terminal() {
        for st in RunState::ALL {
            assert_eq!(RunState::UNFINISHED.contains(&st), !st.is_terminal(), "{st}");
        }
    }

    #[test]
    fn terminal_states_have_no_way_out() {
        for st in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for next in RunState::ALL {
                assert!(!st.can_transition_to(next), "{st} -> {next}");
            }
            assert!(!st.can_cancel());
        }
    }

    #[test]
    fn every_non_terminal_state_can_end_cancelled() {
        // Running and saving reach `cancelled` through `saving` (the work is saved first).
        assert!(RunState::Queued.can_transition_to(RunState::Cancelled));
        assert!(RunState::Preparing.can_transition_to(RunState::Cancelled));
        assert!(RunState::Running.can_transition_to(RunState::Saving));
        assert!(RunState::Saving.can_transition_to(RunState::Cancelled));
        assert!(!RunState::Queued.can_transition_to(RunState::Running));
    }

    #[test]
    fn durations_and_diffstats_read_well() {
        assert_eq!(format_duration(65_000), "1:05");
        assert_eq!(format_duration(3_726_000), "1:02:06");
        let d = Diffstat {
            files_changed: 1,
            insertions: 2,
            deletions: 0,
        };
        assert_eq!(d.to_string(), "1 file changed, 2 insertions(+), 0 deletions(-)");
    }
}

/// `2026-11-25 23:59 UTC` from milliseconds since the epoch.
pub fn format_utc(millis: Millis) -> String {
    let secs = millis.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60
    )
}

#[cfg(test)]
mod time_tests {
    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::format_utc(1_795_651_200_000), "2026-11-26 00:00 UTC");
        assert_eq!(super::format_utc(951_782_400_000 + 61_000), "2000-02-29 00:01 UTC");
    }
}

/// A file attached to the message that started a run, given to its agent under
/// `/threadline/attachments/`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachment {
    /// A safe file name, unique in its run.
    pub name: String,
    pub source: AttachmentSource,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AttachmentSource {
    /// A file Threadline keeps on the disk of the process that took it, by path
    /// (uploads before they were kept in the database).
    File { path: String },
    /// A file kept in the database (a web or API upload), by key: any worker reads it.
    Stored { key: String },
    /// A chat platform's URL, fetched when the run is prepared; `auth` names whose
    /// credentials go with it (`slack`: the bot token) or `none`.
    Url { url: String, auth: String },
}

/// A file name an agent can be given: the name's last component, its characters limited
/// to letters, digits, `.`, `-` and `_`, no leading dot, at most 100 bytes.
pub fn safe_file_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or("");
    let mut out: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while out.starts_with('.') {
        out.remove(0);
    }
    out.truncate(100);
    if out.is_empty() { "file".to_owned() } else { out }
}

#[cfg(test)]
mod name_tests {
    #[test]
    fn attachment_names_are_made_safe() {
        use super::safe_file_name as safe;
        assert_eq!(safe("../../etc/passwd"), "passwd");
        assert_eq!(safe(".git"), "git");
        assert_eq!(safe("a b\\c.log"), "c.log");
        assert_eq!(safe("résumé.pdf"), "r_sum_.pdf");
        assert_eq!(safe(".."), "file");
        assert_eq!(safe(&"x".repeat(300)).len(), 100);
    }
}
