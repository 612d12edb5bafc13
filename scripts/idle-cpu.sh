#!/usr/bin/env bash
# CPU use of an idle workstation: start kiln in tmux on the default model,
# wait for the welcome screen, then read the process's CPU time over 10 s.
# Usage: scripts/idle-cpu.sh [path/to/kiln] [seconds]
set -euo pipefail
KILN=${1:-${CARGO_TARGET_DIR:-$HOME/.cache/kiln-target}/debug/kiln}
SECS=${2:-10}
SESSION=kiln-idle-$$
tmux new-session -d -s "$SESSION" -x 160 -y 48 "$KILN"
trap 'tmux kill-session -t "$SESSION" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
    tmux capture-pane -p -t "$SESSION" | grep -q "Type a message" && break
    sleep 0.2
done
PID=$(pgrep -n -f "^$KILN" || true)
[ -n "$PID" ] || { echo "kiln did not start"; exit 1; }
sleep 2
TICKS=$(getconf CLK_TCK)
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
A=$(cpu); sleep "$SECS"; B=$(cpu)
awk -v a="$A" -v b="$B" -v t="$TICKS" -v s="$SECS" \
    'BEGIN { printf "idle kiln: %.3f s of CPU in %d s = %.2f %% of one core\n", (b-a)/t, s, (b-a)/t/s*100 }'
