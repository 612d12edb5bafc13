//! Where kiln keeps its files: user data, the model cache, config and logs.
//!
//! `KILN_HOME` (or `--data-dir`) puts everything under one folder, which is
//! what tests and CI use; otherwise the platform's usual locations apply.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Paths {
    pub data: PathBuf,
    pub cache: PathBuf,
    pub config_file: PathBuf,
    pub logs: PathBuf,
}

impl Paths {
    /// Resolve the folders: an explicit override wins, then `KILN_HOME`, then
    /// the platform folders from `directories`.
    pub fn resolve(data_dir: Option<&Path>) -> Paths {
        let home = data_dir
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("KILN_HOME").map(PathBuf::from));
        if let Some(root) = home {
            return Paths::under(&root);
        }
        match directories::ProjectDirs::from("", "", "kiln") {
            Some(dirs) => Paths {
                data: dirs.data_dir().to_path_buf(),
                cache: dirs.cache_dir().to_path_buf(),
                config_file: dirs.config_dir().join("config.toml"),
                logs: dirs.data_dir().join("logs"),
            },
            // No home directory at all (a bare container): keep working in the
            // current folder rather than refusing to start.
            None => Paths::under(Path::new(".kiln")),
        }
    }

    pub fn under(root: &Path) -> Paths {
        Paths {
            data: root.join("data"),
            cache: root.join("cache"),
            config_file: root.join("config.toml"),
            logs: root.join("logs"),
        }
    }

    /// KV states of shared prompt prefixes.
    pub fn prompt_cache(&self) -> PathBuf {
        self.cache.join("prompts")
    }

    /// The folder for model files that kiln fetches itself.
    pub fn models(&self) -> PathBuf {
        self.cache.join("models")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_dir_puts_everything_under_it() {
        let p = Paths::resolve(Some(Path::new("/tmp/kiln-x")));
        assert_eq!(p.data, Path::new("/tmp/kiln-x/data"));
        assert_eq!(p.models(), Path::new("/tmp/kiln-x/cache/models"));
        assert_eq!(p.config_file, Path::new("/tmp/kiln-x/config.toml"));
    }
}
