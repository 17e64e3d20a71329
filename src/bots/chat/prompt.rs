//! Reading a prompt out of a chat message: mentions stripped, `repo=` and `agent=` read.

/// A prompt read out of a message: `repo=<name>` and `agent=<name>` words removed, bot
/// mentions (`<@U123>`) stripped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedPrompt {
    pub repo: Option<String>,
    pub agent: Option<String>,
    pub prompt: String,
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
    parsed.prompt = lines.join("\n").trim().to_owned();
    parsed
}
