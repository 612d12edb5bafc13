//! KV-cache snapshots on disk, in kiln's own container: a header with a
//! fingerprint (what model and engine settings made the state), the text the
//! state holds, the payload length and a CRC-32, then the engine's bytes.
//! Everything is checked before the payload reaches the engine, whose own
//! decoder does not expect damaged input.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::atomic::write_atomic_parts;

const MAGIC: &[u8; 8] = b"KILNKV\x00\x01";
/// A header larger than this is damage, not a header.
const MAX_HEADER: u32 = 64 << 20;

pub use crate::chat::KvState;

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    fingerprint: String,
    fed: String,
    kv_tokens: usize,
    payload_len: u64,
    payload_crc32: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: cannot read: {1}")]
    Io(String, std::io::Error),
    #[error("{0}: not a kiln KV snapshot")]
    NotSnapshot(String),
    #[error("{0}: damaged header")]
    BadHeader(String),
    #[error("{0}: truncated: the payload should be {1} bytes, the file holds {2}")]
    Truncated(String, u64, u64),
    #[error("{0}: checksum mismatch: the payload is damaged")]
    Checksum(String),
    #[error("{0}: made for another model or settings ({1}), not this one ({2})")]
    Mismatch(String, String, String),
}

pub fn write(path: &Path, fingerprint: &str, state: &KvState) -> std::io::Result<u64> {
    let header = Header {
        fingerprint: fingerprint.to_string(),
        fed: state.fed.clone(),
        kv_tokens: state.kv_tokens,
        payload_len: state.bytes.len() as u64,
        payload_crc32: crc32fast::hash(&state.bytes),
    };
    let header = serde_json::to_vec(&header).expect("header serializes");
    let len = (header.len() as u32).to_le_bytes();
    write_atomic_parts(path, &[MAGIC, &len, &header, &state.bytes])?;
    Ok((12 + header.len() + state.bytes.len()) as u64)
}

/// Read and check a snapshot made for `fingerprint`.
pub fn read(path: &Path, fingerprint: &str) -> Result<KvState, SnapshotError> {
    let name = path.display().to_string();
    let io = |e| SnapshotError::Io(name.clone(), e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut head = [0u8; 12];
    if file_len < 12 {
        return Err(SnapshotError::NotSnapshot(name));
    }
    file.read_exact(&mut head).map_err(io)?;
    if &head[..8] != MAGIC {
        return Err(SnapshotError::NotSnapshot(name));
    }
    let header_len = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if header_len > MAX_HEADER || file_len < 12 + header_len as u64 {
        return Err(SnapshotError::BadHeader(name));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let header: Header =
        serde_json::from_slice(&header).map_err(|_| SnapshotError::BadHeader(name.clone()))?;
    if header.fingerprint != fingerprint {
        return Err(SnapshotError::Mismatch(
            name,
            header.fingerprint,
            fingerprint.to_string(),
        ));
    }
    let payload_len = file_len - 12 - header_len as u64;
    if payload_len != header.payload_len {
        return Err(SnapshotError::Truncated(
            name,
            header.payload_len,
            payload_len,
        ));
    }
    // Read straight into a buffer of the right size: no second copy.
    let mut bytes = Vec::with_capacity(payload_len as usize);
    file.take(payload_len).read_to_end(&mut bytes).map_err(io)?;
    if crc32fast::hash(&bytes) != header.payload_crc32 {
        return Err(SnapshotError::Checksum(name));
    }
    Ok(KvState {
        fed: header.fed,
        kv_tokens: header.kv_tokens,
        bytes,
    })
}

/// What the KV state of a model depends on: the model file's contents (a
/// sampled hash: size, the first and last MiB and 64 evenly spread 64 KiB
/// blocks, so a 20 GB file costs 10 MB of reading), the engine and its
/// version, and the context window.
pub fn fingerprint(model: &Path, engine: &str, context_limit: usize) -> std::io::Result<String> {
    use std::io::{Seek, SeekFrom};
    let mut file = std::fs::File::open(model)?;
    let size = file.metadata()?.len();
    let mut hash = Sha256::new();
    hash.update(size.to_le_bytes());
    let mut block = vec![0u8; 1 << 20];
    let mut sample = |offset: u64, len: usize, hash: &mut Sha256| -> std::io::Result<()> {
        let len = len.min(size.saturating_sub(offset) as usize);
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(&mut block[..len])?;
        hash.update(&block[..len]);
        Ok(())
    };
    sample(0, 1 << 20, &mut hash)?;
    for i in 1..=64u64 {
        sample(size / 65 * i, 64 << 10, &mut hash)?;
    }
    sample(size.saturating_sub(1 << 20), 1 << 20, &mut hash)?;
    let model_hash = hex::encode(&hash.finalize()[..12]);
    Ok(format!(
        "{model_hash}/{engine}/kiln-{}/ctx{context_limit}",
        env!("CARGO_PKG_VERSION")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> KvState {
        KvState {
            fed: "<|im_start|>system\nbe brief<|im_end|>\n".into(),
            kv_tokens: 9,
            bytes: (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect(),
        }
    }

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.snapshot");
        write(&p, "fp", &state()).unwrap();
        assert_eq!(read(&p, "fp").unwrap(), state());
    }

    #[test]
    fn damage_is_refused_before_the_engine_sees_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kv.snapshot");
        write(&p, "fp", &state()).unwrap();
        let good = std::fs::read(&p).unwrap();

        assert!(matches!(
            read(&p, "other"),
            Err(SnapshotError::Mismatch(..))
        ));

        std::fs::write(&p, &good[..good.len() - 10]).unwrap();
        assert!(matches!(read(&p, "fp"), Err(SnapshotError::Truncated(..))));

        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n - 1000] ^= 0x40;
        std::fs::write(&p, &flipped).unwrap();
        assert!(matches!(read(&p, "fp"), Err(SnapshotError::Checksum(_))));

        std::fs::write(&p, &good[..20]).unwrap();
        assert!(matches!(read(&p, "fp"), Err(SnapshotError::BadHeader(_))));

        std::fs::write(&p, b"safetensors?").unwrap();
        let err = read(&p, "fp").unwrap_err().to_string();
        assert!(
            err.ends_with("kv.snapshot: not a kiln KV snapshot"),
            "{err}"
        );
    }

    #[test]
    fn fingerprints_follow_content_engine_and_context() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.gguf");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        let fa = fingerprint(&a, "kalosm", 2048).unwrap();
        assert_eq!(fa, fingerprint(&a, "kalosm", 2048).unwrap());
        assert_ne!(fa, fingerprint(&a, "kalosm", 4096).unwrap());
        let mut changed = data.clone();
        changed[100] ^= 1;
        let b = dir.path().join("b.gguf");
        std::fs::write(&b, &changed).unwrap();
        assert_ne!(fa, fingerprint(&b, "kalosm", 2048).unwrap());
        // Tiny files are read whole.
        let tiny = dir.path().join("t.gguf");
        std::fs::write(&tiny, b"GGUF").unwrap();
        fingerprint(&tiny, "kalosm", 2048).unwrap();
    }
}
