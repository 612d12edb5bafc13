//! The errors kiln reports to a user, and the exit code each maps to.

use std::path::PathBuf;

/// Exit code for bad input: a bad model file, a bad config, a bad argument.
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code for any other failure.
pub const EXIT_FAILURE: i32 = 1;

/// A problem with a model file. Each message names the file, so the user sees
/// one line that says which file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileError {
    #[error("{path}: no such file", path = .0.display())]
    NotFound(PathBuf),
    #[error("{path}: is a directory, not a GGUF model file", path = .0.display())]
    IsDirectory(PathBuf),
    #[error("{path}: cannot read: {1}", path = .0.display())]
    Unreadable(PathBuf, std::io::Error),
    #[error("{path}: not a GGUF file (magic bytes are {1:02x?}, expected \"GGUF\")", path = .0.display())]
    NotGguf(PathBuf, Vec<u8>),
    #[error("{path}: truncated GGUF: the header ends early at {1} bytes", path = .0.display())]
    TruncatedHeader(PathBuf, u64),
    #[error("{p}: truncated GGUF: tensor data needs {needed} bytes but the file has {actual}", p = .path.display())]
    TruncatedData {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    #[error("{path}: corrupt GGUF header: {1}", path = .0.display())]
    Corrupt(PathBuf, String),
    #[error("{path}: unsupported architecture '{1}' (kiln's kalosm engine runs {2})", path = .0.display())]
    UnsupportedArchitecture(PathBuf, String, String),
    #[error("{path}: llama.cpp cannot load it: {1}", path = .0.display())]
    Refused(PathBuf, String),
    #[error("{path}: missing GGUF metadata key '{1}'", path = .0.display())]
    MissingKey(PathBuf, String),
    #[error("{path}: tokenizer '{1}' is not supported for local files (kalosm builds only BPE 'gpt2' tokenizers from GGUF metadata)", path = .0.display())]
    UnsupportedTokenizer(PathBuf, String),
    #[error("{path}: the file name must end in .gguf (kalosm picks the format by extension)", path = .0.display())]
    WrongExtension(PathBuf),
    #[error("{p}: sha256 is {actual}, expected {expected}", p = .path.display())]
    ChecksumMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
}

/// Every error that reaches `main`.
#[derive(Debug, thiserror::Error)]
pub enum KilnError {
    #[error(transparent)]
    ModelFile(#[from] ModelFileError),
    #[error("{path}: {1}", path = .0.display())]
    Config(PathBuf, String),
    #[error("{0}")]
    BadArgument(String),
    #[error("cannot fetch the default model: {0}")]
    Fetch(String),
    #[error("cannot load model {0}: {1}")]
    Load(String, String),
    #[error("{0}")]
    WontFit(String),
    #[error("engine: {0}")]
    Engine(String),
    #[error("{0}")]
    Io(String),
    /// A session or cache problem: locked, damaged, missing.
    #[error("{0}")]
    Store(String),
}

impl KilnError {
    pub fn exit_code(&self) -> i32 {
        match self {
            KilnError::ModelFile(_) | KilnError::Config(..) | KilnError::BadArgument(_) => {
                EXIT_BAD_INPUT
            }
            _ => EXIT_FAILURE,
        }
    }

    pub fn io(context: impl std::fmt::Display, err: std::io::Error) -> Self {
        KilnError::Io(format!("{context}: {err}"))
    }
}

pub type Result<T, E = KilnError> = std::result::Result<T, E>;
