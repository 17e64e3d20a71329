//! The forges' webhooks: the signature checked before a byte of the payload is read,
//! then the few events Threadline acts on (a pull request merged, closed or reopened; a
//! comment or review on it), with every field bounded and cleaned. A payload is the
//! forge's, but what people wrote in it is untrusted.

use hmac::{KeyInit, Mac};
use serde_json::Value;
use std::collections::HashMap;
use subtle::ConstantTimeEq;

use super::{CommentRef, ForgeKind, PrState};
use crate::untrusted;

/// The longest comment body kept.
pub const MAX_COMMENT_BYTES: usize = 16 * 1024;
/// The longest diff hunk kept.
pub const MAX_HUNK_BYTES: usize = 8 * 1024;

/// A request's headers, names lower-cased.
pub type Headers = HashMap<String, String>;

/// Why a webhook was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HookError {
    #[error("the request carries no signature")]
    Unsigned,
    #[error("the signature does not match the configured webhook secret")]
    BadSignature,
    #[error("the payload is not what {0} sends: {1}")]
    Malformed(&'static str, String),
}

/// A verified delivery: its id (for the logs), the project it is about (`OWNER/REPO`,
/// GitLab's full path), and what it says, if Threadline acts on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    pub delivery: Option<String>,
    pub project: Option<String>,
    pub event: Option<ForgeEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ForgeEvent {
    /// A pull request was merged, closed or reopened.
    PullRequest {
        number: i64,
        state: PrState,
        by: Option<String>,
    },
    Comment(ReviewComment),
}

/// A comment on a pull request, a comment on a line of its diff, or a review's summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewComment {
    pub number: i64,
    pub comment: CommentRef,
    pub author: String,
    /// Cleaned of control characters, at most [`MAX_COMMENT_BYTES`].
    pub body: String,
    pub path: Option<String>,
    pub line: Option<i64>,
    pub hunk: Option<String>,
    /// Part of a review (a review's summary or one of its line comments), not a plain
    /// comment on the pull request.
    pub review: bool,
}

/// Checks the request's signature against `secret`: GitHub's `X-Hub-Signature-256`,
/// Gitea's and Forgejo's `X-Gitea-Signature` / `X-Forgejo-Signature` (HMAC-SHA256 of the
/// body), GitLab's `X-Gitlab-Token` (the secret itself). Compared in constant time.
pub fn verify(kind: ForgeKind, secret: &str, headers: &Headers, body: &[u8]) -> Result<(), HookError> {
    let header = |name: &str| headers.get(name).map(String::as_str);
    match kind {
        ForgeKind::Gitlab => {
            let given = header("x-gitlab-token").ok_or(HookError::Unsigned)?;
            if bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
                Ok(())
            } else {
                Err(HookError::BadSignature)
            }
        }
        _ => {
            let hex = match kind {
                ForgeKind::Github => header("x-hub-signature-256").and_then(|s| s.strip_prefix("sha256=")),
                _ => header("x-gitea-signature")
                    .or_else(|| header("x-forgejo-signature"))
                    .or_else(|| header("x-hub-signature-256").and_then(|s| s.strip_prefix("sha256="))),
            }
            .ok_or(HookError::Unsigned)?;
            let given = from_hex(hex).ok_or(HookError::BadSignature)?;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
            mac.update(body);
            mac.verify_slice(&given).map_err(|_| HookError::BadSignature)
        }
    }
}

