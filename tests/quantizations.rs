//! The llama.cpp engine on the quantizations users download: SmolLM2's
//! Q4_1 weights requantized by llama.cpp itself to F16, Q8_0, Q4_0 and
//! Q4_K_M. Each loads, kiln reads its tensor types and sizes (what the
//! memory budget counts), and it answers; the near-lossless ones (F16 and
//! Q8_0 hold Q4_1's values almost exactly) answer right. Their words may
//! differ from the Q4_1 file's: llama.cpp multiplies Q4_1 weights by
//! activations rounded to 8 bits and F16 weights by f32 ones, and the
//! first token of this answer is a near tie.

mod common;

use std::ffi::CString;
use std::path::Path;

use common::*;
use kiln::engine::kalosm::EngineOptions;
use kiln::engine::local::Backend;
use kiln::models::{self, ModelSpec};
use kiln::paths::Paths;
use llama_cpp_sys_2 as sys;

fn quantize(from: &Path, to: &Path, ftype: sys::llama_ftype) {
    let from = CString::new(from.to_str().unwrap()).unwrap();
    let to = CString::new(to.to_str().unwrap()).unwrap();
    // SAFETY: default parameters from llama.cpp, two valid C strings that
    // outlive the call.
    let rc = unsafe {
        let mut params = sys::llama_model_quantize_default_params();
        params.ftype = ftype;
        // The source is already quantized: llama.cpp dequantizes it first.
        params.allow_requantize = true;
        params.nthread = 2;
        sys::llama_model_quantize(from.as_ptr(), to.as_ptr(), &params)
    };
    assert_eq!(rc, 0, "llama.cpp could not quantize to {to:?}");
}

/// The greedy answer's tokens, as streamed.
async fn answer(spec: ModelSpec) -> Vec<String> {
    let model = models::resolve(&spec, &Paths::resolve(None)).await.unwrap();
    let options = EngineOptions {
        sampler: greedy(12),
        context: Some(512),
        ..Default::default()
    };
    let engine = kiln::engine::local::LocalEngine::load(Backend::LlamaCpp, &model, options, |_| {})
        .await
        .unwrap_or_else(|e| panic!("{spec:?}: {e}"));
    let h = kiln::engine::spawn(engine);
    let t = ask(&h, "What is the capital of France?").await;
    assert_eq!(t.error, None);
    t.events
        .iter()
        .filter_map(|e| match e {
            kiln::engine::EngineEvent::Token { text, .. } => Some(text.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_quantization_loads_is_counted_and_answers() {
    let _turn = one_engine_at_a_time().await;
    let original = model().await;
    let reference = answer(ModelSpec::Local(original.path.clone())).await;
    assert!(reference.concat().contains("Paris"), "Q4_1: {reference:?}");
    let dir = tempfile::tempdir().unwrap();
    let kinds = [
        ("F16", sys::LLAMA_FTYPE_MOSTLY_F16, "F16", true),
        ("Q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0, "Q8_0", true),
        ("Q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_0", false),
        ("Q4_K_M", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M, "Q4K", false),
    ];
    for (name, ftype, tensor_type, lossless) in kinds {
        let path = dir
            .path()
            .join(format!("SmolLM2-135M-Instruct.{name}.gguf"));
        quantize(&original.path, &path, ftype);
        let info = kiln::gguf::inspect(&path).unwrap();
        let file = std::fs::metadata(&path).unwrap().len();
        assert!(
            info.tensor_bytes <= file && info.tensor_bytes as f64 > 0.95 * file as f64,
            "{name}: tensors {} of a {file}-byte file",
            info.tensor_bytes
        );
        assert!(
            info.tensor_types.iter().any(|(t, _)| t == tensor_type),
            "{name}: {:?}",
            info.tensor_types
        );
        let tokens = answer(ModelSpec::Local(path)).await;
        eprintln!("{name}: {:?}", tokens.concat());
        assert!(!tokens.concat().trim().is_empty(), "{name} answers");
        if lossless {
            assert!(tokens.concat().contains("Paris"), "{name}: {tokens:?}");
        }
    }
}
