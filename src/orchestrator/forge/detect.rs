//! Which forge a remote URL is on, where its API is and which project it names, from the
//! URL where that is enough and from `[repos.NAME.forge]` where it is not.

use super::ForgeKind;
use crate::config::ForgeConfig;

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
