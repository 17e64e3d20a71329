//! Pull requests on forges: GitHub (and GitHub Enterprise), GitLab, Gitea and Forgejo,
//! each behind the narrow [`Forge`] trait. Which forge, where its API is and which
//! project a repository is come from the remote URL ([`resolve`]) where that is enough,
//! and from `[repos.NAME.forge]` where it is not. Tokens are sent in headers only and
//! never appear in an error.

//!
//! One file per forge (`github.rs`, `gitlab.rs`, `gitea.rs`), the URL detection in
//! `detect.rs`, and here what they share: the trait, its types and errors, and `Api`.

mod detect;
mod gitea;
mod github;
mod gitlab;
pub mod hooks;

use serde::Serialize;
use serde_json::Value;

use crate::http::{JsonClient, Response};

pub use crate::config::ForgeKind;
pub use detect::{ForgeTarget, resolve};
use gitea::Gitea;
use github::GitHub;
use gitlab::GitLab;

impl ForgeKind {
    pub fn name(self) -> &'static str {
        match self {
            ForgeKind::Github => "GitHub",
            ForgeKind::Gitlab => "GitLab",
            ForgeKind::Gitea => "Gitea",
            ForgeKind::None => "no forge",
        }
    }

    /// What the forge calls a pull request.
    pub fn noun(self) -> &'static str {
        match self {
            ForgeKind::Gitlab => "merge request",
            _ => "pull request",
        }
    }

    /// How the forge refers to number `n` in prose.
    pub fn reference(self, n: i64) -> String {
        match self {
            ForgeKind::Gitlab => format!("!{n}"),
            _ => format!("#{n}"),
        }
    }
}

/// A pull request as Threadline keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PullRequest {
    pub number: i64,
    pub url: String,
}

/// A pull request to open.
#[derive(Debug, Clone, Default)]
pub struct NewPullRequest {
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
}

/// What opening a pull request produced; `warnings` are extras (labels, reviewers)
/// that did not apply, for a pull request that was opened all the same.
#[derive(Debug, Clone)]
pub struct Opened {
    pub pr: PullRequest,
    pub warnings: Vec<String>,
}

/// Why a forge call failed, sorted into what a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgeError {
    #[error("no token is configured")]
    NoToken,
    #[error("the token was refused")]
    Unauthorized,
    #[error("the token may not do this")]
    Forbidden,
    #[error("the project was not found")]
    ProjectNotFound,
    #[error("the branch is not on the forge")]
    BranchMissing,
    #[error("the base branch is not on the forge")]
    BaseMissing,
    #[error("there are no commits between the branch and its base")]
    NoCommits,
    #[error("a pull request for the branch already exists")]
    AlreadyExists,
    #[error("the forge cannot be reached: {0}")]
    Unreachable(String),
    #[error("the forge's rate limit is reached; it may be asked again in {} s", .0.as_secs())]
    RateLimited(std::time::Duration),
    #[error("the forge answered {status}: {message}")]
    Other { status: u16, message: String },
}

/// The narrow interface each forge implements.
#[async_trait::async_trait]
pub trait Forge: Send + Sync {
    /// The open pull request from `head` into `base`, if there is one.
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError>;
    /// Opens a pull request; labels and reviewers are applied as the forge allows.
    async fn open(&self, pr: &NewPullRequest) -> Result<Opened, ForgeError>;
    /// Whether pull request `number` is still open, or was merged or closed (and by
    /// whom, where the forge says). Asked conditionally: an unchanged answer costs the
    /// rate limit nothing where the forge supports it.
    async fn state(&self, number: i64) -> Result<PrStatus, ForgeError>;
    /// Comments on pull request `number`: in reply to `to` where the forge threads
    /// replies (a review comment's thread, a GitLab discussion), else on the pull request.
    async fn reply(&self, number: i64, to: &CommentRef, body: &str) -> Result<(), ForgeError>;
}

/// A comment on a pull request, as far as replying to it needs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CommentRef {
    /// The forge's id of the comment.
    pub id: String,
    /// A comment on a line of the diff (GitHub threads replies to those).
    pub on_diff: bool,
    /// GitLab's discussion id, which replies join.
    pub discussion: Option<String>,
}

/// Where a pull request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrState {
    Open,
    Merged,
    Closed,
}

/// A pull request's state, and who merged or closed it where the forge says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrStatus {
    pub state: PrState,
    pub by: Option<String>,
}

impl PrStatus {
    /// From GitHub's and Gitea's `state`, `merged` and `merged_by`, or GitLab's `state`,
    /// `merge_user` / `merged_by` and `closed_by`.
    fn from_json(json: &Value) -> PrStatus {
        let state = match (json["state"].as_str(), json["merged"].as_bool()) {
            (Some("open" | "opened" | "locked"), _) => PrState::Open,
            (Some("merged"), _) | (_, Some(true)) => PrState::Merged,
            _ => PrState::Closed,
        };
        let user = |key: &str| {
            let u = &json[key];
            u["login"]
                .as_str()
                .or(u["username"].as_str())
                .map(crate::untrusted::name)
                .filter(|n| !n.is_empty())
        };
        let by = match state {
            PrState::Open => None,
            PrState::Merged => user("merged_by").or_else(|| user("merge_user")),
            PrState::Closed => user("closed_by"),
        };
        PrStatus { state, by }
    }
}

