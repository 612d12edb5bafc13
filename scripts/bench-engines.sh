#!/usr/bin/env bash
# Side by side on the same GGUF and thread count: kiln's llama.cpp engine,
# kalosm's Llama (both through `kiln bench`), and llama.cpp itself through
# llama-cpp-python, installed from PyPI into a throwaway venv (set
# KILN_LLAMA_PYTHON to a python that already has it to skip the ~4 minute
# native build). Prefill over a ~1k-token prompt, decode over 128 tokens,
# peak RSS, KV bytes per token. One run each, as the issue asks; `kiln
# bench --runs N` gives medians.
#
#   scripts/bench-engines.sh [MODEL.gguf]
set -euo pipefail
. "$(dirname "$0")/bench-kiln.sh" "${1:-}"
threads="$(nproc)"

python="${KILN_LLAMA_PYTHON:-}"
if [ -z "$python" ]; then
  venv="$(mktemp -d)"
  trap 'rm -rf "$venv"' EXIT
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "llama-cpp-python==0.3.16"
  python="$venv/bin/python"
fi

out="$(mktemp -d)"
for engine in llamacpp kalosm; do
  echo "bench: kiln --engine $engine" >&2
  "$kiln" bench --engine "$engine" --model "$model" --ctx 2048 --runs 1 --prompt-tokens 1024 --gen-tokens 128 --json \
    > "$out/$engine.json"
done
echo "bench: llama.cpp (llama-cpp-python)" >&2
"$python" - "$model" "$threads" > "$out/llama.cpp.json" <<'PY'
import json, resource, sys, time
import llama_cpp

path, threads = sys.argv[1], int(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
text = " ".join(f"Note {i}: the kiln fires stoneware to cone {i % 12} over {i % 9 + 6} hours."
                for i in range(400))
tokens = llm.tokenize(text.encode(), add_bos=False)[:1024]
llm.eval(tokens[:8])  # warm-up, then a fresh cache
llm.reset()
t = time.perf_counter()
llm.eval(tokens)
prefill = len(tokens) / (time.perf_counter() - t)
t = time.perf_counter()
for _ in range(128):
    llm.eval([llm.sample(temp=0.0)])
decode = 128 / (time.perf_counter() - t)
# KV bytes per token: how much the saved state grows per token held.
s1, n1 = llm.save_state().llama_state_size, llm.n_tokens
llm.eval(tokens[:256])
s2, n2 = llm.save_state().llama_state_size, llm.n_tokens
print(json.dumps({
    "engine": "llama.cpp " + llama_cpp.__version__,
    "prompt_tokens": len(tokens),
    "prefill_tok_s": prefill,
    "decode_tok_s": decode,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "kv_bytes_per_token": (s2 - s1) / (n2 - n1),
}))
PY

python3 - "$out" "$model" "$threads" <<'PY'
import json, os, sys
out, model, threads = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for name in ["llamacpp", "kalosm"]:
    r = json.load(open(os.path.join(out, name + ".json")))
    rows.append((f"kiln --engine {name}", r["prompt_tokens"], r["prefill_tok_s"]["median"],
                 r["decode_tok_s"]["median"], r["peak_rss_mb"], r["kv_bytes_per_token"]))
r = json.load(open(os.path.join(out, "llama.cpp.json")))
rows.append((r["engine"], r["prompt_tokens"], r["prefill_tok_s"], r["decode_tok_s"],
             r["peak_rss_mb"], r["kv_bytes_per_token"]))
print(f"{os.path.basename(model)} · {threads} threads · prefill over the prompt, decode over 128 tokens")
print(f"| engine | prompt | prefill tok/s | decode tok/s | peak RSS MB | KV B/token |")
print(f"|---|---|---|---|---|---|")
for e, p, pf, dc, rss, kv in rows:
    print(f"| {e} | {p} | {pf:.1f} | {dc:.1f} | {rss:.0f} | {kv:,.0f} |")
ref = rows[2]
for e, p, pf, dc, rss, kv in rows[:2]:
    print(f"{e}: prefill {pf / ref[2]:.2f}x, decode {dc / ref[3]:.2f}x, RSS {rss / ref[4]:.2f}x of llama.cpp")
PY
