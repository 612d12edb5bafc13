#!/usr/bin/env bash
# A chat turn as users run it: kiln (`kiln bench --turn`: the configured
# sampling, streamed through the engine's events, follow-up turns in one
# conversation) and llama.cpp's own server streaming the same chat
# completions, in one run on the same GGUF and threads. Then the same on a
# synthetic GGUF with Qwen's 151,936-token vocabulary (random weights, written
# with the `gguf` package), for the sampler's cost on a big vocabulary, and
# kiln with prompt lookup (`--lookup`) against kiln without it. llama-server
# comes from ../shared/peers/llama-cpp-tools, built once into a cache folder
# (about 22 minutes on 2 cores); it is never a dependency of kiln.
#
#   scripts/bench-turn.sh [MODEL.gguf]
set -euo pipefail
. "$(dirname "$0")/bench-kiln.sh" "${1:-}"
server="$(../shared/peers/llama-cpp-tools)/llama-server"

echo "== $model"
"$kiln" bench --turn --model "$model" --peer-server "$server"
echo "== $model, kiln with --lookup"
"$kiln" bench --turn --lookup --model "$model"

venv="$HOME/.cache/kiln-gguf-venv"
[ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q gguf==0.19.0; }
big="$HOME/.cache/kiln-synthetic/qwen3-vocab151936.gguf"
if [ ! -f "$big" ]; then
  mkdir -p "$(dirname "$big")"
  "$venv/bin/python" tests/fixtures/synthetic_gguf.py "$big.part" qwen3 spm - 151936
  mv "$big.part" "$big"
fi
echo "== synthetic qwen3, 151,936-token vocabulary"
"$kiln" bench --turn --model "$big" --peer-server "$server"
