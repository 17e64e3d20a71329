//! The invariants ARCHITECTURE.md names in bold, checked on the source: which module may
//! name which crate or module. (Test code, after `#[cfg(test)]`, and comments are not held
//! to them.)

use std::path::{Path, PathBuf};

/// Every `.rs` file below `src/`, with its text up to its tests.
fn sources() -> Vec<(PathBuf, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                // Code only: comments may name what the code must not use.
                let code = text
                    .split("#[cfg(test)]")
                    .next()
                    .unwrap_or("")
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push((path.strip_prefix(&root).unwrap().to_path_buf(), code));
            }
        }
    }
    assert!(out.len() > 20, "found the sources");
    out
}

/// The files that mention `needle`, other than those `allowed` names (prefixes of paths).
fn offenders(needle: &str, allowed: &[&str]) -> Vec<String> {
    sources()
        .into_iter()
        .filter(|(path, code)| code.contains(needle) && !allowed.iter().any(|a| path.starts_with(a)))
        .map(|(path, _)| path.display().to_string())
        .collect()
}

#[test]
fn the_domain_and_the_configuration_depend_on_nothing_above_them() {
    for file in ["config.rs", "model.rs", "lifecycle.rs", "redact.rs", "untrusted.rs"] {
        let (_, code) = sources().into_iter().find(|(p, _)| p == Path::new(file)).unwrap();
        for above in ["crate::bots", "crate::orchestrator", "crate::cli", "crate::store"] {
            assert!(!code.contains(above), "{file} names {above}");
        }
    }
}

#[test]
fn only_the_store_contains_sql() {
    assert_eq!(offenders("sqlx", &["store"]), Vec::<String>::new());
}

#[test]
fn only_the_container_runtime_names_bollard() {
    assert_eq!(
        offenders("bollard", &["orchestrator/container.rs"]),
        Vec::<String>::new()
    );
}

#[test]
fn only_the_workspace_opens_repositories() {
    assert_eq!(
        offenders("Repository::", &["orchestrator/workspace"]),
        Vec::<String>::new()
    );
}

#[test]
fn the_orchestrator_never_names_a_chat_platform_or_http_server() {
    for needle in ["slack_morphism", "serenity", "axum", "crate::bots", "crate::cli"] {
        let inside: Vec<String> = offenders(needle, &[])
            .into_iter()
            .filter(|p| p.starts_with("orchestrator"))
            .collect();
        assert_eq!(inside, Vec::<String>::new(), "{needle}");
    }
}

#[test]
fn front_ends_read_through_the_orchestrator_not_the_store() {
    for needle in ["crate::store", ".store()"] {
        let inside: Vec<String> = offenders(needle, &[])
            .into_iter()
            .filter(|p| p.starts_with("bots") || p.starts_with("cli"))
            .collect();
        assert_eq!(inside, Vec::<String>::new(), "{needle}");
    }
}

#[test]
fn chat_wording_lives_with_the_front_ends() {
    // Buttons are the front ends' words; the orchestrator returns typed outcomes and
    // errors (`NextStep`, `PullRequestOutcome`) for them to word. (A run's stored error
    // is the orchestrator's sentence, shown as it is everywhere.)
    for needle in ["press ", "Press ", "lists them"] {
        let inside: Vec<String> = offenders(needle, &[])
            .into_iter()
            .filter(|p| p.starts_with("orchestrator"))
            .collect();
        assert_eq!(inside, Vec::<String>::new(), "{needle:?}");
    }
}
