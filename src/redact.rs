//! Secret redaction for everything shown: logs, errors, chat messages. What is redacted
//! is also cleaned of control characters (see [`crate::untrusted::clean`]): both are what
//! makes a text fit to show.

const MASK: &str = "[REDACTED]";
/// Values shorter than this are not redacted: they would mask ordinary words.
const MIN_SECRET_LEN: usize = 4;

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        let mut secrets: Vec<String> = secrets
            .into_iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| s.len() >= MIN_SECRET_LEN)
            .collect();
        // Longest first, so a secret containing another is masked whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Redactor { secrets }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = crate::untrusted::clean(text);
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_and_ignores_short_values() {
        let r = Redactor::new(["sk-abcdef".to_owned(), "abc".to_owned()]);
        assert_eq!(
            r.redact("key sk-abcdef and sk-abcdef abc"),
            "key [REDACTED] and [REDACTED] abc"
        );
        assert_eq!(r.redact("\u{1b}[2Jok"), "ok");
    }
}
