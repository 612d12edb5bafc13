//! The `kiln` binary as a user or a script meets it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

fn kiln() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    // Logs and config of the test stay out of the user's folders; the model
    // cache is shared through KILN_HOME when the caller set it.
    c.env("KILN_LOG", "warn").env_remove("KILN_MODEL");
    c
}

fn run(args: &[&str]) -> Output {
    kiln()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("kiln runs")
}

async fn model_path() -> PathBuf {
    common::model().await.path
}

/// Bad model files: exit code 2 and exactly one line on stderr that names the
/// file and the problem; never a panic or a backtrace.
fn assert_bad_model(path: &Path, problem: &str) {
    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{path:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains(&path.display().to_string()),
        "names the file: {stderr}"
    );
    assert!(stderr.contains(problem), "says '{problem}': {stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("backtrace"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn bad_model_files_give_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let real = std::fs::read(model_path().await).unwrap();

    assert_bad_model(&d.join("missing.gguf"), "no such file");
    assert_bad_model(d, "is a directory");

    let text = d.join("notes.gguf");
    std::fs::write(&text, "these are not model weights\n").unwrap();
    assert_bad_model(&text, "not a GGUF file");

    let random = d.join("random.gguf");
    let bytes: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&random, bytes).unwrap();
    assert_bad_model(&random, "not a GGUF file");

    let head = d.join("head-1k.gguf");
    std::fs::write(&head, &real[..1024]).unwrap();
    assert_bad_model(&head, "truncated GGUF");

    let half = d.join("half.gguf");
    std::fs::write(&half, &real[..real.len() / 2]).unwrap();
    assert_bad_model(&half, "truncated GGUF: tensor data needs");

    // Which architectures run is llama.cpp's to say (tests/architectures.rs);
    // a file without the keys every architecture has is refused first.
    let gpt2 = d.join("gpt2.gguf");
    write_tiny_gguf(&gpt2, "gpt2");
    assert_bad_model(&gpt2, "missing GGUF metadata key 'gpt2.block_count'");

    let renamed = d.join("model.bin");
    std::fs::write(&renamed, &real).unwrap();
    assert_bad_model(&renamed, "must end in .gguf");
}

/// A GGUF file with the given metadata and one tiny tensor, written with candle.
fn write_gguf(path: &Path, metadata: &[(&str, Value)]) {
    let t = QTensor::quantize(
        &Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        candle_core::quantized::GgmlDType::F32,
    )
    .unwrap();
    let refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &refs, &[("token_embd.weight", &t)]).unwrap();
}

/// A valid GGUF file of another architecture, with only its context length.
fn write_tiny_gguf(path: &Path, arch: &str) {
    write_gguf(
        path,
        &[
            ("general.architecture", Value::String(arch.into())),
            ("gpt2.context_length", Value::U32(1024)),
        ],
    );
}

