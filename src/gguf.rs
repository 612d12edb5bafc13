//! Reads and checks a GGUF model file before an engine sees it.
//!
//! Engines trust their input: a truncated or foreign file ends in a panic or
//! an opaque error deep in loading. kiln reads the header with candle's own
//! GGUF reader, checks that every tensor's bytes are really in the file, and
//! turns each problem into one line that names the file. Which
//! architectures and tokenizers run is the engine's to say, not this
//! module's.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::ModelFileError;
use crate::layers::{Layers, Meta, MAX_LAYERS};

/// What kiln needs to know about a model before loading it.
#[derive(Debug, Clone)]
pub struct GgufInfo {
    pub path: PathBuf,
    pub architecture: String,
    /// `tokenizer.ggml.model`: `gpt2` (BPE), `llama` (SentencePiece), …
    pub tokenizer: String,
    pub name: Option<String>,
    pub context_length: usize,
    pub block_count: usize,
    pub head_count: usize,
    pub head_count_kv: usize,
    pub embedding_length: usize,
    /// `attention.key_length` / `value_length` where the file gives them.
    pub key_length: Option<usize>,
    pub value_length: Option<usize>,
    pub vocab_size: usize,
    pub file_size: u64,
    pub tensor_bytes: u64,
    /// Bytes of the MoE experts' tensors (`*_exps`), of which a token reads
    /// only the experts it is routed to.
    pub expert_bytes: u64,
    pub tensor_count: usize,
    /// Bytes per tensor type (Q4_K, F32, …), largest first.
    pub tensor_types: Vec<(String, u64)>,
    pub chat_template: Option<String>,
    /// Where the file has no template: llama.cpp's built-in for the turn
    /// markers its vocabulary has, if any.
    pub builtin_template: Option<&'static str>,
    pub bos_token: Option<String>,
    /// Empty where the file names no end token.
    pub eos_token: String,
    /// What llama.cpp keeps per layer.
    pub layers: Layers,
    /// `{arch}.rope.scaling.*`: the scaling the file was converted with.
    pub rope: FileRope,
}

impl GgufInfo {
    pub fn head_dim(&self) -> usize {
        self.embedding_length / self.head_count.max(1)
    }

    /// A short display name: the GGUF's own name, else the file stem.
    pub fn display_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}

/// Inspect `path` and return its metadata, or the first problem found.
pub fn inspect(path: &Path) -> Result<GgufInfo, ModelFileError> {
    let p = path.to_path_buf();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ModelFileError::NotFound(p))
        }
        Err(e) => return Err(ModelFileError::Unreadable(p, e)),
    };
    if meta.is_dir() {
        return Err(ModelFileError::IsDirectory(p));
    }
    let file_size = meta.len();
    let mut file = File::open(path).map_err(|e| ModelFileError::Unreadable(p.clone(), e))?;

    let mut magic = [0u8; 4];
    let got =
        read_up_to(&mut file, &mut magic).map_err(|e| ModelFileError::Unreadable(p.clone(), e))?;
    if got < 4 || &magic != b"GGUF" {
        return Err(ModelFileError::NotGguf(p, magic[..got].to_vec()));
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|e| ModelFileError::Unreadable(p.clone(), e))?;

    let content = read_header(&mut BufReader::new(file), &p, file_size)?;
    let needed = data_end(&content);
    if needed > file_size {
        return Err(ModelFileError::TruncatedData {
            path: p,
            needed,
            actual: file_size,
        });
    }
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(ModelFileError::WrongExtension(p));
    }
    info_from(&content, p, file_size)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// candle's reader sizes vectors from counts in the file, so a corrupt count
