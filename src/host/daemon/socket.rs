//! The daemon's socket: where it is, and binding it private to the user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;

use crate::error::{KilnError, Result};
use crate::paths::Paths;

/// The socket of the daemon serving `paths`' data folder: in the user's
/// runtime folder when there is one, named after the data folder so that
/// `--data-dir`/`KILN_HOME` folders each get a daemon of their own.
pub fn socket_path(paths: &Paths) -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => {
            use sha2::Digest;
            let data = paths.data.to_string_lossy();
            let tag = hex::encode(&sha2::Sha256::digest(data.as_bytes())[..4]);
            Path::new(&dir)
                .join("kiln")
                .join(format!("daemon-{tag}.sock"))
        }
        _ => paths.data.join("run").join("daemon.sock"),
    }
}

/// Bind the socket with its folder private to this user.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let dir = path.parent().expect("the socket has a folder");
    std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir.display(), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| KilnError::io(dir.display(), e))?;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(KilnError::Store(format!(
                "{}: a kiln daemon is already running",
                path.display()
            )));
        }
        // Left by a daemon that died.
        let _ = std::fs::remove_file(path);
    }
    let listener = UnixListener::bind(path).map_err(|e| KilnError::io(path.display(), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| KilnError::io(path.display(), e))?;
    Ok(listener)
}
