//! Reading an agent's structured output (`AgentProfile::events`): Claude Code's
//! `--output-format stream-json`, `codex exec --json`, aider's token reports. Every line
//! is untrusted: it is parsed, never obeyed; what is kept is bounded (a step's detail,
//! the answer) and cleaned of control characters by the caller before it gets here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::config::EventFormat;
use crate::model::{Progress, StepKind, Usage};
use crate::untrusted;

/// The most of a step's detail (a path, a command) kept.
const MAX_DETAIL_BYTES: usize = 200;
/// The most of an answer kept.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024;
/// The most distinct files counted by name.
const MAX_FILES: usize = 10_000;

/// What an agent's output said so far.
#[derive(Debug, Default)]
pub struct AgentState {
    progress: Progress,
    files: BTreeSet<String>,
    /// Usage by message id, where an agent repeats a message's usage per content block.
    per_message: BTreeMap<String, (i64, i64)>,
    /// Totals reported as such (Claude's result, aider's session cost).
    total_in: Option<i64>,
    total_out: Option<i64>,
    cost: Option<f64>,
    /// Tokens summed over turns (Codex, aider).
    summed_in: i64,
    summed_out: i64,
    answer: Option<String>,
    /// Changes since the last `take_changed`.
    changed: bool,
}

impl AgentState {
    /// Reads one line of output; returns a line for people (the log tail) when the
    /// line was an event worth showing, else `None` (the raw line is kept as it is).
    pub fn read(&mut self, format: EventFormat, line: &str) -> Option<String> {
        let shown = match format {
            EventFormat::None => None,
            EventFormat::Claude => self.claude(line),
            EventFormat::Codex => self.codex(line),
            EventFormat::Aider => {
                self.aider(line);
                None
            }
        };
        // JSON strings carry escapes (`\u001b`) that the raw line's cleaning did not see.
        shown.map(|s| untrusted::clean(&s))
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// The agent's own final answer, where its events carry one.
    pub fn answer(&self) -> Option<&str> {
        self.answer.as_deref()
    }

    /// Tokens and cost so far: reported totals first, else sums; the cost from `prices`
    /// (US dollars per million input and output tokens) when the agent reports none.
    pub fn usage(&self, prices: (f64, f64)) -> Usage {
        let from_messages = |pick: fn(&(i64, i64)) -> i64| {
            let n: i64 = self.per_message.values().map(pick).sum();
            (n > 0).then_some(n)
        };
        let tokens_in = self
            .total_in
            .or_else(|| from_messages(|u| u.0))
            .or((self.summed_in > 0).then_some(self.summed_in));
        let tokens_out = self
            .total_out
            .or_else(|| from_messages(|u| u.1))
            .or((self.summed_out > 0).then_some(self.summed_out));
        let priced = (prices.0 > 0.0 || prices.1 > 0.0)
            .then(|| (tokens_in.unwrap_or(0) as f64 * prices.0 + tokens_out.unwrap_or(0) as f64 * prices.1) / 1e6);
        Usage {
            tokens_in,
            tokens_out,
            cost_usd: self.cost.or(priced),
        }
    }

    /// The cost as the agent itself reported it (a resumed Claude Code session reports
    /// its total since its first run).
    pub fn reported_cost(&self) -> Option<f64> {
        self.cost
    }

    /// Whether anything shown changed since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::take(&mut self.changed)
    }

    fn step(&mut self, kind: StepKind, detail: Option<&str>) {
        self.progress.step = Some(kind);
        self.progress.detail = detail.map(|d| untrusted::clean(first_line(d)));
        self.changed = true;
    }

    fn tool_call(&mut self) {
        self.progress.tool_calls = self.progress.tool_calls.saturating_add(1);
        self.changed = true;
    }

    fn touched(&mut self, path: &str) {
        if self.files.len() < MAX_FILES && !path.is_empty() {
            self.files
                .insert(untrusted::clean(untrusted::prefix(path, MAX_DETAIL_BYTES)));
            self.progress.files_touched = self.files.len() as u32;
        }
    }

