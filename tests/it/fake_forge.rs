//! A fake forge on 127.0.0.1: the parts of GitHub's (`/api/v3`), GitLab's (`/api/v4`)
//! and Gitea's (`/api/v1`) REST APIs that Threadline calls, answering as those forges do,
//! and real git over smart HTTP (`git http-backend` behind a small CGI handler), so a
//! pull request names a branch that really was pushed here.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::harness::git;

/// The token that may do everything, and one that may only read.
pub const TOKEN: &str = "forge-token-good-0001";
pub const READ_ONLY_TOKEN: &str = "forge-token-read-0002";

#[derive(Debug, Clone, PartialEq)]
pub struct Pr {
    pub number: i64,
    pub head: String,
    pub base: String,
    pub title: String,
    pub body: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub open: bool,
    pub merged: bool,
    /// Who merged or closed it.
    pub ended_by: Option<String>,
}

#[derive(Default)]
struct Recorded {
    prs: Vec<Pr>,
    /// `METHOD path` of every API call; `304 GET path` for one answered "not modified".
    calls: Vec<String>,
    /// Comments posted: (path, body).
    comments: Vec<(String, String)>,
    /// Every API call is refused with a rate limit while set.
    rate_limited: bool,
}

#[derive(Clone)]
struct Shared {
    root: PathBuf,
    addr: SocketAddr,
    rec: Arc<Mutex<Recorded>>,
}

pub struct FakeForge {
    pub addr: SocketAddr,
    root: PathBuf,
    rec: Arc<Mutex<Recorded>>,
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    GitHub,
    GitLab,
    Gitea,
}

impl FakeForge {
    pub async fn start(root: &Path) -> FakeForge {
        std::fs::create_dir_all(root).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rec = Arc::new(Mutex::new(Recorded::default()));
        let shared = Shared {
            root: root.to_owned(),
            addr,
            rec: rec.clone(),
        };
        let app = Router::new().fallback(handle).with_state(shared);
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        FakeForge {
            addr,
            root: root.to_owned(),
            rec,
        }
    }

    /// Creates `owner/name` with `main` (and any `extra` branches) holding a README.
    pub fn create_repo(&self, project: &str, extra: &[&str]) -> String {
        let bare = self.bare(project);
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "-q", "--bare", "-b", "main"]);
        let seed = tempfile::tempdir().unwrap();
        git(seed.path(), &["init", "-q", "-b", "main"]);
        std::fs::write(seed.path().join("README.md"), format!("# {project}\n")).unwrap();
        git(seed.path(), &["add", "."]);
        git(seed.path(), &["commit", "-q", "-m", "initial"]);
        git(seed.path(), &["push", "-q", bare.to_str().unwrap(), "main"]);
        for branch in extra {
            git(
                seed.path(),
                &["push", "-q", bare.to_str().unwrap(), &format!("main:{branch}")],
            );
        }
        self.git_url(project)
    }

    pub fn git_url(&self, project: &str) -> String {
        format!("http://{}/{project}.git", self.addr)
    }

    pub fn api_url(&self, kind: &str) -> String {
        let version = match kind {
            "github" => "v3",
            "gitlab" => "v4",
            _ => "v1",
        };
        format!("http://{}/api/{version}", self.addr)
    }

    pub fn bare(&self, project: &str) -> PathBuf {
        self.root.join(format!("{project}.git"))
    }

    /// Runs git in the project's bare repository (to delete or move branches "by hand").
    pub fn git(&self, project: &str, args: &[&str]) -> String {
        git(&self.bare(project), args)
    }

    pub fn head(&self, project: &str, branch: &str) -> Option<String> {
        let repo = git2::Repository::open_bare(self.bare(project)).unwrap();
        repo.refname_to_id(&format!("refs/heads/{branch}"))
            .ok()
            .map(|o| o.to_string())
    }

    /// A pull request opened by hand.
    pub fn add_pr(&self, head: &str, base: &str, title: &str) -> i64 {
        let mut rec = self.rec.lock().unwrap();
        let number = rec.prs.len() as i64 + 1;
        rec.prs.push(Pr {
            number,
            head: head.into(),
            base: base.into(),
            title: title.into(),
            body: String::new(),
            draft: false,
            labels: Vec::new(),
            reviewers: Vec::new(),
            open: true,
            merged: false,
            ended_by: None,
        });
        number
    }

    /// Merges pull request `number` of `project` as a fast-forward of its base, as `who`.
    pub fn merge_pr(&self, project: &str, number: i64, who: &str) {
        let (head, base) = {
            let mut rec = self.rec.lock().unwrap();
            let pr = rec.prs.iter_mut().find(|p| p.number == number).unwrap();
            (pr.open, pr.merged, pr.ended_by) = (false, true, Some(who.into()));
            (pr.head.clone(), pr.base.clone())
        };
        let sha = self.head(project, &head).unwrap();
        self.git(project, &["update-ref", &format!("refs/heads/{base}"), &sha]);
    }

    /// Closes (`open` false) or reopens pull request `number`, as `who`.
    pub fn set_open(&self, number: i64, open: bool, who: &str) {
        let mut rec = self.rec.lock().unwrap();
        let pr = rec.prs.iter_mut().find(|p| p.number == number).unwrap();
        pr.open = open;
        pr.ended_by = (!open).then(|| who.to_owned());
    }

    /// Refuses every API call with a rate limit (403, no requests left) while `on`.
    pub fn rate_limit(&self, on: bool) {
        self.rec.lock().unwrap().rate_limited = on;
    }

    /// The comments posted on pull requests: (API path, body).
    pub fn comments(&self) -> Vec<(String, String)> {
        self.rec.lock().unwrap().comments.clone()
    }

    pub fn prs(&self) -> Vec<Pr> {
        self.rec.lock().unwrap().prs.clone()
    }

    /// API calls to exactly `METHOD path`.
    pub fn calls(&self, call: &str) -> usize {
        self.rec.lock().unwrap().calls.iter().filter(|c| *c == call).count()
    }
}

