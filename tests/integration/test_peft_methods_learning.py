# ctest-processors: 2  (trains with both cores for minutes; see CMakeLists.txt)
"""Each PEFT method learns the synthetic "last word" chat task of the SFT issue with `llmtune sft`
(sft_common / make_demo_data: "Last word: a b c" -> "c"; held-out prompts never seen in training)
on the random demo base. Greedy exact-match accuracy on held-out prompts is measured in one process
per method (hidden Catch2 test `test_peft [.adapter-generate]`, batched left-padded generation
through llmtune's model and adapter code). Prints a table (method, trainable params, steps, first and
last loss, accuracy) and asserts per method: the loss falls and accuracy reaches the floor given in
the floor given in METHODS (measured numbers are in the README). Mergeable methods are merged
with `llmtune merge` and the merged model must answer like the adapter.
Env: PEFT_LEARNING_STEPS scales the run (default below); PEFT_LEARNING_METHODS=a,b selects methods.
PEFT_LEARNING_BASE=default measures instead on the embedded pretrained default model (models/default)
with the quickstart's data (scripts/data/make_data.py: 'Last word of: "<KJV clause>"', 1000 training
examples, 100 held-out clauses from unseen chapters), 3 epochs by default; there the floors are 0
(it is a measurement for the README, not a CI test)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import (FIXTURES, base_recipe, demo_model, last_word_task, metrics, run, write_jsonl,  # noqa: E402
                        write_recipe)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import BIN, SOURCE  # noqa: E402

from transformers import AutoTokenizer  # noqa: E402

ON_DEFAULT = os.environ.get("PEFT_LEARNING_BASE", "") == "default"
STEPS = int(os.environ.get("PEFT_LEARNING_STEPS", "188" if ON_DEFAULT else "300"))
N_HELD = 100 if ON_DEFAULT else 40
# method -> (recipe keys, accuracy floor). The demo base is random: copying the last word needs an
# attention pattern it does not have, and only methods that change the attention projections
# (LoRA, DoRA) can build one. IA3 (rescales k/v/ffn), BitFit, prompt/prefix tuning and bottleneck
# adapters steer what a pretrained model already does; on this base they lower the loss but stay
# near 0% (measured at 300 steps: 0-5%), so for them the test asserts the falling loss only.
METHODS = {
    "lora": ({"adapter": "lora", "lora_r": 16, "lora_alpha": 16, "lora_target_linear": True}, 0.9),
    "dora": ({"adapter": "lora", "peft_use_dora": True, "lora_r": 16, "lora_alpha": 16, "lora_target_linear": True}, 0.9),
    "ia3": ({"adapter": "ia3", "learning_rate": 3e-2}, 0.0),
    "bitfit": ({"adapter": "bitfit", "learning_rate": 1e-2}, 0.0),
    "prompt_tuning": ({"adapter": "prompt_tuning", "num_virtual_tokens": 16, "learning_rate": 3e-2}, 0.0),
    "prompt_tuning_text": ({"adapter": "prompt_tuning", "num_virtual_tokens": 16, "learning_rate": 3e-2,
                            "prompt_tuning_init_text": "Answer with the last word of the quoted text:"}, 0.0),
    "prefix_tuning": ({"adapter": "prefix_tuning", "num_virtual_tokens": 16, "learning_rate": 1e-2}, 0.0),
    "bottleneck": ({"adapter": "bottleneck", "bottleneck_size": 64, "learning_rate": 2e-3}, 0.0),
    "bottleneck_identity": ({"adapter": "bottleneck", "bottleneck_size": 64, "bottleneck_activation": "identity",
                             "learning_rate": 2e-3}, 0.0),
}
MERGEABLE = {"dora", "ia3", "bitfit", "bottleneck_identity"}
if ON_DEFAULT:  # the quickstart's LoRA settings (r 32, lr 3e-3); a measurement: no floors
    for k in ("lora", "dora"):
        METHODS[k][0].update({"lora_r": 32, "lora_alpha": 32, "learning_rate": 3e-3})
    # Tuned on this base (plain template, 188 steps): prefix tuning 0% at lr 1e-2, 13% at 1e-1, 17% at
    # 3e-1; prompt tuning stays at 0-3% with 16 tokens (lr 3e-2 to 1.0), 6% with 64 text-initialised
    # tokens at lr 3e-1 over 600 steps.
    METHODS["prefix_tuning"][0].update({"learning_rate": 3e-1})
    METHODS["prompt_tuning_text"][0].update({"num_virtual_tokens": 64, "learning_rate": 3e-1, "max_steps": 600})
    METHODS = {k: (v[0], 0.0) for k, v in METHODS.items()}
# PEFT_LEARNING_TEMPLATE=plain: a chat template that ends the answer with </s> instead of ChatML's
# <|im_end|>. The default model never saw <|im_start|>/<|im_end|> in pretraining; with tied embeddings
# their logits start far below every other token's, and a method that cannot move the output
# embedding or the last hidden state far (prompt/prefix tuning) never learns to stop the turn.
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\nA:"
                  "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
TEMPLATE = PLAIN_TEMPLATE if os.environ.get("PEFT_LEARNING_TEMPLATE", "") == "plain" else None
only = os.environ.get("PEFT_LEARNING_METHODS")
if only:
    METHODS = {k: v for k, v in METHODS.items() if k in only.split(",")}


def test_binary():
    for c in [Path(os.environ.get("LLMTUNE_TEST_PEFT", "")), Path(BIN).parent / "test_peft"]:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    sys.exit("test_peft binary not found beside $LLMTUNE_BIN; build it or set LLMTUNE_TEST_PEFT")


work = Path(FIXTURES) / (("peft-methods-learning-default" if ON_DEFAULT else "peft-methods-learning")
                         + ("-plain" if TEMPLATE else ""))
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
train = work / "train.jsonl"
if ON_DEFAULT:
    base = os.path.join(SOURCE, "models", "default")
    data = os.environ.get("LLMTUNE_DEFAULT_DATA", "")
    if not glob.glob(os.path.join(data, "sft_lastword_*.jsonl")):
        data = os.path.join(FIXTURES, "default-data")
        subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "data", "make_data.py"), "--out", data,
                        "--max-wordnet", "100"], check=True, capture_output=True)
    shutil.copy(os.path.join(data, "sft_lastword_train.jsonl"), train)
    held = [json.loads(l) for l in open(os.path.join(data, "sft_lastword_test.jsonl"))][:N_HELD]
else:
    base = demo_model()
    rows = last_word_task(3000, seed=1)
    write_jsonl(train, rows)
    seen = {r["messages"][0]["content"] for r in rows}
    held = [r for r in last_word_task(400, seed=2) if r["messages"][0]["content"] not in seen][:N_HELD]
tok = AutoTokenizer.from_pretrained(base)
prompts = work / "prompts.txt"
with open(prompts, "w") as f:
    for r in held:
        ids = tok.apply_chat_template([r["messages"][0]], add_generation_prompt=True, tokenize=True,
                                      **({"chat_template": TEMPLATE} if TEMPLATE else {}))
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        f.write(",".join(map(str, ids)) + "\n")


def accuracy(model_dir, adapter=""):
    out = work / "gen.txt"
    env = dict(os.environ, LLMTUNE_PEFT_MODEL=str(model_dir), LLMTUNE_PEFT_ADAPTER=str(adapter),
               LLMTUNE_PEFT_PROMPTS=str(prompts), LLMTUNE_PEFT_N="8" if ON_DEFAULT else "4", LLMTUNE_PEFT_OUT=str(out))
    p = subprocess.run([str(test_binary()), "[.adapter-generate]"], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"[.adapter-generate] failed for {adapter or model_dir}:\n{p.stdout}\n{p.stderr}")
    answers = []
    for line in out.read_text().splitlines():
        toks = [int(t) for t in line.split(",") if t]
        answers.append(tok.decode(toks, skip_special_tokens=True).strip())
    return sum(a == r["messages"][1]["content"] for a, r in zip(answers, held)) / len(held), answers


acc0, _ = accuracy(base)
print(f"base accuracy on {len(held)} held-out prompts: {acc0:.0%}")
table = []
failures = []
t_all = time.time()
for name, (keys, floor) in METHODS.items():
    out = work / name
    r = base_recipe(base, str(train), str(out), micro_batch_size=16, max_steps=STEPS, learning_rate=1e-3,
                    logging_steps=10)
    for k in ("lora_r", "lora_alpha", "lora_target_linear"):
        r.pop(k, None)
    if ON_DEFAULT:
        r.update({"lr_scheduler": "cosine", "warmup_ratio": 0.05})
    r.update(keys)
    if TEMPLATE:
        r.update({"chat_template": "jinja", "chat_template_jinja": TEMPLATE})
    t0 = time.time()
    p = run(["sft", write_recipe(work / f"{name}.yaml", r), "--no-progress"])
    secs = time.time() - t0
    m = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)", p.stdout + p.stderr)
    assert m, f"{name}: no trainable-parameter line in the sft output"
    trainable = int(m.group(1).replace(",", ""))
    losses = [x["loss"] for x in metrics(out) if "loss" in x]
    acc, answers = accuracy(base, out)
    row = {"method": name, "trainable": trainable, "steps": r["max_steps"], "secs": round(secs, 1), "loss_first": round(losses[0], 3),
           "loss_last": round(losses[-1], 3), "accuracy": acc}
    if name in MERGEABLE:
        merged = work / f"{name}-merged"
        run(["merge", "--base", base, "--adapter", out, "--out", merged, "--dtype", "fp32"])
        macc, manswers = accuracy(merged)
        row["merged_accuracy"] = macc
        if manswers != answers:
            failures.append(f"{name}: merged model answers differ from the adapter's")
    table.append(row)
    print(row, flush=True)
    print("  e.g. " + "; ".join(f"{a!r} (want {r['messages'][1]['content']!r})" for a, r in zip(answers[:3], held)))
    if not losses[-1] < losses[0]:
        failures.append(f"{name}: loss did not fall ({losses[0]:.3f} -> {losses[-1]:.3f})")
    if acc < floor:
        failures.append(f"{name}: held-out accuracy {acc:.0%} < floor {floor:.0%}")

print(f"\n| method | trainable params | steps | sft time | loss first -> last | held-out accuracy |")
print("|---|---|---|---|---|---|")
for r in table:
    print(f"| {r['method']} | {r['trainable']:,} | {r['steps']} | {r['secs']} s | {r['loss_first']} -> {r['loss_last']} | "
          f"{r['accuracy']:.0%}{' (merged: %.0f%%)' % (100 * r['merged_accuracy']) if 'merged_accuracy' in r else ''} |")
print(f"total {time.time() - t_all:.0f} s")
assert not failures, "\n".join(failures)
print("ok: peft methods learn")
