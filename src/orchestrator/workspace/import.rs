//! Importing an agent's own commits as from an untrusted remote: its ref read as a plain
//! capped file, its loose object files copied out, and every object checked before it
//! is written into the daemon's repository.

use std::fs;
use std::path::Path;

use git2::{ObjectType, Odb, Oid, Repository};

use super::short;
use crate::untrusted::{self, Refused};

/// The largest single object imported from an agent's own commits; a larger file is
/// still saved, staged from the work tree (which streams it).
const IMPORT_OBJECT_CAP: u64 = 256 * 1024 * 1024;
/// The most an agent's own commits may bring in, in all.
const IMPORT_TOTAL_CAP: u64 = 2 * 1024 * 1024 * 1024;

/// The agent's branch tip, read from its `.git` as plain files: the loose ref, else the
/// line in `packed-refs`. Ok(None) when it has neither.
pub(super) fn agent_branch_tip(ws: &Path, branch: &str) -> Result<Option<Oid>, String> {
    let parse =
        |text: &str| Oid::from_str(text.trim()).map_err(|_| format!("its ref for {branch} is not an object id"));
    let loose = format!(".git/refs/heads/{branch}");
    match untrusted::read_capped(ws, &loose, 128) {
        Ok(Some(read)) => return parse(&read.text).map(Some),
        Ok(None) => {}
        Err(refused) => return Err(refused.to_string()),
    }
    let packed = untrusted::read_capped(ws, ".git/packed-refs", 1024 * 1024).map_err(|r| r.to_string())?;
    let wanted = format!("refs/heads/{branch}");
    Ok(packed.and_then(|p| {
        p.text.lines().find_map(|line| {
            let (oid, name) = line.split_once(' ')?;
            (name.trim() == wanted).then(|| Oid::from_str(oid).ok()).flatten()
        })
    }))
}

