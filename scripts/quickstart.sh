#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine: set up, build, make the small demo
# checkpoint (a random Llama-shaped model with a trained BPE tokenizer; it becomes llmtune's own
# pretrained default when the pretraining stage lands) and a synthetic chat task, then
# `llmtune sft` with LoRA, `llmtune merge`, and held-out accuracy before and after.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/setup.sh"
bash "$here/build.sh"
source "$here/env.sh"
work="${LLMTUNE_QUICKSTART_DIR:-$LLMTUNE_CACHE/quickstart}"
demo="$LLMTUNE_CACHE/demo-model"
bin="$LLMTUNE_BUILD_DIR/llmtune"
"$LLMTUNE_PYTHON" "$here/make_demo_model.py" --out "$demo"
"$LLMTUNE_PYTHON" "$here/make_demo_data.py" --out "$work/data"

accuracy() {  # accuracy MODEL_DIR: greedy exact match on the held-out prompts, a few shown
  "$LLMTUNE_PYTHON" - "$bin" "$1" "$work/data/held-out.jsonl" <<'PY'
import json, subprocess, sys
bin_, model, path = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
ok = 0
for i, r in enumerate(rows):
    q, a = r["messages"][0]["content"], r["messages"][1]["content"]
    out = subprocess.run([bin_, "generate", "--model", model, "--chat", "--greedy", "-n", "6", "--json", "-p", q],
                         check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    text = json.loads(out)["text"].strip()
    ok += text == a
    if i < 4:
        print(f"  {q!r:40} -> {text!r:14} (expected {a!r})")
print(f"  held-out exact match: {ok}/{len(rows)} = {ok / len(rows):.0%}")
PY
}

echo "== before fine-tuning: the random demo model =="
accuracy "$demo"
echo "== llmtune sft recipes/quickstart.yaml (LoRA r 32 on every linear layer) =="
rm -rf "$work/out" "$work/merged"
"$bin" sft "$LLMTUNE_ROOT/recipes/quickstart.yaml" --set base_model="$demo" \
  --set datasets.0.path="$work/data/train.jsonl" --set output_dir="$work/out" \
  --set dataset_prepared_path="$work/prepared"
echo "== llmtune merge =="
"$bin" merge --base "$demo" --adapter "$work/out" --out "$work/merged"
echo "== after fine-tuning =="
accuracy "$work/merged"
echo "adapter: $work/out (PEFT format), merged model: $work/merged, loss plot: $work/out/loss.svg"
