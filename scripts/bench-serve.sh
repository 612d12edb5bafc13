#!/usr/bin/env bash
# `kiln serve` and llama.cpp's own `llama-server` side by side in one run,
# on the same GGUF and thread count, each driven through its OpenAI API by
# 1, 4 and 16 concurrent streaming clients (`kiln bench --serve`):
# requests/s, TTFT p50/p90, aggregate decode tok/s, and kiln serve's own
# time per streamed token. llama-server comes from
# ../shared/peers/llama-cpp-tools, which builds it once into a cache folder
# (about 22 minutes on 2 cores); it is never a dependency of kiln.
#
#   scripts/bench-serve.sh [COUNTS] [MODEL.gguf]     (COUNTS: 1,4,16)
set -euo pipefail
counts="${1:-1,4,16}"
. "$(dirname "$0")/bench-kiln.sh" "${2:-}"
tools="$(../shared/peers/llama-cpp-tools)"
exec "$kiln" bench --model "$model" --serve "$counts" --peer-server "$tools/llama-server"
