//! Durable file writes: a file is replaced whole or not at all, and an
//! append is on disk before it is called committed.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Replace `path` with `bytes`: write a temporary file beside it, fsync it,
/// rename it over `path`, fsync the folder. A crash leaves the old file or
/// the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_parts(path, &[bytes])
}

/// `write_atomic` of the concatenation of `parts`, without building it in
/// memory first (KV snapshots are hundreds of megabytes). The temporary file
/// has a random name and is created exclusively (`O_EXCL`), so a file or
/// link planted beside `path` is never written through; it is 0600.
pub fn write_atomic_parts(path: &Path, parts: &[&[u8]]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    for part in parts {
        tmp.write_all(part)?;
    }
    tmp.as_file().sync_all()?;
    // The rename replaces whatever is at `path`, a link included, and never
    // writes through it. On error the temporary file is removed.
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir)
}

/// Open `path` for writing from the start (created 0600 when new), never
/// through a link planted at its name.
pub fn open_private(path: &Path, truncate: bool) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .write(true)
        .read(true)
        .truncate(truncate)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// fsync a folder, so a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Open `path` for appending. When a crash left its last line without an
/// end, the line is ended first, so the next record starts on a line of its
/// own and the torn one stays as it was.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    // Never through a link planted at the journal's name.
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let len = f.metadata()?.len();
    if len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8; 1];
        f.seek(SeekFrom::Start(len - 1))?;
        f.read_exact(&mut last)?;
        if last[0] != b'\n' {
            f.write_all(b"\n")?;
            f.sync_data()?;
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }

    /// Links planted at every name an older kiln used for its temporary
    /// file, and at the target itself: nothing outside is written.
    #[test]
    fn a_planted_link_is_never_written_through() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let victim = outside.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        let p = dir.path().join("meta.json");
        for pid in [std::process::id(), 1, 0] {
            let planted = dir.path().join(format!(".meta.json.tmp-{pid}"));
            std::os::unix::fs::symlink(&victim, planted).unwrap();
        }
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        // A link at the target is replaced, not followed.
        let target = dir.path().join("events.jsonl");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        write_atomic(&target, b"mine").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(!std::fs::symlink_metadata(&target).unwrap().is_symlink());
        let mode = std::fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Appending refuses a link at the journal's name.
        let journal = dir.path().join("j.jsonl");
        std::os::unix::fs::symlink(&victim, &journal).unwrap();
        assert!(open_append(&journal).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }

    #[test]
    fn append_ends_a_torn_line_without_touching_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        std::fs::write(&p, "{\"a\":1}\n{\"b\":").unwrap();
        let mut f = open_append(&p).unwrap();
        f.write_all(b"{\"c\":3}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"b\":\n{\"c\":3}\n"
        );
    }
}
