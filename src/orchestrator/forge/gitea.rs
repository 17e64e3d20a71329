//! Gitea and Forgejo: pull requests over the REST API (v1); labels by id.

use serde_json::{Value, json};

use super::*;

pub(super) struct Gitea(pub(super) Api);

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

    async fn state(&self, number: i64) -> Result<PrStatus, ForgeError> {
        let path = format!("/repos/{}/pulls/{number}", self.0.target.project);
        Ok(PrStatus::from_json(&self.0.get_cached(&path).await?))
    }

    async fn reply(&self, number: i64, _to: &CommentRef, body: &str) -> Result<(), ForgeError> {
        // Gitea's API has no replies to review comments: the answer goes on the pull request.
        let path = format!("/repos/{}/issues/{number}/comments", self.0.target.project);
        self.0.ok("POST", &path, Some(&json!({"body": body}))).await.map(drop)
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