async fn handle(State(s): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let kind = if path.starts_with("/api/v3/") {
        Kind::GitHub
    } else if path.starts_with("/api/v4/") {
        Kind::GitLab
    } else if path.starts_with("/api/v1/") {
        Kind::Gitea
    } else {
        return git_backend(&s, &method, &uri, &headers, body).await;
    };
    s.rec.lock().unwrap().calls.push(format!("{method} {path}"));
    if s.rec.lock().unwrap().rate_limited {
        let reset = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let reset = reset.to_string();
        return (
            StatusCode::FORBIDDEN,
            [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", reset.as_str())],
            axum::Json(json!({"message": "API rate limit exceeded for user ID 1."})),
        )
            .into_response();
    }
    let rest = &path[8..];
    let auth = headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
    let scheme = if kind == Kind::Gitea { "token " } else { "Bearer " };
    let token = auth.strip_prefix(scheme).unwrap_or("");
    if token != TOKEN && token != READ_ONLY_TOKEN {
        let message = match kind {
            Kind::GitHub => json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"}),
            Kind::GitLab => json!({"message": "401 Unauthorized"}),
            Kind::Gitea => {
                json!({"message": "user does not exist [uid: 0, name: ]", "url": "https://gitea.example/api/swagger"})
            }
        };
        return (StatusCode::UNAUTHORIZED, axum::Json(message)).into_response();
    }
    let query: Vec<(String, String)> = form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .into_owned()
        .collect();
    let q = |name: &str| query.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let parts: Vec<&str> = rest.split('/').collect();
    let (project, tail): (String, Vec<&str>) = match (kind, parts.as_slice()) {
        (Kind::GitLab, ["projects", id, tail @ ..]) => (id.replace("%2F", "/"), tail.to_vec()),
        (Kind::GitLab, ["users"]) => {
            let name = q("username").unwrap_or_default();
            let id = name.bytes().map(|b| b as i64).sum::<i64>();
            return axum::Json(json!([{"id": id, "username": name}])).into_response();
        }
        (_, ["repos", owner, repo, tail @ ..]) => (format!("{owner}/{repo}"), tail.to_vec()),
        _ => return (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response(),
    };
    let Ok(bare) = git2::Repository::open_bare(s.bare(&project)) else {
        let message = match kind {
            Kind::GitLab => "404 Project Not Found",
            _ => "Not Found",
        };
        return (StatusCode::NOT_FOUND, axum::Json(json!({"message": message}))).into_response();
    };
    if method == Method::POST && token == READ_ONLY_TOKEN {
        let message = match kind {
            Kind::GitHub => "Resource not accessible by personal access token",
            Kind::GitLab => "403 Forbidden",
            Kind::Gitea => "user should have a permission to write to a repo",
        };
        return (StatusCode::FORBIDDEN, axum::Json(json!({"message": message}))).into_response();
    }
    let web = format!("http://{}/{project}", s.addr);
    let shown = |pr: &Pr| match kind {
        Kind::GitLab => json!({
            "id": 1000 + pr.number, "iid": pr.number, "project_id": 1, "title": pr.title, "description": pr.body,
            "state": if pr.open { "opened" } else if pr.merged { "merged" } else { "closed" },
            "merge_user": pr.ended_by.as_ref().filter(|_| pr.merged).map(|u| json!({"username": u})),
            "closed_by": pr.ended_by.as_ref().filter(|_| !pr.merged && !pr.open).map(|u| json!({"username": u})),
            "source_branch": pr.head, "target_branch": pr.base,
            "draft": pr.title.starts_with("Draft:"), "labels": pr.labels,
            "web_url": format!("{web}/-/merge_requests/{}", pr.number),
        }),
        _ => json!({
            "id": 1000 + pr.number, "number": pr.number, "title": pr.title, "body": pr.body,
            "state": if pr.open { "open" } else { "closed" }, "merged": pr.merged, "draft": pr.draft,
            "merged_by": pr.ended_by.as_ref().filter(|_| pr.merged).map(|u| json!({"login": u})),
            "head": {"ref": pr.head, "label": format!("{}:{}", project.split('/').next().unwrap_or(""), pr.head)},
            "base": {"ref": pr.base},
            "html_url": format!("{web}/pull/{}", pr.number),
        }),
    };
    let mut rec = s.rec.lock().unwrap();
    match (kind, method.as_str(), tail.as_slice()) {
        // ---- listing -------------------------------------------------------------
        (Kind::GitHub, "GET", ["pulls"]) => {
            let owner = project.split('/').next().unwrap_or_default();
            let head = q("head").unwrap_or_default();
            let base = q("base");
            let want_open = q("state").as_deref() != Some("all");
            let list: Vec<Value> = rec
                .prs
                .iter()
                .filter(|p| head.is_empty() || format!("{owner}:{}", p.head) == head)
                .filter(|p| base.as_ref().is_none_or(|b| *b == p.base))
                .filter(|p| !want_open || p.open)
                .map(shown)
                .collect();
            axum::Json(Value::Array(list)).into_response()
        }
        (Kind::GitLab, "GET", ["merge_requests"]) => {
            let list: Vec<Value> = rec
                .prs
                .iter()
                .filter(|p| q("source_branch").is_none_or(|h| h == p.head))
                .filter(|p| q("target_branch").is_none_or(|b| b == p.base))
                .filter(|p| q("state").as_deref() != Some("opened") || p.open)
                .map(shown)
                .collect();
            axum::Json(Value::Array(list)).into_response()
        }
        (Kind::Gitea, "GET", ["pulls"]) => {
            let page: usize = q("page").and_then(|p| p.parse().ok()).unwrap_or(1);
            let limit: usize = q("limit").and_then(|p| p.parse().ok()).unwrap_or(30);
            let list: Vec<Value> = rec
                .prs
                .iter()
                .filter(|p| q("state").as_deref() != Some("open") || p.open)
                .skip((page - 1) * limit)
                .take(limit)
                .map(shown)
                .collect();
            axum::Json(Value::Array(list)).into_response()
        }
        (Kind::Gitea, "GET", ["labels"]) => {
            axum::Json(json!([{"id": 7, "name": "agent"}, {"id": 8, "name": "needs-review"}])).into_response()
        }
        (Kind::GitHub | Kind::Gitea, "GET", ["pulls", n]) | (Kind::GitLab, "GET", ["merge_requests", n]) => {
            match rec.prs.iter().find(|p| p.number.to_string() == *n) {
                // An ETag per answer; a matching If-None-Match gets a 304, as GitHub does.
                Some(pr) => {
                    let answer = shown(pr);
                    let etag = format!("\"{:016x}\"", fnv(answer.to_string().as_bytes()));
                    if headers.get("if-none-match").and_then(|v| v.to_str().ok()) == Some(etag.as_str()) {
                        rec.calls.push(format!("304 {method} {path}"));
                        return (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
                    }
                    ([("etag", etag)], axum::Json(answer)).into_response()
                }
                None => (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response(),
            }
        }
        // ---- creating ------------------------------------------------------------
        (Kind::GitHub | Kind::Gitea, "POST", ["pulls"]) | (Kind::GitLab, "POST", ["merge_requests"]) => {
            let field = |gh: &str, gl: &str| {
                let key = if kind == Kind::GitLab { gl } else { gh };
                body[key].as_str().unwrap_or_default().to_owned()
            };
            let (head, base) = (field("head", "source_branch"), field("base", "target_branch"));
            let title = field("title", "title");
            let text = field("body", "description");
            if let Some(refusal) = refuse_create(kind, &bare, &rec.prs, &project, &head, &base) {
                return refusal;
            }
            let labels = match kind {
                Kind::GitLab => body["labels"]
                    .as_str()
                    .map(|l| l.split(',').map(str::to_owned).collect())
                    .unwrap_or_default(),
                Kind::Gitea => body["labels"]
                    .as_array()
                    .map(|ids| {
                        ids.iter()
                            .map(|id| match id.as_i64() {
                                Some(7) => "agent".to_owned(),
                                Some(8) => "needs-review".to_owned(),
                                other => format!("{other:?}"),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                Kind::GitHub => Vec::new(),
            };
            let reviewers = match kind {
                Kind::GitLab => body["reviewer_ids"]
                    .as_array()
                    .map(|ids| ids.iter().map(|i| i.to_string()).collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            let pr = Pr {
                number: rec.prs.len() as i64 + 1,
                head,
                base,
                draft: body["draft"].as_bool().unwrap_or(false),
                title,
                body: text,
                labels,
                reviewers,
                open: true,
                merged: false,
                ended_by: None,
            };
            let answer = shown(&pr);
            rec.prs.push(pr);
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        (Kind::GitHub, "POST", ["issues", n, "labels"]) => {
            let Some(pr) = rec.prs.iter_mut().find(|p| p.number.to_string() == *n) else {
                return (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response();
            };
            for l in body["labels"].as_array().into_iter().flatten() {
                pr.labels.push(l.as_str().unwrap_or_default().to_owned());
            }
            let labels: Vec<Value> = pr.labels.iter().map(|l| json!({"name": l})).collect();
            axum::Json(Value::Array(labels)).into_response()
        }
        (Kind::GitHub | Kind::Gitea, "POST", ["pulls", n, "requested_reviewers"]) => {
            let Some(pr) = rec.prs.iter_mut().find(|p| p.number.to_string() == *n) else {
                return (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response();
            };
            for r in body["reviewers"].as_array().into_iter().flatten() {
                pr.reviewers.push(r.as_str().unwrap_or_default().to_owned());
            }
            let answer = shown(pr);
            (StatusCode::CREATED, axum::Json(answer)).into_response()
        }
        // ---- comments -----------------------------------------------------------
        (Kind::GitHub, "POST", ["pulls", n, "comments", _, "replies"])
        | (Kind::GitHub | Kind::Gitea, "POST", ["issues", n, "comments"])
        | (Kind::GitLab, "POST", ["merge_requests", n, "notes"])
        | (Kind::GitLab, "POST", ["merge_requests", n, "discussions", _, "notes"]) => {
            if !rec.prs.iter().any(|p| p.number.to_string() == *n) {
                return (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response();
            }
            let text = body["body"].as_str().unwrap_or_default().to_owned();
            rec.comments.push((path.clone(), text.clone()));
            let id = 9000 + rec.comments.len() as i64;
            (StatusCode::CREATED, axum::Json(json!({"id": id, "body": text}))).into_response()
        }
        _ => (StatusCode::NOT_FOUND, axum::Json(json!({"message": "Not Found"}))).into_response(),
    }
}

/// FNV-1a, for the fake's ETags.
fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf29ce484222325, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// What each forge answers when a pull request cannot be created.
fn refuse_create(
    kind: Kind,
    bare: &git2::Repository,
    prs: &[Pr],
    project: &str,
    head: &str,
    base: &str,
) -> Option<Response> {
    let oid = |b: &str| bare.refname_to_id(&format!("refs/heads/{b}")).ok();
    let reply = |status: StatusCode, body: Value| Some((status, axum::Json(body)).into_response());
    let github_invalid = |field: &str| {
        json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "field": field, "code": "invalid"}],
            "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request", "status": "422"})
    };
    if let Some(existing) = prs.iter().find(|p| p.open && p.head == head && p.base == base) {
        return match kind {
            Kind::GitHub => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom",
                    "message": format!("A pull request already exists for {}:{head}.", project.split('/').next().unwrap_or(""))}]}),
            ),
            Kind::GitLab => reply(
                StatusCode::CONFLICT,
                json!({"message": [format!("Another open merge request already exists for this source branch: !{}", existing.number)]}),
            ),
            Kind::Gitea => reply(
                StatusCode::CONFLICT,
                json!({"message": format!("pull request already exists for these targets [id: {}, head_branch: {head}, base_branch: {base}]", existing.number)}),
            ),
        };
    }
    let (Some(h), Some(b)) = (oid(head), oid(base)) else {
        let head_missing = oid(head).is_none();
        return match kind {
            Kind::GitHub => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                github_invalid(if head_missing { "head" } else { "base" }),
            ),
            Kind::GitLab => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"message": {(if head_missing { "source_branch" } else { "target_branch" }): ["does not exist"]}}),
            ),
            Kind::Gitea => reply(
                StatusCode::NOT_FOUND,
                json!({"message": "The target couldn't be found."}),
            ),
        };
    };
    let (ahead, _) = bare.graph_ahead_behind(h, b).unwrap();
    if ahead == 0 {
        return match kind {
            Kind::GitHub => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"message": "Validation Failed", "errors": [{"resource": "PullRequest", "code": "custom",
                    "message": format!("No commits between {base} and {head}")}]}),
            ),
            // GitLab opens an empty merge request; Threadline's own check stops it first.
            Kind::GitLab => None,
            Kind::Gitea => reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"message": "There are no changes between the head and the base"}),
            ),
        };
    }
    None
}

impl Shared {
    fn bare(&self, project: &str) -> PathBuf {
        self.root.join(format!("{project}.git"))
    }
}

/// Smart HTTP through `git http-backend`, as a web server runs it as CGI.
async fn git_backend(s: &Shared, method: &Method, uri: &Uri, headers: &HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &s.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "threadline")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("PATH_INFO", uri.path())
        .env("REQUEST_METHOD", method.as_str())
        .env("QUERY_STRING", uri.query().unwrap_or(""))
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("git http-backend");
    let mut stdin = child.stdin.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let out = child.wait_with_output().await.unwrap();
    let _ = writer.await;
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, 4))
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)));
    let Some((at, sep)) = split else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
            .into_response();
    };
    let mut response = Response::builder().status(StatusCode::OK);
    for line in String::from_utf8_lossy(&raw[..at]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse().ok()).unwrap_or(500);
            response = response.status(code);
        } else {
            response = response.header(name.trim(), value);
        }
    }
    response.body(axum::body::Body::from(raw[at + sep..].to_vec())).unwrap()
}
