#!/usr/bin/env bash
# Sets up, builds, makes the test fixtures (tiny checkpoints, tokenizers, golden outputs from
# the Python references) and runs every test with ctest.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLMTUNE_WITH_REFERENCES=1 bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
bash "$here/fixtures/make_all.sh"
cd "$LLMTUNE_BUILD_DIR"
ctest --output-on-failure -j "${LLMTUNE_JOBS:-$(nproc)}" "$@"
