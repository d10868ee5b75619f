#!/usr/bin/env bash
# Configures and builds llmtune (Release, Ninja, ccache) into $LLMTUNE_BUILD_DIR (default build/).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if [ -n "${Torch_DIR:-}" ]; then
  prefix_args=(-DTorch_DIR="$Torch_DIR")
else
  prefix_args=(-DCMAKE_PREFIX_PATH="$("$LLMTUNE_PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
fi
cmake -S "$LLMTUNE_ROOT" -B "$LLMTUNE_BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DLLMTUNE_PYTHON="$LLMTUNE_PYTHON" "${prefix_args[@]}" > "$LLMTUNE_CACHE/configure.log" 2>&1 \
  || { cat "$LLMTUNE_CACHE/configure.log"; exit 1; }
cmake --build "$LLMTUNE_BUILD_DIR" -j "${LLMTUNE_JOBS:-$(nproc)}"
echo "build: ok ($LLMTUNE_BUILD_DIR/llmtune)"
