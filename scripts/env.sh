# Sourced by the other scripts: where the cache, the Python environment and the build live.
# Override with LLMTUNE_CACHE, LLMTUNE_BUILD_DIR, Torch_DIR (your own LibTorch).
LLMTUNE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export LLMTUNE_CACHE="${LLMTUNE_CACHE:-$HOME/.cache/llmtune}"
export LLMTUNE_PYTHON="${LLMTUNE_PYTHON:-$LLMTUNE_CACHE/venv/bin/python}"
export LLMTUNE_BUILD_DIR="${LLMTUNE_BUILD_DIR:-$LLMTUNE_ROOT/build}"
export LLMTUNE_FIXTURES="${LLMTUNE_FIXTURES:-$LLMTUNE_BUILD_DIR/fixtures}"
export CCACHE_DIR="${CCACHE_DIR:-$LLMTUNE_CACHE/ccache}"
# Tests and fixtures never reach a model hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
# ccache across clones: paths under the checkout hash relative, and precompiled headers are cacheable.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$LLMTUNE_ROOT}"
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