/// can make it panic; that panic becomes a "corrupt header" error here.
fn read_header(
    reader: &mut BufReader<File>,
    path: &Path,
    file_size: u64,
) -> Result<Content, ModelFileError> {
    let result = crate::logging::quiet_panics(|| Content::read(reader));
    match result {
        Ok(Ok(content)) => Ok(content),
        Ok(Err(err)) => {
            let text = err.to_string();
            let pos = reader.stream_position().unwrap_or(0);
            if text.contains("failed to fill whole buffer") || pos >= file_size {
                Err(ModelFileError::TruncatedHeader(
                    path.to_path_buf(),
                    file_size,
                ))
            } else {
                Err(ModelFileError::Corrupt(
                    path.to_path_buf(),
                    first_line(&text),
                ))
            }
        }
        Err(panic) => Err(ModelFileError::Corrupt(path.to_path_buf(), panic)),
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or("").to_string()
}

/// The byte just past the last tensor's data.
pub fn data_end(content: &Content) -> u64 {
    content
        .tensor_infos
        .values()
        .map(|t| content.tensor_data_offset + t.offset + tensor_size(t))
        .max()
        .unwrap_or(content.tensor_data_offset)
}

fn tensor_size(t: &candle_core::quantized::gguf_file::TensorInfo) -> u64 {
    let elems = t.shape.elem_count() as u64;
    let block = t.ggml_dtype.block_size() as u64;
    elems.div_ceil(block) * t.ggml_dtype.type_size() as u64
}

fn tensor_types(content: &Content) -> Vec<(String, u64)> {
    let mut by_type = std::collections::BTreeMap::<String, u64>::new();
    for t in content.tensor_infos.values() {
        *by_type.entry(format!("{:?}", t.ggml_dtype)).or_default() += tensor_size(t);
    }
    let mut v: Vec<_> = by_type.into_iter().collect();
    v.sort_by_key(|t| std::cmp::Reverse(t.1));
    v
}

/// Total bytes of all tensors: the weights' size in memory.
pub fn tensor_bytes(content: &Content) -> u64 {
    content.tensor_infos.values().map(tensor_size).sum()
}

fn info_from(content: &Content, path: PathBuf, file_size: u64) -> Result<GgufInfo, ModelFileError> {
    let md = &content.metadata;
    let get_str = |key: &str| md.get(key).and_then(|v| v.to_string().ok()).cloned();
    let architecture = get_str("general.architecture")
        .ok_or_else(|| ModelFileError::MissingKey(path.clone(), "general.architecture".into()))?;
    let arch_usize = |suffix: &str| -> Result<usize, ModelFileError> {
        let key = format!("{architecture}.{suffix}");
        md.uint(&key)
            .map(|v| v.min(u32::MAX as u64) as usize)
            .ok_or_else(|| ModelFileError::MissingKey(path.clone(), key))
    };
    // Per-layer arrays (and recurrent models, which have no heads) give
    // the first layer's value here; `layers` has them all.
    let first = |suffix: &str| {
        let key = format!("{architecture}.{suffix}");
        md.uint(&key)
            .or_else(|| md.uints(&key).and_then(|v| v.first().copied()))
            .map(|v| v.min(u32::MAX as u64) as usize)
    };
    let block_count = arch_usize("block_count")?;
    if block_count as u64 > MAX_LAYERS {
        return Err(ModelFileError::Corrupt(
            path,
            format!("{block_count} layers (kiln reads at most {MAX_LAYERS})"),
        ));
    }
    let embedding_length = arch_usize("embedding_length")?;
    let head_count = first("attention.head_count").unwrap_or(0);
    let tokenizer = get_str("tokenizer.ggml.model")
        .ok_or_else(|| ModelFileError::MissingKey(path.clone(), "tokenizer.ggml.model".into()))?;
    let rope_key = |k: &str| format!("{architecture}.rope.scaling.{k}");
    let info = GgufInfo {
        context_length: arch_usize("context_length")?,
        block_count,
        head_count,
        head_count_kv: first("attention.head_count_kv").unwrap_or(head_count),
        embedding_length,
        key_length: first("attention.key_length"),
        value_length: first("attention.value_length"),
        vocab_size: md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
            .map(Vec::len)
            .ok_or_else(|| {
                ModelFileError::MissingKey(path.clone(), "tokenizer.ggml.tokens".into())
            })?,
        name: get_str("general.name"),
        file_size,
        tensor_bytes: tensor_bytes(content),
        expert_bytes: content
            .tensor_infos
            .iter()
            .filter(|(name, _)| name.contains("_exps"))
            .map(|(_, t)| tensor_size(t))
            .sum(),
        tensor_count: content.tensor_infos.len(),
        tensor_types: tensor_types(content),
        chat_template: get_str("tokenizer.chat_template"),
        builtin_template: match md.contains_key("tokenizer.chat_template") {
            true => None,
            false => builtin_template(md),
        },
        bos_token: token_string(md, "tokenizer.ggml.bos_token_id"),
        eos_token: token_string(md, "tokenizer.ggml.eos_token_id").unwrap_or_default(),
        layers: Layers::read(
            md,
            &architecture,
            block_count as u64,
            embedding_length as u64,
        ),
        rope: FileRope {
            scaling: get_str(&rope_key("type")),
            factor: md.get(&rope_key("factor")).and_then(|v| v.to_f32().ok()),
            original: md.uint(&rope_key("original_context_length")),
        },
        tokenizer,
        architecture,
        path: path.clone(),
    };
    Ok(info)
}

impl Meta for std::collections::HashMap<String, Value> {
    fn uint(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(value_as_u64)
    }

    fn uints(&self, key: &str) -> Option<Vec<u64>> {
        let v = self.get(key)?.to_vec().ok()?;
        (v.len() as u64 <= MAX_LAYERS)
            .then(|| v.iter().map(|x| value_as_u64(x).unwrap_or(0)).collect())
    }

    fn bools(&self, key: &str) -> Option<Vec<bool>> {
        let v = self.get(key)?.to_vec().ok()?;
        (v.len() as u64 <= MAX_LAYERS)
            .then(|| {
                v.iter()
                    .map(|x| x.to_bool().ok())
                    .collect::<Option<Vec<bool>>>()
            })
            .flatten()
    }
}

fn value_as_u64(v: &Value) -> Option<u64> {
    v.to_u64()
        .ok()
        .or_else(|| v.to_u32().ok().map(u64::from))
        .or_else(|| v.to_i32().ok().and_then(|x| u64::try_from(x).ok()))
        .or_else(|| v.to_i64().ok().and_then(|x| u64::try_from(x).ok()))
}

fn builtin_template(md: &std::collections::HashMap<String, Value>) -> Option<&'static str> {
    let tokens = md.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
    let tokens: std::collections::HashSet<&str> = tokens
        .iter()
        .filter_map(|t| t.to_string().ok().map(String::as_str))
        .collect();
    builtin_for(|t| tokens.contains(t))
}

