#!/usr/bin/env bash
# Speculative decoding against llama.cpp's own tools, in one run on the same
# GGUFs, prompt, settings and threads: kiln with a draft model (`--draft`)
# beside `llama-speculative`, and kiln with prompt lookup (`--lookup`) beside
# `llama-lookup`, each also plain, greedy, with the repeat penalty off (as
# the peers run). kiln runs twice with each: drafting every step
# (`--draft-always`, as the peers do), and governed (its default: drafting
# rests while it does not pay).
#
# The pair by default is the calibration the issue names: SmolLM2-135M F16
# (made from the test model with `llama-quantize`) drafted for by the test
# model itself (Q4_1). The peers come from ../shared/peers/llama-cpp-tools,
# built once into a cache folder (about 22 minutes on 2 cores); they are never
# a dependency of kiln.
#
#   scripts/bench-speculative.sh [TARGET.gguf DRAFT.gguf]
set -euo pipefail
. "$(dirname "$0")/bench-kiln.sh" "${2:-}"
draft="$model"
bin="$(../shared/peers/llama-cpp-tools)"
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
target="${1:-}"
if [ -z "$target" ]; then
  target="$HOME/.cache/kiln-synthetic/$(basename "$draft" .gguf).F16.gguf"
  if [ ! -f "$target" ]; then
    mkdir -p "$(dirname "$target")"
    "$bin/llama-quantize" --allow-requantize "$draft" "$target.part" F16 >/dev/null 2>&1
    mv "$target.part" "$target"
  fi
fi
threads="$(nproc)"
tokens=256
max=16
# llama-speculative's draft samples with the run's settings, so at
# temperature 0 its draft probabilities are one-hot and --spec-draft-p-min
# never stops a draft: 0 for both says what it does. kiln's default (0.75,
# over the draft's ten likeliest tokens, as llama-server drafts) runs too.
p_min=0
lookup=8
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The text to repeat: a draft model and prompt lookup both have something to
# get right. The peers take the prompt raw, so it is written here in the
# model's chat format (ChatML for SmolLM2) with the system prompt kiln sends.
system="You are a helpful assistant."
text="The kiln was fired at dawn. Clay pots stood in rows on the shelves, each one \
wrapped in straw, each one marked with the potter's sign. By noon the heat \
had risen past a thousand degrees, and the glaze began to run like honey \
down the sides of the tallest jars. The potter watched through a small hole \
in the brick, counting the cones as they bent, and waited for the colour \
of the fire to turn from orange to white."
ask="Repeat this text exactly, word for word, twice: $text"
printf '<|im_start|>system\n%s<|im_end|>\n<|im_start|>user\n%s<|im_end|>\n<|im_start|>assistant\n' \
  "$system" "$ask" >"$work/prompt.txt"

greedy=(--temp 0 --repeat-penalty 1 -n "$tokens" -t "$threads" -c 4096 -f "$work/prompt.txt")
peer() { # NAME, then the command; prints tok/s and drafts kept
  local name="$1"
  shift
  "$@" >"$work/out" 2>&1 || { echo "$name failed:"; tail -5 "$work/out"; return; }
  local speed drafted accepted
  speed="$(grep -o 'speed: *[0-9.]* t/s' "$work/out" | grep -o '[0-9.]*' | tail -1)"
  drafted="$(grep -o 'n_drafted *= *[0-9]*' "$work/out" | grep -o '[0-9]*$' | tail -1)"
  accepted="$(grep -o 'n_accept *= *[0-9]*' "$work/out" | grep -o '[0-9]*$' | tail -1)"
  printf '%-34s %8s tok/s   drafts kept %s of %s\n' "$name" "$speed" "${accepted:-?}" "${drafted:-?}"
}
kiln_run() { # NAME, then kiln's flags; prints decode tok/s and drafts kept
  local name="$1"
  shift
  "$kiln" ask --model "$target" --system "$system" --temperature 0 --repeat-penalty 1 \
    --max-tokens "$tokens" "$@" "$ask" >/dev/null 2>"$work/err" \
    || { echo "$name failed:"; tail -5 "$work/err"; return; }
  local line speed kept
  line="$(grep '^kiln: .* tokens · TTFT' "$work/err" | tail -1 || true)"
  speed="$(grep -o 'decode [0-9.]* tok/s' <<<"$line" | grep -o '[0-9.]*' | head -1 || true)"
  kept="$(grep -o 'drafts kept [0-9]* of [0-9]*' <<<"$line" | sed 's/drafts kept //' || true)"
  printf '%-34s %8s tok/s   drafts kept %s%s\n' "$name" "$speed" "${kept:-none}" \
    "$(grep -o ' · drafting rested .*' <<<"$line" || true)"
}

echo "== target $target, draft $draft, $threads threads, $tokens tokens, greedy"
echo "-- a draft model (--draft-max $max, --draft-p-min $p_min)"
peer "llama-speculative" "$bin/llama-speculative" -m "$target" -md "$draft" -td "$threads" \
  --spec-draft-n-max "$max" --spec-draft-p-min "$p_min" "${greedy[@]}"
kiln_run "kiln plain"
kiln_run "kiln --draft --draft-always" --draft "$draft" --draft-max "$max" --draft-p-min "$p_min" --draft-always
kiln_run "kiln --draft (governed)" --draft "$draft" --draft-max "$max" --draft-p-min "$p_min"
kiln_run "kiln --draft, default p-min, always" --draft "$draft" --draft-max "$max" --draft-always
kiln_run "kiln --draft, default p-min" --draft "$draft" --draft-max "$max"
echo "-- prompt lookup (up to $lookup tokens a step)"
peer "llama-lookup" "$bin/llama-lookup" -m "$target" --spec-draft-n-max "$lookup" "${greedy[@]}"
kiln_run "kiln --lookup --draft-always" --lookup "$lookup" --draft-always
kiln_run "kiln --lookup (governed)" --lookup "$lookup"
