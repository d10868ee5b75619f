#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, build, make the chat data from
# Debian packages (scripts/data/make_data.py), then `llmtune sft recipes/quickstart.yaml` (LoRA on
# models/default, about a minute on 2 cores), and `llmtune eval` of the model before and after, side
# by side: held-out "last word" accuracy (the skill, on clauses from chapters never trained on) and
# perplexity on held-out Bible text (the forgetting check), with a few generations next to each other.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
work="${LLMTUNE_QUICKSTART_DIR:-$LLMTUNE_CACHE/quickstart}"
data="$LLMTUNE_CACHE/data"
bin="$LLMTUNE_BUILD_DIR/llmtune"
python3 "$here/data/make_data.py" --out "$data"

echo "== llmtune sft recipes/quickstart.yaml (LoRA r 32 on every linear layer of models/default) =="
rm -rf "$work/out"
"$bin" sft "$LLMTUNE_ROOT/recipes/quickstart.yaml" \
  --set datasets.0.path="$data/sft_lastword_train.jsonl" \
  --set output_dir="$work/out" --set dataset_prepared_path="$work/prepared"

echo "== llmtune eval: the default model before (run 1) and after (run 2, with the adapter) =="
"$bin" eval --model default --adapter "$work/out" --label before --label after \
  --task "$data/tasks/lastword_held_out.yaml" \
  --perplexity-data "$data/corpus_test/bible-kjv.txt" --perplexity-max-length 256 \
  --output "$work/eval"
echo "adapter: $work/out (PEFT format; \`llmtune merge --base default --adapter $work/out --out DIR\` merges it)"
echo "loss plot: $work/out/loss.svg, eval report: $work/eval"
