#!/usr/bin/env bash
# The main job, from a fresh clone: set up, start the server with the embedded default model,
# generate an image through the gRPC API with the CLI, leave it in out/demo.png, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

mkdir -p out
LOG=out/server.log
# Port 0: the OS picks a free port; the server prints the one it bound.
.venv/bin/impasto serve --port 0 >"$LOG" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null; wait $SERVER_PID 2>/dev/null || true' EXIT

TARGET=""
for _ in $(seq 1 240); do
  TARGET=$(sed -n 's/^impasto: serving on \(.*\)$/\1/p' "$LOG" | head -n 1)
  [ -n "$TARGET" ] && break
  kill -0 $SERVER_PID 2>/dev/null || { cat "$LOG"; echo "the server exited" >&2; exit 1; }
  sleep 0.5
done
[ -n "$TARGET" ] || { cat "$LOG"; echo "the server did not start in 120 s" >&2; exit 1; }

.venv/bin/impasto models --target "$TARGET"
.venv/bin/impasto generate "${PROMPT:-a red circle on a white background}" --target "$TARGET" --seed "${SEED:-1}" -o out/demo.png
echo "demo image: $(pwd)/out/demo.png"
