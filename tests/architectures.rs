//! Every model llama.cpp runs: small GGUFs of current architectures with
//! random weights (`common::synthetic_gguf`), on BPE and SentencePiece
//! tokenizers. Their text is noise; loading, the budget, `kiln fit`,
//! `kiln bench` and the memory panel are real.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use kiln::budget::ModelShape;
use kiln::engine::llamacpp::{LlamaCpp, LlamaCppSettings};
use kiln::window::{Rope, RopeScaling};

const ARCHITECTURES: &[&str] = &["qwen3", "qwen3moe", "gemma3", "phi3"];

fn kiln(data: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("KILN_MODEL")
        .output()
        .unwrap()
}

#[tokio::test]
async fn each_architecture_loads_answers_and_is_planned_on_both_tokenizers() {
    let data = tempfile::tempdir().unwrap();
    for arch in ARCHITECTURES {
        for tokenizer in ["bpe", "spm"] {
            let file = synthetic_gguf(arch, tokenizer).await;
            let f = file.to_str().unwrap();
            let what = format!("{arch}/{tokenizer}");
            let out = kiln(
                data.path(),
                &[
                    "ask",
                    "--model",
                    f,
                    "--ctx",
                    "2048",
                    "--max-tokens",
                    "4",
                    "--temperature",
                    "0",
                    "What is the capital of France?",
                ],
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{what}: {err}");
            assert!(err.contains(" tokens · TTFT"), "{what}: {err}");

            let fit = json_stdout(&kiln(data.path(), &["fit", f, "--ctx", "8192", "--json"]));
            assert_eq!(fit["model"]["architecture"], *arch, "{what}");
            assert!(fit["budget"]["unmodelled"].is_null(), "{what}: {fit}");
            let layers = &fit["model"]["layers"];
            match *arch {
                // Layer 5 of 8 attends globally; the rest keep 512 tokens.
                "gemma3" => {
                    assert_eq!(layers["swa"]["layers"], 7, "{what}");
                    assert_eq!(layers["full"]["layers"], 1, "{what}");
                    assert_eq!(layers["window"], 512, "{what}");
                }
                "qwen3moe" => {
                    assert_eq!(layers["experts"], serde_json::json!([8, 2]), "{what}");
                    let m = &fit["model"];
                    assert!(m["expert_bytes"].as_u64().unwrap() > 0, "{what}");
                }
                _ => assert_eq!(layers["full"]["layers"], 8, "{what}"),
            }

            let bench = json_stdout(&kiln(
                data.path(),
                &[
                    "bench",
                    "--model",
                    f,
                    "--ctx",
                    "2048",
                    "--prompt-tokens",
                    "64",
                    "--runs",
                    "1",
                    "--gen-tokens",
                    "2",
                    "--json",
                ],
            ));
            assert_eq!(bench["architecture"], *arch, "{what}");
            assert!(
                bench["decode_tok_s"]["median"].as_f64().unwrap() > 0.0,
                "{what}"
            );

            // The memory panel counts the file's weights and the KV cache
            // of the layout llama.cpp keeps.
            let info = kiln::gguf::inspect(&file).unwrap();
            let shape = ModelShape::from_gguf(&info).with_kv_layout(kiln::budget::KvLayout::Gqa {
                window: 2048,
                k: kiln::budget::KvType::F16,
                v: kiln::budget::KvType::F16,
                flash: true,
            });
            let mut state = kiln::app::State::for_preset(
                kiln::models::preset(kiln::models::DEFAULT_PRESET).unwrap(),
                2048,
            );
            state.shape = Some(shape.clone());
            state.context_tokens = 100;
            state.telemetry.memory = kiln::telemetry::MemorySnapshot::read();
            let view = kiln::ui::memory::view(&state).unwrap();
            assert_eq!(view.weights, info.tensor_bytes, "{what}");
            assert_eq!(view.kv, shape.kv_bytes(100), "{what}");
        }
    }
}

/// Predicted against measured RSS, each in a `kiln bench` process of its
/// own, at two contexts per architecture. Memory, not time, so asserted.
#[tokio::test]
async fn the_budget_is_within_ten_percent_of_measured_rss() {
    let data = tempfile::tempdir().unwrap();
    let mut report = Vec::new();
    for arch in ARCHITECTURES {
        let file = synthetic_gguf(arch, "bpe").await;
        for ctx in [4096u64, 12_288] {
            let prompt = (ctx - 200).to_string();
            let b = json_stdout(&kiln(
                data.path(),
                &[
                    "bench",
                    "--model",
                    file.to_str().unwrap(),
                    "--ctx",
                    &ctx.to_string(),
                    "--prompt-tokens",
                    &prompt,
                    "--runs",
                    "1",
                    "--gen-tokens",
                    "2",
                    "--json",
                ],
            ));
            let measured = b["rss_mb"].as_f64().unwrap();
            let predicted = b["predicted_rss_mb"].as_f64().unwrap();
            let err = (predicted - measured) / measured;
            let line = format!(
                "{arch:<9} {ctx:>6} tokens: predicted {predicted:>6.1} MB, measured {measured:>6.1} MB, error {:+.1}%",
                err * 100.0
            );
            println!("{line}");
            report.push((line, err));
        }
    }
    for (line, err) in &report {
        assert!(err.abs() <= 0.10, "{line}");
    }
}

#[tokio::test]
async fn a_file_llama_cpp_refuses_is_one_line_and_exit_2() {
    let data = tempfile::tempdir().unwrap();
    let file = synthetic_gguf("kiln9", "bpe").await;
    let f = file.to_str().unwrap();
    let out = kiln(data.path(), &["ask", "--model", f, "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains(f), "{err}");
    assert!(err.contains("unknown model architecture: 'kiln9'"), "{err}");
    // kalosm keeps its own list, in one line too.
    let qwen3 = synthetic_gguf("qwen3", "bpe").await;
    let out = kiln(
        data.path(),
        &[
            "ask",
            "--engine",
            "kalosm",
            "--model",
            qwen3.to_str().unwrap(),
            "hi",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("unsupported architecture 'qwen3'"), "{err}");
}

/// YaRN reaches llama.cpp: its context reports the frequency scale it
/// applied, read back from llama.cpp rather than trusted from the flag.
#[tokio::test]
async fn yarn_changes_the_context_llama_cpp_makes() {
    let file = synthetic_gguf("qwen3", "bpe").await;
    let plain = LlamaCpp::load(&file, LlamaCppSettings::new(4096, None))
        .await
        .unwrap();
    assert_eq!(plain.reported("freq_scale").as_deref(), Some("1"));
    assert_eq!(plain.reported("n_ctx").as_deref(), Some("4096"));
    drop(plain);
    let settings = LlamaCppSettings {
        rope: Some(Rope {
            scaling: RopeScaling::Yarn,
            factor: 4.0,
            original: 32_768,
            automatic: false,
        }),
        ..LlamaCppSettings::new(131_072, None)
    };
    let yarn = LlamaCpp::load(&file, settings).await.unwrap();
    assert_eq!(yarn.reported("freq_scale").as_deref(), Some("0.25"));

    // The CLI: past the trained window without scaling is one line, exit
    // 2; with --rope-scaling yarn it runs.
    let data = tempfile::tempdir().unwrap();
    let f = file.to_str().unwrap();
    let out = kiln(data.path(), &["ask", "--model", f, "--ctx", "65536", "hi"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--rope-scaling yarn --rope-scale 2"), "{err}");
    let out = kiln(
        data.path(),
        &[
            "ask",
            "--model",
            f,
            "--ctx",
            "65536",
            "--rope-scaling",
            "yarn",
            "--max-tokens",
            "2",
            "hi",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The seed's claim, planned for a machine kiln's users buy: Qwen2.5-32B
/// at 128k tokens needs YaRN (turned on by the preset) and a quantized KV
/// cache on 48 GB.
#[test]
fn qwen_32b_at_128k_is_planned_with_yarn_and_the_machine_is_named() {
    let data = tempfile::tempdir().unwrap();
    let plan = |kv: &str, memory: &str| {
        json_stdout(&kiln(
            data.path(),
            &[
                "fit",
                "qwen2.5-32b-instruct-q4_k_m",
                "--ctx",
                "131072",
                "--kv-type",
                kv,
                "--memory",
                memory,
                "--json",
            ],
        ))
    };
    let f16 = plan("f16", "48GiB");
    assert_eq!(f16["window"]["rope"]["automatic"], true);
    assert_eq!(f16["window"]["tokens"], 131_072);
    assert_eq!(f16["budget"]["verdict"], "does_not_fit");
    assert_eq!(plan("q4_0", "48GiB")["budget"]["verdict"], "fits");
    assert_eq!(plan("f16", "128GiB")["budget"]["verdict"], "fits");
    let m = json_stdout(&kiln(
        data.path(),
        &[
            "fit",
            "qwen2.5-32b-instruct-q4_k_m",
            "--ctx",
            "32768",
            "--machine",
            "mac-mini-m4-pro-64",
            "--json",
        ],
    ));
    assert_eq!(m["machine"]["bandwidth_gbs"], 273.0);
    let bound = m["decode"]["bound"].as_f64().unwrap();
    // 273 GB/s over ~18.5 GiB of weights and 8 GiB of KV: under 10 tok/s.
    assert!(bound > 5.0 && bound < 14.0, "{bound}");
    let out = kiln(data.path(), &["fit", "--machine", "mac-pro-m9", "--json"]);
    assert_eq!(out.status.code(), Some(2));
}
