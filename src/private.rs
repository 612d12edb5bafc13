//! kiln's files are the user's alone: transcripts, KV snapshots, the prompt
//! cache and logs hold everything said to the model.
//!
//! kiln runs with a umask of 077, so every folder it creates is 0700 and
//! every file 0600 whichever code creates it (the journal, `tempfile`,
//! llama.cpp, the log appender). Folders an older kiln left open are closed
//! on start. Programs kiln runs for the user (the agent's shell) get the
//! user's own umask back, so the files they make in a workspace are as the
//! user would make them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::OnceLock;

use crate::paths::Paths;

static USER_UMASK: OnceLock<u32> = OnceLock::new();

/// Set the umask to 077 and remember the user's; call before any file is
/// made and before any thread starts.
pub fn restrict() {
    // SAFETY: umask(2) only swaps the process's mask.
    let old = unsafe { libc::umask(0o077) };
    let _ = USER_UMASK.set(old as u32);
}

/// The umask kiln was started with (022 when `restrict` never ran).
pub fn user_umask() -> u32 {
    USER_UMASK.get().copied().unwrap_or(0o022)
}

/// The mode a new file in a user's workspace gets: what their own tools
/// would give it.
pub fn user_file_mode() -> u32 {
    0o666 & !user_umask()
}

/// Close kiln's folders to other users: 0700 folders and 0600 files under
/// the data, cache and log folders, and the config file. Links are not
/// followed; a tree whose top folder is closed already is left as it is.
/// Returns the paths it could not fix, with why.
pub fn secure(paths: &Paths) -> Vec<String> {
    let mut problems = Vec::new();
    for root in [&paths.data, &paths.cache, &paths.logs] {
        secure_tree(root, &mut problems);
    }
    if let Ok(meta) = std::fs::symlink_metadata(&paths.config_file) {
        if meta.is_file() {
            set_mode(&paths.config_file, &meta, &mut problems);
        }
    }
    problems
}

fn secure_tree(root: &Path, problems: &mut Vec<String>) {
    // A closed folder keeps others out of everything in it, so a tree whose
    // top is closed (every start after the first) is not walked again.
    match std::fs::symlink_metadata(root) {
        Ok(m) if m.is_dir() && m.permissions().mode() & 0o077 == 0 => return,
        Ok(_) => {}
        Err(_) => return,
    }
    let mut stack = vec![root.to_path_buf()];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            set_mode(&path, &meta, problems);
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
            }
        } else if meta.is_file() {
            set_mode(&path, &meta, problems);
        }
    }
}

fn set_mode(path: &Path, meta: &std::fs::Metadata, problems: &mut Vec<String>) {
    // Group and other bits are taken away; a file the user made read-only
    // stays so, and a folder stays usable by its owner.
    let current = meta.permissions().mode() & 0o7777;
    let mut wanted = current & !0o077;
    if meta.is_dir() {
        wanted |= 0o700;
    }
    if current == wanted {
        return;
    }
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(wanted)) {
        problems.push(format!("{}: cannot make it private: {e}", path.display()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn open_folders_and_files_are_closed_and_links_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let paths = Paths::under(root.path());
        let session = paths.data.join("sessions").join("s1");
        std::fs::create_dir_all(&session).unwrap();
        std::fs::create_dir_all(&paths.logs).unwrap();
        let events = session.join("events.jsonl");
        std::fs::write(&events, "{}\n").unwrap();
        let log = paths.logs.join("kiln.log");
        std::fs::write(&log, "x").unwrap();
        let outside = root.path().join("outside.txt");
        std::fs::write(&outside, "x").unwrap();
        std::os::unix::fs::symlink(&outside, session.join("link")).unwrap();
        for p in [&paths.data, &session, &paths.logs] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        for p in [&events, &log, &outside] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        std::fs::write(&paths.config_file, "").unwrap();
        std::fs::set_permissions(&paths.config_file, std::fs::Permissions::from_mode(0o664))
            .unwrap();
        assert!(secure(&paths).is_empty());
        for p in [&paths.data, &session, &paths.logs] {
            assert_eq!(mode(p), 0o700, "{}", p.display());
        }
        for p in [&events, &log, &paths.config_file] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        assert_eq!(mode(&outside), 0o644, "a link's target is not kiln's");
    }

    #[test]
    fn a_read_only_file_stays_read_only() {
        let root = tempfile::tempdir().unwrap();
        let paths = Paths::under(root.path());
        std::fs::create_dir_all(&paths.data).unwrap();
        let f = paths.data.join("ro");
        std::fs::write(&f, "x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o444)).unwrap();
        secure(&paths);
        assert_eq!(mode(&f), 0o400);
    }
}
