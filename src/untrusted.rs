//! Reading what an agent produced: its output and the files it left. **Everything an
//! agent writes is attacker-controlled input to a daemon that runs as root**, so what
//! comes from it is bounded in size, cleaned of control characters before it is stored,
//! printed or posted, and read from files without following links or blocking.

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path};

/// Longest line kept from an agent's output; longer ones are split.
pub const MAX_LINE_BYTES: usize = 4096;

/// Removes terminal escape sequences (CSI, OSC, and two-byte escapes) and every other
/// control character but tab and newline, so that nothing an agent printed can move a
/// terminal's cursor, rename its window or dress a line up as something else.
pub fn clean(text: &str) -> String {
    if !text.chars().any(is_unwanted) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates up to a final byte in @..~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC, DCS, SOS, PM, APC: up to BEL or ST (ESC \).
                Some(']' | 'P' | 'X' | '^' | '_') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\r' => {
                // A lone carriage return rewrites the line on a terminal: keep it visible.
                if chars.peek() != Some(&'\n') {
                    out.push(' ');
                }
            }
            c if is_unwanted(c) => {}
            c => out.push(c),
        }
    }
    out
}

fn is_unwanted(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        // Bidirectional overrides and isolates reorder what a reader sees.
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// A user name from a forge or a webhook, as it may be shown and compared: letters,
/// digits and `-_.` only, at most 64 bytes (every forge's names fit).
pub fn name(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(64)
        .collect()
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn prefix(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Cuts `text` to `max` bytes, saying so at the end when it had to.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let note = format!("\n[… truncated: {} bytes in all, {max} kept]", text.len());
    let mut out = prefix(text, max.saturating_sub(note.len())).to_owned();
    out.push_str(&note);
    out
}

/// Splits a byte stream into lines of at most [`MAX_LINE_BYTES`], whatever the stream
/// does: a gigabyte without a newline costs one line's worth of memory.
#[derive(Default)]
pub struct Lines {
    pending: Vec<u8>,
}

impl Lines {
    /// Feeds bytes; returns the complete lines they finish, without their newlines.
    pub fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let room = MAX_LINE_BYTES - self.pending.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|b| *b == b'\n') {
                Some(pos) => {
                    self.pending.extend_from_slice(&window[..pos]);
                    out.push(self.take());
                    bytes = &bytes[pos + 1..];
                }
                None => {
                    self.pending.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.pending.len() == MAX_LINE_BYTES {
                        out.push(self.take());
                    }
                }
            }
        }
        out
    }

    /// What is left after the stream ended, as a last line.
    pub fn finish(&mut self) -> Option<String> {
        (!self.pending.is_empty()).then(|| self.take())
    }

    fn take(&mut self) -> String {
        let line = String::from_utf8_lossy(&self.pending);
        let line = clean(line.trim_end_matches('\r'));
        self.pending.clear();
        line
    }
}

/// Why a file an agent left was not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("{0} is a symbolic link (links are never followed)")]
    Link(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("{0} is not a plain path inside the workspace")]
    Outside(String),
    #[error("{path} could not be read: {detail}")]
    Unreadable { path: String, detail: String },
}

/// A file read from a directory an agent controls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capped {
    pub text: String,
    /// The file was longer than the cap; `text` holds its beginning.
    pub truncated: bool,
}

/// Reads `rel` below `root` as an untrusted file: every component must be a real
/// directory and the file a regular file (no links, FIFOs or devices), opened without
/// following a link and without blocking, and at most `cap` bytes are read. Ok(None)
/// when it does not exist.
pub fn read_capped(root: &Path, rel: &str, cap: usize) -> Result<Option<Capped>, Refused> {
    let rel_path = Path::new(rel);
    if rel_path.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(Refused::Outside(rel.to_owned()));
    }
    let mut path = root.to_path_buf();
    let parts: Vec<_> = rel_path.components().collect();
    for (i, part) in parts.iter().enumerate() {
        path.push(part);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unreadable(rel, e)),
        };
        let shown = || {
            rel_path
                .iter()
                .take(i + 1)
                .collect::<std::path::PathBuf>()
                .display()
                .to_string()
        };
        if meta.file_type().is_symlink() {
            return Err(Refused::Link(shown()));
        }
        let last = i + 1 == parts.len();
        if !last && !meta.is_dir() {
            return Err(Refused::NotAFile(shown()));
        }
    }
    let file = open_regular(&path).map_err(|refused| match refused {
        Refused::Link(_) => Refused::Link(rel.to_owned()),
        Refused::NotAFile(_) => Refused::NotAFile(rel.to_owned()),
        other => other,
    })?;
    read_prefix(file, cap).map(Some).map_err(|e| unreadable(rel, e))
}