impl PrState {
    pub fn word(self) -> &'static str {
        match self {
            PrState::Open => "open",
            PrState::Merged => "merged",
            PrState::Closed => "closed",
        }
    }
}

/// The client for `target` over `http`, authenticating with `token`.
pub fn client(target: &ForgeTarget, token: &str, http: &JsonClient) -> Result<Box<dyn Forge>, ForgeError> {
    if token.is_empty() {
        return Err(ForgeError::NoToken);
    }
    let api = Api {
        http: http.clone(),
        target: target.clone(),
        auth: match target.kind {
            ForgeKind::Gitea => format!("token {token}"),
            _ => format!("Bearer {token}"),
        },
    };
    Ok(match target.kind {
        ForgeKind::Github => Box::new(GitHub(api)),
        ForgeKind::Gitlab => Box::new(GitLab(api)),
        ForgeKind::Gitea => Box::new(Gitea(api)),
        ForgeKind::None => unreachable!("resolve gives no target for kind none"),
    })
}

/// What the three clients share: the HTTP client, the target and the auth header.
struct Api {
    http: JsonClient,
    target: ForgeTarget,
    auth: String,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Response, ForgeError> {
        let url = format!("{}{path}", self.target.api_url);
        let headers = self.headers();
        let res = self
            .http
            .call(method, &url, &headers, body)
            .await
            .map_err(ForgeError::Unreachable)?;
        tracing::debug!(method, path, status = res.status, "forge call");
        Ok(res)
    }

    /// Creates a pull request at `path`; the answer names it by `number_key` and `url_key`.
    async fn create(
        &self,
        path: &str,
        body: &Value,
        number_key: &str,
        url_key: &str,
    ) -> Result<PullRequest, ForgeError> {
        let res = self.call("POST", path, Some(body)).await?;
        if !res.is_success() {
            return Err(create_error(&res));
        }
        number_and_url(&res.json, number_key, url_key).ok_or_else(|| ForgeError::Other {
            status: res.status,
            message: format!("the answer has no {number_key} or {url_key}"),
        })
    }

    /// A call that adds something to a pull request that exists; a failure becomes a
    /// warning, since the pull request stands.
    async fn add(&self, path: &str, body: Value, what: &str, warnings: &mut Vec<String>) {
        if let Err(e) = self.ok("POST", path, Some(&body)).await {
            warnings.push(format!("{what} ({e})"));
        }
    }

    /// Calls and turns the common failures (401, 403, 404, rate limits) into errors.
    async fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ForgeError> {
        let res = self.call(method, path, body).await?;
        if res.is_success() {
            Ok(res.json)
        } else {
            Err(common_error(&res))
        }
    }

    /// A conditional GET (see [`JsonClient::get_conditional`]), with the failures of [`Api::ok`].
    async fn get_cached(&self, path: &str) -> Result<Value, ForgeError> {
        let url = format!("{}{path}", self.target.api_url);
        let headers = self.headers();
        let res = self
            .http
            .get_conditional(&url, &headers)
            .await
            .map_err(ForgeError::Unreachable)?;
        tracing::debug!(path, status = res.status, not_modified = res.not_modified, "forge call");
        if res.is_success() {
            Ok(res.json)
        } else {
            Err(common_error(&res))
        }
    }

    fn headers(&self) -> Vec<(&'static str, &str)> {
        let mut headers = vec![("authorization", self.auth.as_str()), ("user-agent", "threadline/0.1")];
        if self.target.kind == ForgeKind::Github {
            headers.push(("accept", "application/vnd.github+json"));
            headers.push(("x-github-api-version", "2022-11-28"));
        }
        headers
    }
}