fn token_string(md: &std::collections::HashMap<String, Value>, id_key: &str) -> Option<String> {
    let id = md.get(id_key).and_then(value_as_u64)? as usize;
    let tokens = md.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
    tokens.get(id)?.to_string().ok().cloned()
}

/// llama.cpp's built-in template for a vocabulary, told apart by the turn
/// markers each family's tokenizer has as tokens.
pub fn builtin_for(has: impl Fn(&str) -> bool) -> Option<&'static str> {
    let rules: [(&[&str], &str); 9] = [
        (&["<|im_start|>", "<|im_sep|>"], "phi4"),
        (&["<|im_start|>"], "chatml"),
        (&["<|start_header_id|>"], "llama3"),
        (&["<start_of_turn>"], "gemma"),
        (&["<|user|>", "<|assistant|>", "<|end|>"], "phi3"),
        (&["[SYSTEM_PROMPT]", "[INST]"], "mistral-v7"),
        (&["[INST]", "[/INST]"], "mistral-v3"),
        (&["<｜User｜>", "<｜Assistant｜>"], "deepseek3"),
        (&["<|START_OF_TURN_TOKEN|>"], "command-r"),
    ];
    rules
        .iter()
        .find(|(tokens, _)| tokens.iter().all(|t| has(t)))
        .map(|(_, name)| *name)
}

/// The rope metadata a GGUF may carry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FileRope {
    pub scaling: Option<String>,
    pub factor: Option<f32>,
    pub original: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn random_bytes_are_not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x.gguf");
        std::fs::write(&f, b"\x7fELF\x02\x01\x01 not a model").unwrap();
        let err = inspect(&f).unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        assert!(err.starts_with(&f.display().to_string()), "{err}");
    }

    #[test]
    fn empty_file_is_not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("empty.gguf");
        File::create(&f).unwrap().flush().unwrap();
        assert!(matches!(inspect(&f), Err(ModelFileError::NotGguf(..))));
    }

    #[test]
    fn missing_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            inspect(&dir.path().join("nope.gguf")),
            Err(ModelFileError::NotFound(_))
        ));
        assert!(matches!(
            inspect(dir.path()),
            Err(ModelFileError::IsDirectory(_))
        ));
    }
}
