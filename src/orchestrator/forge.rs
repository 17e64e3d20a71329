//! Pull requests on forges: GitHub (and GitHub Enterprise), GitLab, Gitea and Forgejo,
//! each behind the narrow [`Forge`] trait. Which forge, where its API is and which
//! project a repository is come from the remote URL ([`resolve`]) where that is enough,
//! and from `[repos.NAME.forge]` where it is not. Tokens are sent in headers only and
//! never appear in an error.

use serde::Serialize;
use serde_json::{Value, json};

use crate::config::ForgeConfig;
use crate::http::{JsonClient, Response};

pub use crate::config::ForgeKind;

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

/// A repository on a forge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgeTarget {
    pub kind: ForgeKind,
    /// The REST API root: `https://api.github.com`, `https://host/api/v4`, `https://host/api/v1`.
    pub api_url: String,
    /// The project's page: `https://github.com/owner/repo`.
    pub web_url: String,
    /// `owner/repo` (GitLab: `group/subgroup/repo`).
    pub project: String,
}

impl ForgeTarget {
    /// The page of a branch.
    pub fn branch_url(&self, branch: &str) -> String {
        match self.kind {
            ForgeKind::Gitlab => format!("{}/-/tree/{branch}", self.web_url),
            ForgeKind::Gitea => format!("{}/src/branch/{branch}", self.web_url),
            _ => format!("{}/tree/{branch}", self.web_url),
        }
    }
}

/// A remote URL taken apart: `https://host[:port]/path`, `ssh://[user@]host[:port]/path`
/// or scp-like `user@host:path`.
fn split_remote(url: &str) -> Option<(String, String, String)> {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => {
            let (userhost, path) = url.split_once(':')?;
            if userhost.contains('/') || !userhost.contains('@') {
                return None;
            }
            let host = userhost.rsplit('@').next()?;
            return Some(("https".into(), host.to_ascii_lowercase(), path.to_owned()));
        }
    };
    let (authority, path) = rest.split_once('/')?;
    let hostport = authority.rsplit('@').next()?.to_ascii_lowercase();
    let host = match scheme.as_str() {
        // The web server of an SSH remote is the host's default HTTPS one.
        "http" | "https" => hostport,
        _ => hostport.split(':').next()?.to_owned(),
    };
    let web_scheme = if scheme == "http" { "http" } else { "https" };
    Some((web_scheme.to_owned(), host, path.to_owned()))
}

/// Works out the forge of a repository from its remote URL and its `[repos.NAME.forge]`
/// settings. `Ok(None)`: no forge (a path on disk, an unknown host, or `kind = "none"`).
/// An error says which setting is missing.
pub fn resolve(remote_url: &str, config: &ForgeConfig) -> Result<Option<ForgeTarget>, String> {
    if config.kind == Some(ForgeKind::None) {
        return Ok(None);
    }
    let parts = split_remote(remote_url);
    let host = parts.as_ref().map(|(_, host, _)| host.as_str()).unwrap_or_default();
    let bare_host = host.split(':').next().unwrap_or_default();
    let detected = if bare_host == "github.com" {
        Some(ForgeKind::Github)
    } else if bare_host == "gitlab.com" || bare_host.starts_with("gitlab.") {
        Some(ForgeKind::Gitlab)
    } else if bare_host == "codeberg.org" || bare_host.starts_with("gitea.") || bare_host.starts_with("forgejo.") {
        Some(ForgeKind::Gitea)
    } else {
        None
    };
    let Some(kind) = config.kind.or(detected) else {
        return Ok(None);
    };
    let project = if !config.project.is_empty() {
        config.project.trim_matches('/').to_owned()
    } else if let Some((_, _, path)) = &parts {
        let path = path.trim_matches('/');
        path.strip_suffix(".git").unwrap_or(path).to_owned()
    } else {
        return Err("the remote is not a URL: set `project` (OWNER/REPO) and `api_url`".into());
    };
    if !project.contains('/') {
        return Err(format!("the project {project:?} is not of the form OWNER/REPO"));
    }
    let site = parts.as_ref().map(|(scheme, host, _)| format!("{scheme}://{host}"));
    let api_url = if !config.api_url.is_empty() {
        config.api_url.trim_end_matches('/').to_owned()
    } else {
        match (&site, kind) {
            (Some(_), ForgeKind::Github) if bare_host == "github.com" => "https://api.github.com".to_owned(),
            (Some(site), ForgeKind::Github) => format!("{site}/api/v3"),
            (Some(site), ForgeKind::Gitlab) => format!("{site}/api/v4"),
            (Some(site), ForgeKind::Gitea) => format!("{site}/api/v1"),
            _ => return Err("cannot tell the forge's API from the remote: set `api_url`".into()),
        }
    };
    let web_url = if !config.web_url.is_empty() {
        config.web_url.trim_end_matches('/').to_owned()
    } else {
        match &site {
            Some(site) => format!("{site}/{project}"),
            None => return Err("cannot tell the forge's web address from the remote: set `web_url`".into()),
        }
    };
    Ok(Some(ForgeTarget {
        kind,
        api_url,
        web_url,
        project,
    }))
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
    /// Whether pull request `number` is still open, or was merged or closed.
    async fn state(&self, number: i64) -> Result<PrState, ForgeError>;
}

