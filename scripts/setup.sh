#!/usr/bin/env bash
# Installs what llmtune needs to build and test, idempotently: Debian packages, and a
# Python virtual environment outside the checkout holding the torch wheel (LibTorch for the
# C++ build) plus the Python reference packages the tests compare against.
# A second run only checks. Set Torch_DIR to use your own LibTorch and skip the wheel.
# Caches live in $LLMTUNE_CACHE (default ~/.cache/llmtune).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/versions.env"
cache="${LLMTUNE_CACHE:-$HOME/.cache/llmtune}"
venv="$cache/venv"
mkdir -p "$cache"

debs=(build-essential cmake ninja-build ccache pkg-config libyaml-cpp-dev libcli11-dev
      libsentencepiece-dev sentencepiece nlohmann-json3-dev catch2 libfmt-dev
      libcurl4-openssl-dev libicu-dev libcld2-0 python3-venv libjemalloc-dev
      # public-domain corpora and quiz data for scripts/data/make_data.py (default model, quickstart, tests)
      bible-kjv jargon-text dict-devil wordnet-base bsdgames fortunes-min)
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  stamp="$cache/apt-updated"
  if [ ! -f "$stamp" ]; then $SUDO apt-get update -q && touch "$stamp"; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating Python environment in $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# With your own LibTorch (Torch_DIR) the torch wheel is only needed for the Python references
# the tests compare against: scripts/test.sh asks for them with LLMTUNE_WITH_REFERENCES=1.
if [ -n "${Torch_DIR:-}" ] && [ "${LLMTUNE_WITH_REFERENCES:-0}" != "1" ]; then
  echo "setup: ok (Torch_DIR=$Torch_DIR; torch wheel and Python references skipped)"
  exit 0
fi
want="torch==$TORCH_VERSION $PY_REFERENCE_PACKAGES"
stamp="$venv/.llmtune-installed"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages: $want"
  # llama-cpp-python (the GGUF test reference) is a source build of llama.cpp: CPU-only, portable,
  # without the server/examples, so it takes minutes rather than an hour. gptqmodel (the GPTQ reader
  # test reference) is pure Python; its pypcre dependency compiles one small C extension, no CUDA.
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$py" -m pip install -q --disable-pip-version-check $want
  echo "$want" > "$stamp"
fi
echo "setup: ok (venv $venv, torch $("$py" -c 'import torch; print(torch.__version__)'))"