#[test]
fn bad_config_and_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[sampling]\ntemprature = 2\n").unwrap();
    let out = run(&["ask", "--config", config.to_str().unwrap(), "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("config.toml: line 2: unknown field `temprature`"),
        "{stderr}"
    );

    let out = run(&["ask", "--top-p", "3", "hi"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p must be in (0, 1]"));
}

#[tokio::test]
async fn ask_streams_the_answer_and_prints_stats_on_stderr() {
    let _turn = common::one_engine_at_a_time().await;
    let model = model_path().await;
    let out = run(&[
        "ask",
        "--model",
        model.to_str().unwrap(),
        "--temperature",
        "0",
        "--max-tokens",
        "20",
        "What is 2 + 2?",
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(!stdout.trim().is_empty());
    assert!(
        !stdout.contains("Running on CPU"),
        "kalosm's device notice must not reach stdout: {stdout}"
    );
    let stats = stderr.lines().last().unwrap();
    assert!(
        stats.starts_with("kiln: ") && stats.contains("tokens · TTFT"),
        "{stderr}"
    );
}

#[tokio::test]
async fn ask_reads_stdin_and_prints_json_events() {
    let _turn = common::one_engine_at_a_time().await;
    let model = model_path().await;
    let mut child = kiln()
        .args([
            "ask",
            "--json",
            "--model",
            model.to_str().unwrap(),
            "--temperature",
            "0",
            "--max-tokens",
            "12",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Say hello.")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every line is JSON"))
        .collect();
    assert_eq!(events[0]["event"], "model");
    assert_eq!(events[1]["event"], "turn_started");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "turn_finished");
    let streamed: String = events
        .iter()
        .filter(|e| e["event"] == "token")
        .map(|e| e["text"].as_str().unwrap())
        .collect();
    assert_eq!(last["reply"].as_str().unwrap(), streamed);
    assert!(last["stats"]["completion_tokens"].as_u64().unwrap() > 0);
}

/// A person at a terminal: run `kiln ask` inside tmux and read the screen.
#[tokio::test]
async fn ask_in_a_real_terminal() {
    let _turn = common::one_engine_at_a_time().await;
    let model = model_path().await;
    let cmd = format!(
        "{} ask --model {} --temperature 0 --max-tokens 16 'Name a colour.'; echo EXIT=$?; sleep 30",
        env!("CARGO_BIN_EXE_kiln"),
        model.display()
    );
    let tmux = common::Tmux::start("ask", 100, 30, &cmd);
    let screen = tmux.wait_for("kiln ask to end", 60, |s| s.contains("EXIT="));
    assert!(screen.contains("EXIT=0"), "{screen}");
    assert!(screen.contains("tokens · TTFT"), "{screen}");
    assert!(!screen.contains("Running on CPU"), "{screen}");
    assert!(
        !screen.contains("loading"),
        "the progress line is cleared: {screen}"
    );
}

#[test]
fn fit_plans_a_preset_before_download() {
    let out = run(&[
        "fit",
        "qwen2.5-32b-instruct-q4_k_m",
        "--ctx",
        "32768",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &v["budget"];
    // The default engine (llama.cpp) keeps f16 per KV head.
    assert_eq!(b["kv_per_token"], 262_144, "64 × 8 × 128 × 2 × 2 bytes");
    assert_eq!(b["kv_per_token_f16_gqa"], 262_144);
    let kalosm = run(&[
        "fit",
        "qwen2.5-32b-instruct-q4_k_m",
        "--ctx",
        "32768",
        "--engine",
        "kalosm",
        "--json",
    ]);
    let k: serde_json::Value = serde_json::from_slice(&kalosm.stdout).unwrap();
    assert_eq!(
        k["budget"]["kv_per_token"], 2_621_440,
        "kalosm: 64 × 40 × 128 × 2 × 4 bytes"
    );
    let (total, available) = (
        b["total"].as_u64().unwrap(),
        b["available"].as_u64().unwrap(),
    );
    let swap_free = v["memory"]["swap_free"].as_u64().unwrap();
    if total > available + swap_free {
        assert_eq!(b["verdict"], "does_not_fit");
        assert!(b["max_context"].as_u64().unwrap() < 32_768);
    }

    let text = run(&["fit", "qwen2.5-32b-instruct-q4_k_m"]);
    let stdout = String::from_utf8_lossy(&text.stdout);
    for label in [
        "weights in memory",
        "KV cache per token",
        "verdict",
        "largest context that fits",
    ] {
        assert!(stdout.contains(label), "{stdout}");
    }
}

/// A llama GGUF whose metadata declares a model far larger than any machine:
/// the budget check refuses it before kalosm loads anything.
#[test]
fn a_model_that_cannot_fit_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("giant.gguf");
    let s = |v: &str| Value::String(v.into());
    let u = Value::U32;
    let tokens = Value::Array(vec![s("<s>"), s("</s>"), s("a")]);
    let md: Vec<(&str, Value)> = vec![
        ("general.architecture", s("llama")),
        ("llama.context_length", u(1 << 20)),
        ("llama.block_count", u(4096)),
        ("llama.attention.head_count", u(64)),
        ("llama.attention.head_count_kv", u(8)),
        ("llama.embedding_length", u(8192)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.tokens", tokens),
        ("tokenizer.ggml.bos_token_id", u(0)),
        ("tokenizer.ggml.eos_token_id", u(1)),
    ];
    write_gguf(&path, &md);

    let out = run(&["ask", "--model", path.to_str().unwrap(), "hi"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("giant.gguf: at 1048576 tokens it needs"),
        "{stderr}"
    );
    assert!(
        stderr.contains("does not fit") && stderr.contains("--allow-swap"),
        "{stderr}"
    );
}

#[test]
fn the_workstation_needs_a_terminal() {
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        err.trim(),
        "kiln: the workstation needs a terminal; for scripts use `kiln ask`"
    );
}
