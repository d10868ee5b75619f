#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, build, make the small demo
# checkpoint (a random Llama-shaped model with a trained BPE tokenizer; it becomes llmtune's own
# pretrained default when the pretraining stage lands), then generate with it and score text.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
demo="$LLMTUNE_CACHE/demo-model"
"$LLMTUNE_PYTHON" "$here/make_demo_model.py" --out "$demo"
bin="$LLMTUNE_BUILD_DIR/llmtune"
echo "== llmtune generate (plain prompt, greedy) =="
"$bin" generate --model "$demo" --prompt "The quick brown fox" --greedy -n 24
echo "== llmtune generate --chat (the tokenizer's own ChatML template) =="
"$bin" generate --model "$demo" --chat --system "You are terse." --prompt "What is the capital of France?" --greedy -n 24
echo "== llmtune eval perplexity =="
"$bin" eval perplexity --model "$demo" --data "$demo/corpus.txt"
echo "== llmtune inspect (a real recipe, every default filled in) =="
"$bin" inspect "$LLMTUNE_ROOT/recipes/tinyllama-lora-sft.yaml" | head -40