/// Where a pull request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrState {
    Open,
    Merged,
    Closed,
}

impl PrState {
    /// From GitHub's and Gitea's `state` and `merged`, or GitLab's `state`.
    fn from_json(json: &Value) -> PrState {
        match (json["state"].as_str(), json["merged"].as_bool()) {
            (Some("open" | "opened" | "locked"), _) => PrState::Open,
            (Some("merged"), _) | (_, Some(true)) => PrState::Merged,
            _ => PrState::Closed,
        }
    }

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
        let mut headers = vec![("authorization", self.auth.as_str()), ("user-agent", "threadline/0.1")];
        if self.target.kind == ForgeKind::Github {
            headers.push(("accept", "application/vnd.github+json"));
            headers.push(("x-github-api-version", "2022-11-28"));
        }
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

    /// Calls and turns the common failures (401, 403, 404) into errors.
    async fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ForgeError> {
        let res = self.call(method, path, body).await?;
        if res.is_success() {
            Ok(res.json)
        } else {
            Err(common_error(&res))
        }
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
    if matches!(res.status, 401 | 403) {
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

struct GitHub(Api);

#[async_trait::async_trait]
impl Forge for GitHub {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let owner = self.0.target.project.split('/').next().unwrap_or_default();
        let path = format!(
            "/repos/{}/pulls?{}",
            self.0.target.project,
            query(&[("head", &format!("{owner}:{head}")), ("base", base), ("state", "open")])
        );
        let list = self.0.ok("GET", &path, None).await?;
        Ok(list
            .as_array()
            .and_then(|prs| prs.iter().find_map(|pr| number_and_url(pr, "number", "html_url"))))
    }

    async fn state(&self, number: i64) -> Result<PrState, ForgeError> {
        let path = format!("/repos/{}/pulls/{number}", self.0.target.project);
        Ok(PrState::from_json(&self.0.ok("GET", &path, None).await?))
    }

    async fn open(&self, pr: &NewPullRequest) -> Result<Opened, ForgeError> {
        let project = &self.0.target.project;
        let body = json!({"title": pr.title, "head": pr.head, "base": pr.base, "body": pr.body, "draft": pr.draft});
        let opened = self
            .0
            .create(&format!("/repos/{project}/pulls"), &body, "number", "html_url")
            .await?;
        let mut warnings = Vec::new();
        if !pr.labels.is_empty() {
            let path = format!("/repos/{project}/issues/{}/labels", opened.number);
            let labels = json!({"labels": pr.labels});
            self.0
                .add(&path, labels, "the labels were not added", &mut warnings)
                .await;
        }
        if !pr.reviewers.is_empty() {
            let path = format!("/repos/{project}/pulls/{}/requested_reviewers", opened.number);
            let reviewers = json!({"reviewers": pr.reviewers});
            self.0
                .add(&path, reviewers, "the reviewers were not requested", &mut warnings)
                .await;
        }
        Ok(Opened { pr: opened, warnings })
    }
}

struct GitLab(Api);

impl GitLab {
    fn project_path(&self) -> String {
        format!("/projects/{}", segment(&self.0.target.project))
    }
}

#[async_trait::async_trait]
impl Forge for GitLab {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        let path = format!(
            "{}/merge_requests?{}",
            self.project_path(),
            query(&[("state", "opened"), ("source_branch", head), ("target_branch", base)])
        );
        let list = self.0.ok("GET", &path, None).await?;
        Ok(list
            .as_array()
            .and_then(|mrs| mrs.iter().find_map(|mr| number_and_url(mr, "iid", "web_url"))))
    }

    async fn state(&self, number: i64) -> Result<PrState, ForgeError> {
        let path = format!("{}/merge_requests/{number}", self.project_path());
        Ok(PrState::from_json(&self.0.ok("GET", &path, None).await?))
    }

    async fn open(&self, pr: &NewPullRequest) -> Result<Opened, ForgeError> {
        let mut warnings = Vec::new();
        // Reviewers are user ids on GitLab: look each name up.
        let mut reviewer_ids = Vec::new();
        for name in &pr.reviewers {
            let found = self
                .0
                .ok("GET", &format!("/users?{}", query(&[("username", name)])), None)
                .await;
            match found.ok().and_then(|users| users[0]["id"].as_i64()) {
                Some(id) => reviewer_ids.push(id),
                None => warnings.push(format!("the reviewer {name:?} was not found")),
            }
        }
        let title = if pr.draft {
            format!("Draft: {}", pr.title)
        } else {
            pr.title.clone()
        };
        let mut body = json!({
            "source_branch": pr.head,
            "target_branch": pr.base,
            "title": title,
            "description": pr.body,
        });
        if !pr.labels.is_empty() {
            body["labels"] = json!(pr.labels.join(","));
        }
        if !reviewer_ids.is_empty() {
            body["reviewer_ids"] = json!(reviewer_ids);
        }
        let path = format!("{}/merge_requests", self.project_path());
        let opened = self.0.create(&path, &body, "iid", "web_url").await?;
        Ok(Opened { pr: opened, warnings })
    }
}

struct Gitea(Api);

#[async_trait::async_trait]
impl Forge for Gitea {
    async fn find_open(&self, head: &str, base: &str) -> Result<Option<PullRequest>, ForgeError> {
        // Gitea's list has no head filter: page through the open ones.
        for page in 1..=20 {
            let path = format!(
                "/repos/{}/pulls?{}",
                self.0.target.project,
                query(&[("state", "open"), ("limit", "50"), ("page", &page.to_string())])
            );
            let list = self.0.ok("GET", &path, None).await?;
            let Some(prs) = list.as_array().filter(|l| !l.is_empty()) else {
                return Ok(None);
            };
            let found = prs
                .iter()
                .find(|pr| pr["head"]["ref"].as_str() == Some(head) && pr["base"]["ref"].as_str() == Some(base));
            if let Some(pr) = found {
                return Ok(number_and_url(pr, "number", "html_url"));
            }
        }
        Ok(None)
    }