/// The forge's own words from an error body (`message`, GitHub's `errors[].message`,
/// GitLab's message lists and maps), flattened to one line.
fn message_of(json: &Value) -> String {
    fn flatten(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
            Value::Object(map) => {
                // The forge's own sentence first, then its details.
                let (said, details): (Vec<_>, Vec<_>) = map.iter().partition(|(k, _)| *k == "message" || *k == "error");
                for (_, v) in said {
                    flatten(v, out);
                }
                for (k, v) in details {
                    let mut inner = Vec::new();
                    flatten(v, &mut inner);
                    if k != "documentation_url" && k != "url" && k != "status" && !inner.is_empty() {
                        out.push(format!("{k} {}", inner.join(", ")));
                    }
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    flatten(json, &mut out);
    out.join("; ")
}

fn common_error(res: &Response) -> ForgeError {
    if let Some(wait) = res.rate_limited() {
        return ForgeError::RateLimited(wait);
    }
    match res.status {
        401 => ForgeError::Unauthorized,
        403 => ForgeError::Forbidden,
        404 => ForgeError::ProjectNotFound,
        status => ForgeError::Other {
            status,
            message: message_of(&res.json),
        },
    }
}

/// Sorts a refused create by the forge's words: the three forges say the same things
/// in different shapes and statuses.
fn create_error(res: &Response) -> ForgeError {
    let text = message_of(&res.json).to_lowercase();
    let has = |s: &str| text.contains(s);
    if matches!(res.status, 401 | 403 | 429) {
        return common_error(res);
    }
    if has("already exists") {
        ForgeError::AlreadyExists
    } else if has("no commits between") || has("there are no changes") || has("no changes between") {
        ForgeError::NoCommits
    } else if has("source_branch") || has("source branch") || has("head invalid") || has("field head") {
        ForgeError::BranchMissing
    } else if has("target_branch") || has("target branch") || has("base invalid") || has("field base") {
        ForgeError::BaseMissing
    } else {
        common_error(res)
    }
}

fn number_and_url(json: &Value, number_key: &str, url_key: &str) -> Option<PullRequest> {
    Some(PullRequest {
        number: json[number_key].as_i64()?,
        url: json[url_key].as_str()?.to_owned(),
    })
}

/// A component of a URL path, percent-encoded.
fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ForgeConfig;
    use serde_json::json;

    fn cfg() -> ForgeConfig {
        ForgeConfig::default()
    }

    #[test]
    fn forges_are_told_from_remote_urls() {
        let gh = resolve("git@github.com:acme/widget.git", &cfg()).unwrap().unwrap();
        assert_eq!(gh.kind, ForgeKind::Github);
        assert_eq!(gh.api_url, "https://api.github.com");
        assert_eq!(gh.project, "acme/widget");
        assert_eq!(gh.branch_url("tl/x"), "https://github.com/acme/widget/tree/tl/x");

        let gl = resolve("https://gitlab.example.com/group/sub/app.git", &cfg())
            .unwrap()
            .unwrap();
        assert_eq!(gl.kind, ForgeKind::Gitlab);
        assert_eq!(gl.api_url, "https://gitlab.example.com/api/v4");
        assert_eq!(gl.project, "group/sub/app");
        assert_eq!(gl.branch_url("b"), "https://gitlab.example.com/group/sub/app/-/tree/b");

        let cb = resolve("ssh://git@codeberg.org:22/me/tool.git", &cfg())
            .unwrap()
            .unwrap();
        assert_eq!(cb.kind, ForgeKind::Gitea);
        assert_eq!(cb.api_url, "https://codeberg.org/api/v1");
        assert_eq!(cb.branch_url("b"), "https://codeberg.org/me/tool/src/branch/b");

        assert_eq!(resolve("/srv/git/app.git", &cfg()).unwrap(), None);
        assert_eq!(resolve("https://git.internal/app.git", &cfg()).unwrap(), None);
    }

    #[test]
    fn configuration_fills_in_what_the_url_cannot_tell() {
        let ghe = ForgeConfig {
            kind: Some(ForgeKind::Github),
            ..cfg()
        };
        let t = resolve("https://git.corp.example/team/app", &ghe).unwrap().unwrap();
        assert_eq!(t.api_url, "https://git.corp.example/api/v3");
        assert_eq!(t.web_url, "https://git.corp.example/team/app");

        let off = ForgeConfig {
            kind: Some(ForgeKind::None),
            ..cfg()
        };
        assert_eq!(resolve("git@github.com:a/b.git", &off).unwrap(), None);

        let local = ForgeConfig {
            kind: Some(ForgeKind::Gitea),
            ..cfg()
        };
        let err = resolve("/srv/git/app.git", &local).unwrap_err();
        assert!(err.contains("project"), "{err}");
    }

    #[test]
    fn refusals_are_sorted_by_the_forges_words() {
        let res = |status, json| Response {
            status,
            json,
            ..Response::default()
        };
        let gh_exists = json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom",
            "message": "A pull request already exists for acme:tl/x."}]});
        assert_eq!(create_error(&res(422, gh_exists)), ForgeError::AlreadyExists);
        let gh_empty = json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom",
            "message": "No commits between main and tl/x"}]});
        assert_eq!(create_error(&res(422, gh_empty)), ForgeError::NoCommits);
        let gh_head = json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "field": "head",
            "code": "invalid"}]});
        assert_eq!(
            message_of(&gh_head),
            "Validation Failed; errors code invalid, field head, resource PullRequest"
        );
        assert_eq!(create_error(&res(422, gh_head)), ForgeError::BranchMissing);
        let gl_branch = json!({"message": {"source_branch": ["does not exist"]}});
        assert_eq!(create_error(&res(422, gl_branch)), ForgeError::BranchMissing);
        assert_eq!(
            create_error(&res(401, json!({"message": "401 Unauthorized"}))),
            ForgeError::Unauthorized
        );
    }
}
