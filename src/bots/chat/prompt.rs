//! Reading a prompt out of a chat message: mentions stripped, `repo=` and `agent=` read,
//! `?` / `ask:` / `change:` at the start telling whether it asks or changes.

use crate::config::RunMode;

/// A prompt read out of a message: `repo=<name>` and `agent=<name>` words removed, bot
/// mentions (`<@U123>`) stripped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedPrompt {
    pub repo: Option<String>,
    pub agent: Option<String>,
    pub prompt: String,
    /// Said by the message itself; else the channel's default.
    pub mode: Option<RunMode>,
}

pub fn parse_prompt(text: &str) -> ParsedPrompt {
    let mut parsed = ParsedPrompt::default();
    let mut lines = Vec::new();
    for line in text.lines() {
        let mut words = Vec::new();
        for word in line.split(' ') {
            if let Some(v) = word.strip_prefix("repo=").filter(|v| !v.is_empty()) {
                parsed.repo = Some(v.to_owned());
            } else if let Some(v) = word.strip_prefix("agent=").filter(|v| !v.is_empty()) {
                parsed.agent = Some(v.to_owned());
            } else if word.starts_with("<@") && word.ends_with('>') {
                // a mention of the bot (or anyone): not part of the prompt
            } else {
                words.push(word);
            }
        }
        lines.push(words.join(" "));
    }
    let joined = lines.join("\n");
    let (mode, prompt) = split_mode(&joined);
    parsed.mode = mode;
    parsed.prompt = prompt.to_owned();
    parsed
}

/// The mode a prompt asks for at its start (`?` or `ask:` asks, `change:` changes;
/// case-insensitive), and the prompt without it.
pub fn split_mode(prompt: &str) -> (Option<RunMode>, &str) {
    let prompt = prompt.trim();
    let starts = |p: &str| prompt.get(..p.len()).is_some_and(|s| s.eq_ignore_ascii_case(p));
    let (mode, rest) = if let Some(rest) = prompt.strip_prefix('?') {
        (Some(RunMode::Ask), rest)
    } else if starts("ask:") {
        (Some(RunMode::Ask), &prompt[4..])
    } else if starts("change:") {
        (Some(RunMode::Change), &prompt[7..])
    } else {
        (None, prompt)
    };
    (mode, rest.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_question_mark_or_ask_asks_and_change_changes() {
        let ask = parse_prompt("<@U0BOT> ? where is the retry logic?");
        assert_eq!(
            (ask.mode, ask.prompt.as_str()),
            (Some(RunMode::Ask), "where is the retry logic?")
        );
        let ask = parse_prompt("<@U0BOT> ASK: why does it fail");
        assert_eq!(
            (ask.mode, ask.prompt.as_str()),
            (Some(RunMode::Ask), "why does it fail")
        );
        let change = parse_prompt("change: add a test");
        assert_eq!(
            (change.mode, change.prompt.as_str()),
            (Some(RunMode::Change), "add a test")
        );
        let plain = parse_prompt("fix it? please");
        assert_eq!((plain.mode, plain.prompt.as_str()), (None, "fix it? please"));
    }
}