    fn set_answer(&mut self, text: &str) {
        let text = untrusted::clean(untrusted::prefix(text, MAX_ANSWER_BYTES * 2));
        let text = text.trim();
        if !text.is_empty() {
            self.answer = Some(untrusted::truncate(text, MAX_ANSWER_BYTES));
            self.changed = true;
        }
    }

    // ---- Claude Code: --output-format stream-json --------------------------------

    fn claude(&mut self, line: &str) -> Option<String> {
        let v: Value = serde_json::from_str(line).ok()?;
        match v["type"].as_str()? {
            "assistant" => {
                let message = &v["message"];
                if let (Some(id), Some(usage)) = (message["id"].as_str(), message.get("usage")) {
                    let input = ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]
                        .iter()
                        .filter_map(|k| usage[*k].as_i64())
                        .sum();
                    let output = usage["output_tokens"].as_i64().unwrap_or(0);
                    self.per_message
                        .insert(untrusted::prefix(id, 100).to_owned(), (input, output));
                    self.changed = true;
                }
                let mut shown = Vec::new();
                for block in message["content"].as_array().into_iter().flatten() {
                    match block["type"].as_str() {
                        Some("tool_use") => {
                            let name = block["name"].as_str().unwrap_or("tool");
                            let input = &block["input"];
                            self.tool_call();
                            let (kind, detail) = claude_tool(name, input);
                            if kind == StepKind::Editing
                                && let Some(path) = detail
                            {
                                self.touched(path);
                            }
                            self.step(kind, detail);
                            shown.push(match detail {
                                Some(d) => format!("[{name}] {}", first_line(d)),
                                None => format!("[{name}]"),
                            });
                        }
                        Some("text") => {
                            let text = block["text"].as_str().unwrap_or("");
                            self.step(StepKind::Thinking, None);
                            if let Some(first) = text.lines().find(|l| !l.trim().is_empty()) {
                                shown.push(untrusted::prefix(first, 500).to_owned());
                            }
                        }
                        _ => {}
                    }
                }
                (!shown.is_empty()).then(|| shown.join("\n"))
            }
            "result" => {
                if let Some(text) = v["result"].as_str() {
                    self.set_answer(text);
                }
                let usage = &v["usage"];
                if usage.is_object() {
                    let input: i64 = ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"]
                        .iter()
                        .filter_map(|k| usage[*k].as_i64())
                        .sum();
                    self.total_in = Some(input);
                    self.total_out = usage["output_tokens"].as_i64();
                }
                if let Some(cost) = v["total_cost_usd"].as_f64().filter(|c| c.is_finite() && *c >= 0.0) {
                    self.cost = Some(cost);
                }
                self.changed = true;
                let subtype = v["subtype"].as_str().unwrap_or("done");
                Some(format!("[result] {}", untrusted::prefix(subtype, 40)))
            }
            _ => None,
        }
    }

    // ---- Codex: codex exec --json --------------------------------------------------

    fn codex(&mut self, line: &str) -> Option<String> {
        let v: Value = serde_json::from_str(line).ok()?;
        let kind = v["type"].as_str()?;
        match kind {
            "item.started" | "item.updated" | "item.completed" => {
                let item = &v["item"];
                let completed = kind == "item.completed";
                match item["type"].as_str()? {
                    "command_execution" => {
                        let command = item["command"].as_str().unwrap_or("");
                        if kind == "item.started" {
                            self.tool_call();
                        }
                        self.step(StepKind::Running, Some(command));
                        (kind == "item.started").then(|| format!("$ {}", first_line(command)))
                    }
                    "file_change" => {
                        let paths: Vec<&str> = item["changes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|c| c["path"].as_str())
                            .collect();
                        if completed {
                            self.tool_call();
                        }
                        for p in &paths {
                            self.touched(p);
                        }
                        self.step(StepKind::Editing, paths.first().copied());
                        completed.then(|| format!("[edit] {}", untrusted::prefix(&paths.join(", "), MAX_DETAIL_BYTES)))
                    }
                    "web_search" => {
                        self.tool_call();
                        self.step(StepKind::Searching, item["query"].as_str());
                        None
                    }
                    "todo_list" => {
                        self.step(StepKind::Planning, None);
                        None
                    }
                    "reasoning" => {
                        self.step(StepKind::Thinking, None);
                        None
                    }
                    "agent_message" if completed => {
                        let text = item["text"].as_str().unwrap_or("");
                        self.set_answer(text);
                        text.lines()
                            .find(|l| !l.trim().is_empty())
                            .map(|l| untrusted::prefix(l, 500).to_owned())
                    }
                    _ => None,
                }
            }
            "turn.completed" => {
                let usage = &v["usage"];
                self.summed_in += usage["input_tokens"].as_i64().unwrap_or(0);
                self.summed_out += usage["output_tokens"].as_i64().unwrap_or(0);
                self.changed = true;
                None
            }
            "turn.failed" | "error" => {
                let message = v["error"]["message"].as_str().or(v["message"].as_str()).unwrap_or("");
                Some(format!("[error] {}", untrusted::prefix(message, 500)))
            }
            _ => None,
        }
    }

    // ---- aider: "Tokens: 2.3k sent, 150 received. Cost: $0.01 message, $0.03 session."

    fn aider(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("Tokens: ") else {
            if let Some(path) = line.trim().strip_prefix("Applied edit to ") {
                self.tool_call();
                self.touched(path.trim());
                self.step(StepKind::Editing, Some(path.trim()));
            }
            return;
        };
        let number_before = |word: &str| -> Option<i64> {
            let i = rest.find(word)?;
            let n = rest[..i].trim_end().rsplit(' ').next()?;
            parse_count(n)
        };
        if let Some(sent) = number_before(" sent") {
            self.summed_in += sent;
        }
        if let Some(received) = number_before(" received") {
            self.summed_out += received;
        }
        if let Some(i) = rest.find(" session") {
            let before = rest[..i].trim_end();
            if let Some(amount) = before.rsplit('$').next().and_then(|a| a.trim().parse::<f64>().ok())
                && amount.is_finite()
                && amount >= 0.0
            {
                self.cost = Some(amount);
            }
        }
        self.changed = true;
    }
}