/// Copies an agent's loose object files into a directory of the daemon's: regular files
/// with the names git gives them (a link, FIFO or device is refused), at most
/// [`IMPORT_TOTAL_CAP`] bytes in all. Packs are not taken: their indexes could send a
/// read in circles (a delta whose base is itself). An agent that packed its objects
/// (`git gc`) has its commits passed over; its files are still saved.
pub(super) fn copy_object_files(from: &Path, to: &Path) -> Result<(), String> {
    let hex = |s: &str, len: std::ops::RangeInclusive<usize>| {
        len.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
    };
    let mut budget = IMPORT_TOTAL_CAP;
    // Every directory on the way is examined without following a link (the work tree
    // itself is the daemon's).
    let real_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
    if !from.parent().is_some_and(real_dir) || !real_dir(from) {
        return Err("its .git or .git/objects is not a directory".into());
    }
    let entries = |dir: &Path| -> Result<Vec<String>, String> {
        Ok(fs::read_dir(dir)
            .map_err(|e| e.to_string())?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect())
    };
    for name in entries(from)? {
        let dir = from.join(&name);
        if !hex(&name, 2..=2) || !real_dir(&dir) {
            continue;
        }
        for file in entries(&dir)? {
            if !hex(&file, 38..=62) {
                continue;
            }
            let source = untrusted::open_regular(&dir.join(&file)).map_err(|r: Refused| r.to_string())?;
            let len = source.metadata().map_err(|e| e.to_string())?.len();
            if len > budget {
                return Err(format!(
                    "its objects are larger than {} MiB in all",
                    IMPORT_TOTAL_CAP >> 20
                ));
            }
            budget -= len;
            let dest = to.join(&name).join(&file);
            fs::create_dir_all(dest.parent().expect("a file in a directory")).map_err(|e| e.to_string())?;
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&dest)
                .map_err(|e| e.to_string())?;
            std::io::copy(&mut std::io::Read::take(source, len), &mut out).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// The largest commit or tree object read from an agent.
const IMPORT_META_CAP: usize = 16 * 1024 * 1024;
/// The most new commits one run may bring in.
const IMPORT_COMMITS_CAP: usize = 10_000;

/// An import of an agent's commits into the daemon's repository: every object read with
/// its declared size checked first (reading checks its hash), every tree rebuilt by
/// libgit2's tree builder (which refuses `.git`, `..`, `/` in names and odd modes) and
/// required to come out the same, every commit's header checked line by line, and each
/// object written only after all it points to, so an interrupted import leaves nothing
/// half-present.
pub(super) struct Import<'a> {
    source: &'a Odb<'a>,
    dest: &'a Repository,
    odb: Odb<'a>,
    budget: u64,
}

impl<'a> Import<'a> {
    pub(super) fn new(source: &'a Odb<'a>, dest: &'a Repository) -> Result<Self, String> {
        let odb = dest.odb().map_err(|e| e.message().to_owned())?;
        Ok(Import {
            source,
            dest,
            odb,
            budget: IMPORT_TOTAL_CAP,
        })
    }

    pub(super) fn run(&mut self, tip: Oid, start: Oid) -> Result<(), String> {
        // The new commits, and whether the tip builds on the start.
        let mut commits: std::collections::HashMap<Oid, (Oid, Vec<Oid>, Vec<u8>)> = Default::default();
        let mut descends = false;
        let mut stack = vec![tip];
        let mut seen = std::collections::HashSet::new();
        while let Some(oid) = stack.pop() {
            if !seen.insert(oid) {
                continue;
            }
            if oid == start {
                descends = true;
            } else if self.odb.exists(oid) {
                descends |= self.dest.graph_descendant_of(oid, start).unwrap_or(false);
            } else {
                let data = self.read(oid, ObjectType::Commit, IMPORT_META_CAP as u64)?;
                let (tree, parents) = commit_links(&data).map_err(|why| format!("commit {}: {why}", short(&oid)))?;
                stack.extend(&parents);
                commits.insert(oid, (tree, parents, data));
                if commits.len() > IMPORT_COMMITS_CAP {
                    return Err(format!("more than {IMPORT_COMMITS_CAP} new commits"));
                }
            }
        }
        if !descends {
            return Err(format!("{} does not build on the run's start", short(&tip)));
        }
        // Parents first (a walk from the tip that writes a commit on its way back), each
        // commit after its tree.
        let mut written = std::collections::HashSet::new();
        let mut stack = vec![(tip, false)];
        while let Some((oid, expanded)) = stack.pop() {
            let Some((tree, parents, data)) = commits.get(&oid) else {
                continue; // not new: the daemon has it
            };
            if written.contains(&oid) {
                continue;
            }
            if !expanded {
                stack.push((oid, true));
                stack.extend(parents.iter().map(|p| (*p, false)));
                continue;
            }
            self.tree(*tree)?;
            self.write(oid, ObjectType::Commit, data)?;
            written.insert(oid);
        }
        Ok(())
    }

    /// Imports a tree and everything below it (a stack of our own: a hostile depth
    /// cannot exhaust the thread's).
    fn tree(&mut self, root: Oid) -> Result<(), String> {
        let mut stack = vec![(root, false)];
        while let Some((oid, expanded)) = stack.pop() {
            if self.odb.exists(oid) {
                continue;
            }
            let data = self.read(oid, ObjectType::Tree, IMPORT_META_CAP as u64)?;
            let entries = tree_entries(&data).map_err(|why| format!("tree {}: {why}", short(&oid)))?;
            if !expanded {
                stack.push((oid, true));
                for (mode, _, id) in &entries {
                    match *mode {
                        0o040000 => stack.push((*id, false)),
                        0o100644 | 0o100755 | 0o120000 if !self.odb.exists(*id) => {
                            let blob = self.read(*id, ObjectType::Blob, IMPORT_OBJECT_CAP)?;
                            self.write(*id, ObjectType::Blob, &blob)?;
                        }
                        _ => {} // present already, or a submodule's commit
                    }
                }
                continue;
            }
            // Everything below is here now: the builder checks each entry and the order.
            let mut builder = self.dest.treebuilder(None).map_err(|e| e.message().to_owned())?;
            for (mode, name, id) in &entries {
                builder
                    .insert(name.as_slice(), *id, *mode as i32)
                    .map_err(|e| format!("tree {}: {}", short(&oid), e.message()))?;
            }
            let rebuilt = builder.write().map_err(|e| e.message().to_owned())?;
            if rebuilt != oid {
                return Err(format!("tree {} is not in git's canonical form", short(&oid)));
            }
        }
        Ok(())
    }

    /// Reads an object of the agent's: its declared kind and size checked before it is
    /// inflated.
    fn read(&mut self, oid: Oid, kind: ObjectType, cap: u64) -> Result<Vec<u8>, String> {
        let (size, found) = self
            .source
            .read_header(oid)
            .map_err(|e| format!("object {}: {}", short(&oid), e.message()))?;
        if found != kind {
            return Err(format!("object {} is a {found}, not a {kind}", short(&oid)));
        }
        if size as u64 > cap || size as u64 > self.budget {
            return Err(format!("object {} is too large ({size} bytes)", short(&oid)));
        }
        self.budget -= size as u64;
        let object = self
            .source
            .read(oid)
            .map_err(|e| format!("object {}: {}", short(&oid), e.message()))?;
        Ok(object.data().to_vec())
    }

    fn write(&self, oid: Oid, kind: ObjectType, data: &[u8]) -> Result<(), String> {
        let written = self.odb.write(kind, data).map_err(|e| e.message().to_owned())?;
        if written != oid {
            return Err(format!("object {} does not match its name", short(&oid)));
        }
        Ok(())
    }
}

/// A commit's tree and parents, if its header is one git writes: `tree`, `parent`s,
/// `author` and `committer` identities, then only `encoding`, `gpgsig`, `gpgsig-sha256`
/// or `mergetag` (whose continuation lines start with a space).
fn commit_links(data: &[u8]) -> Result<(Oid, Vec<Oid>), String> {
    let end = data.windows(2).position(|w| w == b"\n\n").ok_or("no message")?;
    let header = std::str::from_utf8(&data[..end]).map_err(|_| "a header that is not UTF-8")?;
    let mut lines = header.split('\n').peekable();
    let oid = |v: &str| Oid::from_str(v).ok().filter(|_| v.len() == 40 || v.len() == 64);
    let tree = lines
        .next()
        .and_then(|l| l.strip_prefix("tree "))
        .and_then(oid)
        .ok_or("no tree line")?;
    let mut parents = Vec::new();
    while let Some(p) = lines.peek().and_then(|l| l.strip_prefix("parent ")) {
        parents.push(oid(p).ok_or("a bad parent line")?);
        lines.next();
    }
    for who in ["author ", "committer "] {
        let ident = lines
            .next()
            .and_then(|l| l.strip_prefix(who))
            .ok_or("no author or committer")?;
        if !valid_ident(ident) {
            return Err(format!("a malformed {}line", who));
        }
    }
    let mut continuing = false;
    for line in lines {
        let known = ["encoding ", "gpgsig ", "gpgsig-sha256 ", "mergetag "]
            .iter()
            .any(|k| line.starts_with(k));
        if line.starts_with(' ') && continuing {
            continue;
        }
        if !known {
            return Err(format!("an unexpected header line {:?}", untrusted::prefix(line, 40)));
        }
        continuing = !line.starts_with("encoding ");
    }
    Ok((tree, parents))
}

/// `Name <email> 1700000000 +0100`, as git writes identities.
fn valid_ident(ident: &str) -> bool {
    let Some((who, when)) = ident.rsplit_once("> ") else {
        return false;
    };
    let Some((name, email)) = who.split_once(" <") else {
        return false;
    };
    let Some((secs, zone)) = when.split_once(' ') else {
        return false;
    };
    !name.contains(['<', '>', '\n'])
        && !email.contains(['<', '>', '\n'])
        && !secs.is_empty()
        && secs.bytes().all(|b| b.is_ascii_digit())
        && zone.len() == 5
        && zone.starts_with(['+', '-'])
        && zone[1..].bytes().all(|b| b.is_ascii_digit())
}

/// A tree object's entries: (mode, name, id), as written.
fn tree_entries(data: &[u8]) -> Result<Vec<(u32, Vec<u8>, Oid)>, String> {
    let mut entries = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|b| *b == b' ').ok_or("a truncated entry")?;
        let mode = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|m| u32::from_str_radix(m, 8).ok())
            .ok_or("a bad mode")?;
        rest = &rest[space + 1..];
        let nul = rest.iter().position(|b| *b == 0).ok_or("a truncated entry")?;
        let name = rest[..nul].to_vec();
        rest = &rest[nul + 1..];
        if rest.len() < 20 {
            return Err("a truncated entry".into());
        }
        let id = Oid::from_bytes(&rest[..20]).map_err(|e| e.message().to_owned())?;
        rest = &rest[20..];
        entries.push((mode, name, id));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_headers_must_be_gits_own() {
        let tree = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
        let good = format!(
            "tree {tree}\nparent {tree}\nauthor A B <a@b> 1700000000 +0100\ncommitter A <a@b> 1700000000 -0000\n\nmsg\n"
        );
        let (t, parents) = commit_links(good.as_bytes()).unwrap();
        assert_eq!((t.to_string(), parents.len()), (tree.to_owned(), 1));
        for bad in [
            format!("tree {tree}\nauthor nobody\ncommitter nobody\n\nx"),
            format!("tree {tree}\nauthor A <a@b> 1 +0000\ncommitter A <a@b> 1 +0000\nx-evil yes\n\nx"),
            format!("tree {tree}\nauthor A <a@b> 1 +0000\ncommitter A <a@b> 1 +0000"),
            "parent x\n\n".to_owned(),
        ] {
            assert!(commit_links(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn imported_trees_must_be_canonical_and_name_nothing_forbidden() {
        let dir = tempfile::tempdir().unwrap();
        let agent = Repository::init_bare(dir.path().join("agent.git")).unwrap();
        let ours = Repository::init_bare(dir.path().join("ours.git")).unwrap();
        let blob = agent.blob(b"x").unwrap();
        let entry = |mode: &str, name: &str| {
            let mut e = format!("{mode} {name}\0").into_bytes();
            e.extend_from_slice(blob.as_bytes());
            e
        };
        let tree_of = |entries: &[Vec<u8>]| agent.odb().unwrap().write(ObjectType::Tree, &entries.concat()).unwrap();
        let fine = tree_of(&[entry("100644", "a"), entry("100644", "b")]);
        let unsorted = tree_of(&[entry("100644", "b"), entry("100644", "a")]);
        let dot_git = tree_of(&[entry("100644", ".git")]);
        let odd_mode = tree_of(&[entry("100664", "a")]);
        let source = agent.odb().unwrap();
        let mut import = Import::new(&source, &ours).unwrap();
        import.tree(fine).unwrap();
        assert!(ours.find_tree(fine).is_ok());
        for bad in [unsorted, dot_git, odd_mode] {
            assert!(import.tree(bad).is_err(), "{bad} was taken");
            assert!(ours.find_tree(bad).is_err());
        }
    }
}
