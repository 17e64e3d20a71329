//! GitHub and GitHub Enterprise: pull requests over the REST API.

use serde_json::json;

use super::*;

pub(super) struct GitHub(pub(super) Api);

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

    async fn state(&self, number: i64) -> Result<PrStatus, ForgeError> {
        let path = format!("/repos/{}/pulls/{number}", self.0.target.project);
        Ok(PrStatus::from_json(&self.0.get_cached(&path).await?))
    }

    async fn reply(&self, number: i64, to: &CommentRef, body: &str) -> Result<(), ForgeError> {
        let project = &self.0.target.project;
        let path = if to.on_diff && to.id.bytes().all(|b| b.is_ascii_digit()) && !to.id.is_empty() {
            format!("/repos/{project}/pulls/{number}/comments/{}/replies", to.id)
        } else {
            format!("/repos/{project}/issues/{number}/comments")
        };
        self.0.ok("POST", &path, Some(&json!({"body": body}))).await.map(drop)
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