/// Opens a file an agent controls for reading: not through a link, without blocking on
/// a FIFO, and only if it is a regular file.
pub fn open_regular(path: &Path) -> Result<File, Refused> {
    let shown = || path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => Refused::Link(shown()),
            _ => unreadable(&shown(), e),
        })?;
    let meta = file.metadata().map_err(|e| unreadable(&shown(), e))?;
    let kind = meta.file_type();
    if !meta.is_file() || kind.is_fifo() || kind.is_socket() || kind.is_char_device() || kind.is_block_device() {
        return Err(Refused::NotAFile(shown()));
    }
    Ok(file)
}

fn read_prefix(file: File, cap: usize) -> std::io::Result<Capped> {
    let mut bytes = Vec::with_capacity(cap.min(64 * 1024) + 1);
    file.take(cap as u64 + 1).read_to_end(&mut bytes)?;
    let truncated = bytes.len() > cap;
    bytes.truncate(cap);
    let text = String::from_utf8_lossy(&bytes);
    Ok(Capped {
        text: clean(prefix(&text, cap)),
        truncated,
    })
}

fn unreadable(rel: &str, e: std::io::Error) -> Refused {
    Refused::Unreadable {
        path: rel.to_owned(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_removes_escapes_and_controls_but_keeps_text() {
        assert_eq!(clean("plain\ttext\n"), "plain\ttext\n");
        assert_eq!(clean("\u{1b}[1A\u{1b}[2Ksucceeded\u{1b}[0m"), "succeeded");
        assert_eq!(clean("a\u{1b}]0;title\u{7}b\u{1b}]8;;http://x\u{1b}\\c"), "abc");
        assert_eq!(clean("x\u{0}y\u{8}z\u{9b}w\u{202e}v"), "xyzwv");
        assert_eq!(clean("fake\rreal\r\n"), "fake real\n");
        assert_eq!(clean("naïve ✓"), "naïve ✓");
    }

    #[test]
    fn lines_are_bounded_whatever_the_stream() {
        let mut lines = Lines::default();
        let mut out = lines.push(b"one\ntw");
        out.extend(lines.push(b"o\n"));
        assert_eq!(out, ["one", "two"]);
        let long = vec![b'x'; MAX_LINE_BYTES * 3 + 10];
        let out = lines.push(&long);
        assert_eq!(out.len(), 3);
        assert!(out.iter().all(|l| l.len() == MAX_LINE_BYTES));
        assert_eq!(lines.finish().unwrap().len(), 10);
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn truncate_says_so() {
        assert_eq!(truncate("short", 10), "short");
        let cut = truncate(&"é".repeat(100), 80);
        assert!(cut.len() <= 80 && cut.ends_with("kept]"), "{cut}");
    }

    #[test]
    fn read_capped_refuses_links_and_special_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/ok.md"), "hello\u{1b}[31m").unwrap();
        assert_eq!(
            read_capped(root, "d/ok.md", 100).unwrap(),
            Some(Capped {
                text: "hello".into(),
                truncated: false
            })
        );
        assert_eq!(read_capped(root, "d/none.md", 100).unwrap(), None);
        fs::write(root.join("big"), "x".repeat(1000)).unwrap();
        let big = read_capped(root, "big", 10).unwrap().unwrap();
        assert_eq!((big.text.len(), big.truncated), (10, true));

        std::os::unix::fs::symlink("/etc/hostname", root.join("d/link.md")).unwrap();
        assert!(matches!(read_capped(root, "d/link.md", 100), Err(Refused::Link(_))));
        std::os::unix::fs::symlink("/etc", root.join("e")).unwrap();
        assert!(matches!(read_capped(root, "e/hostname", 100), Err(Refused::Link(_))));
        let fifo = root.join("d/fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        assert!(matches!(read_capped(root, "d/fifo", 100), Err(Refused::NotAFile(_))));
        assert!(matches!(read_capped(root, "../x", 100), Err(Refused::Outside(_))));
    }
}
