#!/usr/bin/env bash
# Builds llmtune's embedded default base model end to end, reproducibly (fixed seeds):
#   Debian corpora -> scripts/data/make_data.py (corpus + SFT/preference data, licences, sha256 pins)
#   -> `llmtune tokenizer train` (8000-piece BPE, byte fallback) -> `llmtune pretrain recipes/tiny/pretrain.yaml`
#   (a ~7M-parameter Llama from random weights) -> HF checkpoint in OUT/model + held-out perplexity.
# Usage: scripts/make_default_model.sh [OUT] [extra --set overrides for the pretrain recipe...]
#   OUT defaults to $LLMTUNE_CACHE/default-model. The full run is about one hour on 2 CPU cores;
#   a smoke run: scripts/make_default_model.sh /tmp/tiny --set max_steps=20 --set eval_steps=10
# Idempotent: each step skips work that is already done (the pretrain step resumes from its newest checkpoint).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/env.sh"
out="${1:-$LLMTUNE_CACHE/default-model}"
shift || true
bin="${LLMTUNE_BIN:-$LLMTUNE_BUILD_DIR/llmtune}"
[ -x "$bin" ] || { echo "make_default_model: $bin not found; run scripts/build.sh first" >&2; exit 1; }

# 1. Debian packages with the corpora and the structured data (scripts/setup.sh installs the same list).
pkgs=(bible-kjv jargon-text dict-devil wordnet-base bsdgames fortunes-min libcld2-0)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "make_default_model: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. Data (deterministic; skips if complete).
data="$out/data"
python3 "$here/data/make_data.py" --out "$data"

# 3. Tokenizer (SentencePiece BPE on the training corpus only). The chat template is ChatML with a space
#    before each message's content: SentencePiece gives a word after a newline its un-prefixed pieces
#    ("men", not "▁men"), which a model pretrained on running text has rarely seen, so answers after
#    "<|im_start|>assistant\n" were hard to learn (held-out last-word accuracy 3% vs 31% with the space).
if [ ! -f "$out/tokenizer/tokenizer.json" ]; then
  "$bin" tokenizer train --input "$data"/corpus/*.txt --vocab-size 8000 --type bpe --out "$out/tokenizer" \
    --model-max-length 512 --chat-template "$(cat "$here/../recipes/tiny/chat_template.jinja")"
fi

# 4. Pretraining (resumes automatically if interrupted).
t0=$(date +%s)
"$bin" pretrain "$here/../recipes/tiny/pretrain.yaml" \
  --set tokenizer_config="$out/tokenizer" \
  --set pretraining_dataset.0.path="$data/corpus" \
  --set test_datasets.0.path="$data/corpus_test" \
  --set output_dir="$out/model" \
  --set dataset_prepared_path="$out/cache" \
  --set auto_resume_from_checkpoints=true "$@"
t1=$(date +%s)

# Generation stops at EOS and at the chat turn end (<|im_end|>): both ids in config.json and generation_config.json
# (transformers reads either; models saved from this one inherit the list through config.json).
python3 - "$out/model" <<'PY'
import json, os, sys
d = sys.argv[1]
tok = json.load(open(os.path.join(d, "tokenizer.json")))
ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
for name in ("config.json", "generation_config.json"):
    g = json.load(open(os.path.join(d, name)))
    g["eos_token_id"] = [ids["</s>"], ids["<|im_end|>"]]
    json.dump(g, open(os.path.join(d, name), "w"), indent=2)
PY

# 5. Held-out perplexity of the result (the last eval in metrics.jsonl) and a short sample.
python3 - "$out/model/metrics.jsonl" "$((t1 - t0))" <<'PY' | tee "$out/model/RESULT.txt"
import json, math, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ev = [r for r in rows if "eval_loss" in r]
tr = [r for r in rows if "loss" in r]
print(f"steps {tr[-1]['step']}, train loss {tr[-1]['loss']:.3f}, "
      f"held-out loss {ev[-1]['eval_loss']:.3f} (perplexity {math.exp(ev[-1]['eval_loss']):.1f}), "
      f"wall {int(sys.argv[2])} s")
PY
"$bin" generate --model "$out/model" --greedy -n 30 -p "And God said" || true
echo "default model: $out/model (rebuild: scripts/make_default_model.sh $out)"