/// A step's detail as shown: its first line, capped.
fn first_line(text: &str) -> &str {
    untrusted::prefix(text.lines().next().unwrap_or(""), MAX_DETAIL_BYTES)
}

/// What a Claude Code tool call is doing, and on what.
fn claude_tool<'a>(name: &str, input: &'a Value) -> (StepKind, Option<&'a str>) {
    let field = |k: &str| input[k].as_str();
    match name {
        "Write" | "Edit" | "MultiEdit" | "NotebookEdit" => {
            (StepKind::Editing, field("file_path").or(field("notebook_path")))
        }
        "Read" | "LS" | "Glob" | "Grep" => (
            StepKind::Reading,
            field("file_path").or(field("path")).or(field("pattern")),
        ),
        "Bash" | "BashOutput" => (StepKind::Running, field("command")),
        "WebFetch" | "WebSearch" => (StepKind::Searching, field("url").or(field("query"))),
        "TodoWrite" | "Task" | "ExitPlanMode" => (StepKind::Planning, field("description")),
        _ => (StepKind::Thinking, None),
    }
}

/// `950`, `2.3k`, `1.2M`, `12,345` as a count.
fn parse_count(text: &str) -> Option<i64> {
    let text = text.trim().replace(',', "");
    let (number, scale) = match text.chars().last()? {
        'k' | 'K' => (&text[..text.len() - 1], 1e3),
        'm' | 'M' => (&text[..text.len() - 1], 1e6),
        _ => (text.as_str(), 1.0),
    };
    let n: f64 = number.parse().ok()?;
    (n.is_finite() && n >= 0.0).then(|| (n * scale).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(format: EventFormat, text: &str) -> (AgentState, Vec<String>) {
        let mut state = AgentState::default();
        let shown = text.lines().filter_map(|l| state.read(format, l)).collect();
        (state, shown)
    }

    #[test]
    fn claude_stream_json_gives_steps_answer_tokens_and_cost() {
        let stream = r#"{"type":"system","subtype":"init","session_id":"s1","tools":["Write"],"model":"claude"}
{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"I'll create it."},{"type":"tool_use","id":"t1","name":"Write","input":{"file_path":"/workspace/hello.txt","content":"hi"}}],"usage":{"input_tokens":100,"cache_read_input_tokens":20,"output_tokens":30}},"session_id":"s1"}
{"type":"assistant","message":{"id":"m1","content":[{"type":"tool_use","id":"t2","name":"Bash","input":{"command":"cargo test\nrm -rf /"}}],"usage":{"input_tokens":100,"cache_read_input_tokens":20,"output_tokens":30}},"session_id":"s1"}
{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}}
not json at all
{"type":"result","subtype":"success","is_error":false,"result":"Done: I created hello.txt.","usage":{"input_tokens":250,"cache_read_input_tokens":50,"output_tokens":70},"total_cost_usd":0.0123,"session_id":"s1"}"#;
        let (mut state, shown) = read_all(EventFormat::Claude, stream);
        assert_eq!(shown[0], "I'll create it.\n[Write] /workspace/hello.txt");
        assert_eq!(shown[1], "[Bash] cargo test", "a step shows its first line only");
        assert_eq!(state.progress().tool_calls, 2);
        assert_eq!(state.progress().files_touched, 1);
        assert_eq!(state.progress().step, Some(StepKind::Running));
        assert_eq!(state.answer(), Some("Done: I created hello.txt."));
        let usage = state.usage((0.0, 0.0));
        assert_eq!((usage.tokens_in, usage.tokens_out), (Some(300), Some(70)));
        assert_eq!(usage.cost_usd, Some(0.0123));
        assert!(state.take_changed() && !state.take_changed());
    }

    #[test]
    fn claude_tokens_count_each_message_once_before_the_result() {
        let stream = r#"{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"a"}],"usage":{"input_tokens":10,"output_tokens":5}}}
{"type":"assistant","message":{"id":"m1","content":[{"type":"text","text":"b"}],"usage":{"input_tokens":10,"output_tokens":5}}}
{"type":"assistant","message":{"id":"m2","content":[{"type":"text","text":"c"}],"usage":{"input_tokens":20,"output_tokens":7}}}"#;
        let (state, _) = read_all(EventFormat::Claude, stream);
        let usage = state.usage((3.0, 15.0));
        assert_eq!((usage.tokens_in, usage.tokens_out), (Some(30), Some(12)));
        let expected = (30.0 * 3.0 + 12.0 * 15.0) / 1e6;
        assert!(
            (usage.cost_usd.unwrap() - expected).abs() < 1e-12,
            "priced when not reported"
        );
    }

    #[test]
    fn codex_json_gives_commands_edits_answer_and_summed_tokens() {
        let stream = r#"{"type":"thread.started","thread_id":"th1"}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"i1","type":"command_execution","command":"bash -lc ls","aggregated_output":"","status":"in_progress"}}
{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"bash -lc ls","aggregated_output":"a\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"i2","type":"file_change","changes":[{"path":"src/a.rs","kind":"update"},{"path":"src/b.rs","kind":"add"}],"status":"completed"}}
{"type":"item.completed","item":{"id":"i3","type":"agent_message","text":"Added b.rs.\nTests pass."}}
{"type":"turn.completed","usage":{"input_tokens":1200,"cached_input_tokens":200,"output_tokens":300}}
{"type":"turn.completed","usage":{"input_tokens":800,"output_tokens":100}}"#;
        let (state, shown) = read_all(EventFormat::Codex, stream);
        assert_eq!(shown, ["$ bash -lc ls", "[edit] src/a.rs, src/b.rs", "Added b.rs."]);
        assert_eq!(state.progress().tool_calls, 2);
        assert_eq!(state.progress().files_touched, 2);
        assert_eq!(state.answer(), Some("Added b.rs.\nTests pass."));
        let usage = state.usage((0.0, 0.0));
        assert_eq!(
            (usage.tokens_in, usage.tokens_out, usage.cost_usd),
            (Some(2000), Some(400), None)
        );
    }

    #[test]
    fn aider_token_reports_and_edits_are_read() {
        let out = "Applied edit to hello.txt\nTokens: 2.3k sent, 150 received. Cost: $0.01 message, $0.01 session.\n\
                   Tokens: 1,000 sent, 50 received. Cost: $0.004 message, $0.014 session.\nsome other line";
        let (state, shown) = read_all(EventFormat::Aider, out);
        assert!(shown.is_empty(), "aider's lines are shown as they are");
        let usage = state.usage((0.0, 0.0));
        assert_eq!((usage.tokens_in, usage.tokens_out), (Some(3300), Some(200)));
        assert_eq!(usage.cost_usd, Some(0.014), "the session's cost, not a sum of sessions");
        assert_eq!(state.progress().files_touched, 1);
    }

    #[test]
    fn a_recorded_claude_code_transcript_is_read() {
        // Printed by the real Claude Code 2.1.332 (tests/agent-images/NOTES.md).
        let (state, shown) = read_all(
            EventFormat::Claude,
            include_str!("../../tests/it/data/claude-stream.jsonl"),
        );
        assert_eq!(state.answer(), Some("Done: I created hello.txt."));
        let usage = state.usage((0.0, 0.0));
        assert_eq!(
            (usage.tokens_in, usage.tokens_out, usage.cost_usd),
            (Some(2400), Some(68), Some(0.01096))
        );
        assert_eq!(state.progress().files_touched, 1);
        assert!(
            shown.iter().any(|l| l.contains("[Write] /workspace/hello.txt")),
            "{shown:?}"
        );
    }

    #[test]
    fn a_codex_exec_stream_in_its_documented_shape_is_read() {
        // Written from codex's docs/exec.md and codex-rs/exec/src/exec_events.rs
        // (tests/agent-images/NOTES.md): the CLI itself cannot be fetched here.
        let (state, shown) = read_all(EventFormat::Codex, include_str!("../../tests/it/data/codex-exec.jsonl"));
        assert_eq!(state.answer(), Some("Done: I created hello.txt."));
        assert!(state.usage((0.0, 0.0)).tokens_in.is_some_and(|n| n > 0));
        assert!(state.progress().tool_calls >= 2, "{:?}", state.progress());
        assert!(shown.iter().any(|l| l.starts_with("$ bash -lc")), "{shown:?}");
    }

    #[test]
    fn escaped_control_characters_in_events_are_removed() {
        let stream = r#"{"type":"assistant","message":{"id":"m","content":[{"type":"text","text":"\u001b]0;pwned\u0007hi\u001b[2J"},{"type":"tool_use","name":"Bash","input":{"command":"ls\u001b[31m red"}}]}}
{"type":"result","result":"done\u001b[1A\u202eevil"}"#;
        let (state, shown) = read_all(EventFormat::Claude, stream);
        for text in shown
            .iter()
            .map(String::as_str)
            .chain(state.answer())
            .chain(state.progress().detail.as_deref())
        {
            assert!(!text.chars().any(|c| c.is_control() && c != '\n'), "{text:?}");
            assert!(!text.contains('\u{202e}'), "{text:?}");
        }
        assert_eq!(state.answer(), Some("doneevil"));
    }

    #[test]
    fn hostile_events_are_bounded_and_never_negative() {
        let huge = "x".repeat(100_000);
        let stream = format!(
            r#"{{"type":"assistant","message":{{"id":"m","content":[{{"type":"tool_use","name":"Write","input":{{"file_path":"{huge}"}}}}]}}}}
{{"type":"result","result":"{huge}","total_cost_usd":-5,"usage":{{"input_tokens":"lots"}}}}"#
        );
        let (state, shown) = read_all(EventFormat::Claude, &stream);
        assert!(shown.iter().all(|l| l.len() <= 300), "{}", shown[0].len());
        assert!(state.progress().detail.as_ref().unwrap().len() <= MAX_DETAIL_BYTES);
        assert!(state.answer().unwrap().len() <= MAX_ANSWER_BYTES);
        assert_eq!(state.usage((0.0, 0.0)).cost_usd, None, "a negative cost is no cost");
    }
}
