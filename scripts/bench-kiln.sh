# Sourced by the bench scripts: builds kiln into the shared target folder and
# sets $kiln, and $model to the GGUF given (else the default preset's file,
# fetched if it is not here yet).
#
#   . scripts/bench-kiln.sh [MODEL.gguf]
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}"
cargo build -q
kiln="$CARGO_TARGET_DIR/debug/kiln"
model="${1:-$("$kiln" models | grep -o '/[^ ]*\.gguf' | head -1)}"
[ -f "$model" ] || { "$kiln" fetch; model="$("$kiln" models | grep -o '/[^ ]*\.gguf' | head -1)"; }