fn from_hex(hex: &str) -> Option<Vec<u8>> {
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Reads a verified delivery. Events Threadline does not act on give `event: None`.
pub fn parse(kind: ForgeKind, headers: &Headers, body: &[u8]) -> Result<Hook, HookError> {
    let header = |name: &str| headers.get(name).map(|v| untrusted::prefix(v, 128).to_owned());
    let forge = kind.name();
    let json: Value = serde_json::from_slice(body).map_err(|e| HookError::Malformed(forge, e.to_string()))?;
    let (event, delivery) = match kind {
        ForgeKind::Github => (header("x-github-event"), header("x-github-delivery")),
        ForgeKind::Gitlab => (
            header("x-gitlab-event"),
            header("x-gitlab-event-uuid").or_else(|| header("idempotency-key")),
        ),
        _ => (
            header("x-gitea-event").or_else(|| header("x-forgejo-event")),
            header("x-gitea-delivery").or_else(|| header("x-forgejo-delivery")),
        ),
    };
    let event = event.ok_or(HookError::Malformed(forge, "it names no event".into()))?;
    let parsed = match kind {
        ForgeKind::Github => github(&event, &json),
        ForgeKind::Gitlab => gitlab(&event, &json),
        _ => gitea(&json, body),
    };
    let project = match kind {
        ForgeKind::Gitlab => json["project"]["path_with_namespace"].as_str(),
        _ => json["repository"]["full_name"].as_str(),
    }
    .map(|p| untrusted::prefix(p, 512).to_owned());
    Ok(Hook {
        delivery,
        project,
        event: parsed,
    })
}

fn user(v: &Value) -> Option<String> {
    v["login"]
        .as_str()
        .or(v["username"].as_str())
        .map(untrusted::name)
        .filter(|n| !n.is_empty())
}

fn text(v: &Value, max: usize) -> Option<String> {
    v.as_str()
        .map(|s| untrusted::truncate(&untrusted::clean(s), max))
        .filter(|s| !s.trim().is_empty())
}

fn id(v: &Value) -> Option<String> {
    match v {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(untrusted::name(s)).filter(|s| !s.is_empty()),
        _ => None,
    }
}

/// A comment or review on the pull request itself (no file, line or hunk).
fn on_pull_request(
    number: Option<i64>,
    id: Option<String>,
    author: &Value,
    body: &Value,
    review: bool,
) -> Option<ForgeEvent> {
    Some(ForgeEvent::Comment(ReviewComment {
        number: number?,
        comment: CommentRef {
            id: id?,
            on_diff: false,
            discussion: None,
        },
        author: user(author)?,
        body: text(body, MAX_COMMENT_BYTES)?,
        path: None,
        line: None,
        hunk: None,
        review,
    }))
}

/// A state change for `merged`/`closed`/`reopened` actions.
fn state_change(action: &str, number: Option<i64>, merged: bool, by: Option<String>) -> Option<ForgeEvent> {
    let state = match action {
        "closed" | "close" if merged => PrState::Merged,
        "merge" => PrState::Merged,
        "closed" | "close" => PrState::Closed,
        "reopened" | "reopen" => PrState::Open,
        _ => return None,
    };
    Some(ForgeEvent::PullRequest {
        number: number?,
        state,
        by: by.filter(|_| state != PrState::Open),
    })
}

fn github(event: &str, json: &Value) -> Option<ForgeEvent> {
    let action = json["action"].as_str().unwrap_or_default();
    let pr = &json["pull_request"];
    match event {
        "pull_request" => {
            let merged = pr["merged"].as_bool().unwrap_or(false);
            let by = if merged { user(&pr["merged_by"]) } else { None }.or_else(|| user(&json["sender"]));
            state_change(action, pr["number"].as_i64(), merged, by)
        }
        "pull_request_review_comment" if action == "created" => {
            let c = &json["comment"];
            Some(ForgeEvent::Comment(ReviewComment {
                number: pr["number"].as_i64()?,
                comment: CommentRef {
                    id: id(&c["id"])?,
                    on_diff: true,
                    discussion: None,
                },
                author: user(&c["user"])?,
                body: text(&c["body"], MAX_COMMENT_BYTES)?,
                path: text(&c["path"], 1024),
                line: c["line"].as_i64().or(c["original_line"].as_i64()),
                hunk: text(&c["diff_hunk"], MAX_HUNK_BYTES),
                review: true,
            }))
        }
        "pull_request_review" if action == "submitted" => {
            let r = &json["review"];
            let id = id(&r["id"]).map(|i| format!("review-{i}"));
            on_pull_request(pr["number"].as_i64(), id, &r["user"], &r["body"], true)
        }
        // A comment on the pull request's conversation (an issue comment on a PR).
        "issue_comment" if action == "created" && json["issue"]["pull_request"].is_object() => {
            let c = &json["comment"];
            on_pull_request(
                json["issue"]["number"].as_i64(),
                id(&c["id"]),
                &c["user"],
                &c["body"],
                false,
            )
        }
        _ => None,
    }
}

fn gitlab(event: &str, json: &Value) -> Option<ForgeEvent> {
    let attrs = &json["object_attributes"];
    match event {
        "Merge Request Hook" => {
            let action = attrs["action"].as_str().unwrap_or_default();
            state_change(action, attrs["iid"].as_i64(), action == "merge", user(&json["user"]))
        }
        "Note Hook" if attrs["noteable_type"].as_str() == Some("MergeRequest") => {
            let position = &attrs["position"];
            let on_diff = attrs["type"].as_str() == Some("DiffNote");
            Some(ForgeEvent::Comment(ReviewComment {
                number: json["merge_request"]["iid"].as_i64()?,
                comment: CommentRef {
                    id: id(&attrs["id"])?,
                    on_diff,
                    discussion: attrs["discussion_id"]
                        .as_str()
                        .map(untrusted::name)
                        .filter(|d| !d.is_empty()),
                },
                author: user(&json["user"])?,
                body: text(&attrs["note"], MAX_COMMENT_BYTES)?,
                path: text(&position["new_path"], 1024).or_else(|| text(&position["old_path"], 1024)),
                line: position["new_line"].as_i64().or(position["old_line"].as_i64()),
                hunk: text(&attrs["st_diff"]["diff"], MAX_HUNK_BYTES),
                review: on_diff,
            }))
        }
        _ => None,
    }
}

/// Gitea and Forgejo name their events differently across versions (`X-Gitea-Event`
/// against `X-Gitea-Event-Type`), so what a payload is comes from its shape.
fn gitea(json: &Value, body: &[u8]) -> Option<ForgeEvent> {
    let action = json["action"].as_str().unwrap_or_default();
    let pr = &json["pull_request"];
    // A submitted review: Gitea gives it no id, so its key is the signed body's digest.
    if action == "reviewed" && json["review"].is_object() {
        use sha2::Digest;
        let digest: String = sha2::Sha256::digest(body)
            .iter()
            .take(16)
            .map(|b| format!("{b:02x}"))
            .collect();
        let number = pr["number"].as_i64().or(json["number"].as_i64());
        return on_pull_request(
            number,
            Some(format!("review-{digest}")),
            &json["sender"],
            &json["review"]["content"],
            true,
        );
    }
    if action == "created" && json["comment"].is_object() && json["is_pull"].as_bool() == Some(true) {
        let c = &json["comment"];
        return on_pull_request(
            json["issue"]["number"].as_i64(),
            id(&c["id"]),
            &c["user"],
            &c["body"],
            false,
        );
    }
    if pr.is_object() {
        let merged = pr["merged"].as_bool().unwrap_or(false);
        let by = if merged { user(&pr["merged_by"]) } else { None }.or_else(|| user(&json["sender"]));
        return state_change(action, pr["number"].as_i64(), merged, by);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&'static str, &str)]) -> Headers {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sign(secret: &str, body: &[u8]) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(body);
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn signatures_are_checked_per_forge() {
        let body = br#"{"action":"closed"}"#;
        let good = format!("sha256={}", sign("s3cret", body));
        let gh = headers(&[("x-hub-signature-256", &good)]);
        assert_eq!(verify(ForgeKind::Github, "s3cret", &gh, body), Ok(()));
        assert_eq!(
            verify(ForgeKind::Github, "other", &gh, body),
            Err(HookError::BadSignature)
        );
        assert_eq!(
            verify(ForgeKind::Github, "s3cret", &gh, br#"{"action":"opened"}"#),
            Err(HookError::BadSignature)
        );
        assert_eq!(
            verify(ForgeKind::Github, "s3cret", &Headers::new(), body),
            Err(HookError::Unsigned)
        );
        let odd = headers(&[("x-hub-signature-256", "sha256=abc")]);
        assert_eq!(
            verify(ForgeKind::Github, "s3cret", &odd, body),
            Err(HookError::BadSignature)
        );
        let gitea = headers(&[("x-gitea-signature", &sign("s3cret", body))]);
        assert_eq!(verify(ForgeKind::Gitea, "s3cret", &gitea, body), Ok(()));
        let gl = headers(&[("x-gitlab-token", "s3cret")]);
        assert_eq!(verify(ForgeKind::Gitlab, "s3cret", &gl, body), Ok(()));
        assert_eq!(
            verify(ForgeKind::Gitlab, "s3cret!", &gl, body),
            Err(HookError::BadSignature)
        );
    }

    #[test]
    fn events_are_read_with_their_fields_bounded_and_cleaned() {
        let payload = json!({
            "action": "created",
            "pull_request": {"number": 4},
            "comment": {"id": 77, "body": "@threadline rename\u{1b}[31m it\u{202e}", "path": "src/a.rs", "line": 12,
                "diff_hunk": "@@ -1 +1 @@\n-a\n+b", "user": {"login": "alice<script>"}},
        });
        let hook = parse(
            ForgeKind::Github,
            &headers(&[
                ("x-github-event", "pull_request_review_comment"),
                ("x-github-delivery", "d-1"),
            ]),
            payload.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(hook.delivery.as_deref(), Some("d-1"));
        let Some(ForgeEvent::Comment(c)) = hook.event else {
            panic!("{hook:?}")
        };
        assert_eq!(c.number, 4);
        assert_eq!(c.comment.id, "77");
        assert!(c.comment.on_diff);
        assert_eq!(c.author, "alicescript");
        assert_eq!(c.body, "@threadline rename it");
        assert_eq!((c.path.as_deref(), c.line), (Some("src/a.rs"), Some(12)));

        let merged = json!({"action": "closed", "pull_request": {"number": 2, "merged": true,
            "merged_by": {"login": "bob"}}, "sender": {"login": "carol"}});
        let hook = parse(
            ForgeKind::Github,
            &headers(&[("x-github-event", "pull_request")]),
            merged.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            hook.event,
            Some(ForgeEvent::PullRequest {
                number: 2,
                state: PrState::Merged,
                by: Some("bob".into())
            })
        );
        let gl = json!({"object_kind": "merge_request", "user": {"username": "dana"},
            "object_attributes": {"iid": 3, "action": "reopen", "state": "opened"}});
        let hook = parse(
            ForgeKind::Gitlab,
            &headers(&[("x-gitlab-event", "Merge Request Hook")]),
            gl.to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(
            hook.event,
            Some(ForgeEvent::PullRequest {
                number: 3,
                state: PrState::Open,
                by: None
            })
        );
        // Events Threadline does not act on, and payloads that are not JSON.
        let ping = parse(
            ForgeKind::Github,
            &headers(&[("x-github-event", "ping")]),
            b"{\"zen\":\"hi\"}",
        );
        assert_eq!(ping.unwrap().event, None);
        assert!(matches!(
            parse(ForgeKind::Github, &headers(&[("x-github-event", "ping")]), b"<html>"),
            Err(HookError::Malformed(..))
        ));
    }
}