    async fn state(&self, number: i64) -> Result<PrState, ForgeError> {
        let path = format!("/repos/{}/pulls/{number}", self.0.target.project);
        Ok(PrState::from_json(&self.0.ok("GET", &path, None).await?))
    }

    async fn open(&self, pr: &NewPullRequest) -> Result<Opened, ForgeError> {
        let project = &self.0.target.project;
        let mut warnings = Vec::new();
        // Labels are ids on Gitea: look the names up among the repository's labels.
        let mut label_ids = Vec::new();
        if !pr.labels.is_empty() {
            let known = self
                .0
                .ok("GET", &format!("/repos/{project}/labels?limit=50"), None)
                .await
                .unwrap_or(Value::Null);
            for name in &pr.labels {
                let id = known
                    .as_array()
                    .and_then(|ls| ls.iter().find(|l| l["name"].as_str() == Some(name)))
                    .and_then(|l| l["id"].as_i64());
                match id {
                    Some(id) => label_ids.push(id),
                    None => warnings.push(format!("the label {name:?} does not exist on the repository")),
                }
            }
        }
        let title = if pr.draft {
            format!("WIP: {}", pr.title)
        } else {
            pr.title.clone()
        };
        let mut body = json!({"head": pr.head, "base": pr.base, "title": title, "body": pr.body});
        if !label_ids.is_empty() {
            body["labels"] = json!(label_ids);
        }
        let opened = self
            .0
            .create(&format!("/repos/{project}/pulls"), &body, "number", "html_url")
            .await?;
        if !pr.reviewers.is_empty() {
            let path = format!("/repos/{project}/pulls/{}/requested_reviewers", opened.number);
            let reviewers = json!({"reviewers": pr.reviewers});
            self.0
                .add(&path, reviewers, "the reviewers were not requested", &mut warnings)
                .await;
        }
        Ok(Opened { pr: opened, warnings })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            retry_after: None,
            json,
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
