#!/usr/bin/env bash
# Conversations streaming at once on one loaded model: kiln (`kiln bench
# --parallel`) and llama.cpp's own server (`llama-server --parallel N`,
# continuous batching) side by side in one run, on the same GGUF and thread
# count. llama-server comes from ../shared/peers/llama-cpp-tools, which builds
# it once into a cache folder (about 22 minutes on 2 cores); it is never a
# dependency of kiln.
#
#   scripts/bench-parallel.sh [COUNTS] [MODEL.gguf]     (COUNTS: 1,2,4,8)
set -euo pipefail
counts="${1:-1,2,4,8}"
. "$(dirname "$0")/bench-kiln.sh" "${2:-}"
tools="$(../shared/peers/llama-cpp-tools)"
exec "$kiln" bench --model "$model" --parallel "$counts" --peer-server "$tools/llama-server"
