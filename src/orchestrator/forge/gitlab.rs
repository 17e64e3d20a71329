//! GitLab: merge requests over the REST API (v4); reviewer names looked up as ids.

use serde_json::json;

use super::*;

pub(super) struct GitLab(pub(super) Api);

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

    async fn state(&self, number: i64) -> Result<PrStatus, ForgeError> {
        let path = format!("{}/merge_requests/{number}", self.project_path());
        Ok(PrStatus::from_json(&self.0.get_cached(&path).await?))
    }

    async fn reply(&self, number: i64, to: &CommentRef, body: &str) -> Result<(), ForgeError> {
        let mr = format!("{}/merge_requests/{number}", self.project_path());
        let path = match &to.discussion {
            Some(d) => format!("{mr}/discussions/{}/notes", segment(d)),
            None => format!("{mr}/notes"),
        };
        self.0.ok("POST", &path, Some(&json!({"body": body}))).await.map(drop)
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
