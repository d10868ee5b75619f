# ctest-processors: 2  (trains with both cores for minutes; see CMakeLists.txt)
"""`llmtune sft` learns: on a synthetic chat task ("Last word: a b c" -> "c", random triples of 26
words; held-out triples never seen in training) greedy exact-match accuracy measured with
`llmtune generate --greedy --chat` rises from ~0 on the random demo base to >= 90% after a LoRA
run (r 32 on every linear; the demo base is a random 4-layer Llama, so the adapter learns the copy
from scratch). Also checks the output dir and that the adapter loads with the `peft` package
(PeftModel.from_pretrained) giving the same greedy answers through transformers."""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import (FIXTURES, base_recipe, demo_model, last_word_task, merge_adapter, metrics,  # noqa: E402
                        run, write_jsonl, write_recipe)

work = os.path.join(FIXTURES, "sft-learning")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
train = os.path.join(work, "train.jsonl")
write_jsonl(train, last_word_task(3000, seed=1))
train_prompts = {r["messages"][0]["content"] for r in last_word_task(3000, seed=1)}
held = [r for r in last_word_task(200, seed=2) if r["messages"][0]["content"] not in train_prompts][:40]
N_STEPS = int(os.environ.get("SFT_LEARNING_STEPS", "300"))


def accuracy(model_dir):
    ok = 0
    for r in held:
        p = run(["generate", "--model", model_dir, "--chat", "--greedy", "-n", "6", "--json", "--threads", "2",
                 "-p", r["messages"][0]["content"]])
        text = json.loads(p.stdout.strip().splitlines()[-1])["text"]
        ok += text.strip() == r["messages"][1]["content"]
    return ok / len(held)


acc0 = accuracy(base)
print(f"base accuracy on {len(held)} held-out prompts: {acc0:.2%}")
assert acc0 <= 0.1, acc0

out = os.path.join(work, "out")
recipe = write_recipe(os.path.join(work, "recipe.yaml"), base_recipe(
    base, train, out, micro_batch_size=16, max_steps=N_STEPS, learning_rate=1e-3, lora_r=32, lora_alpha=32,
    lr_scheduler="constant", logging_steps=20))
t0 = time.time()
run(["sft", recipe, "--no-progress"])
print(f"sft: {N_STEPS} steps in {time.time() - t0:.1f}s; losses:", [round(m["loss"], 3) for m in metrics(out) if "loss" in m])
for f in ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "recipe.resolved.yaml", "metrics.jsonl", "loss.svg"]:
    assert os.path.isfile(os.path.join(out, f)), f"missing {f} in {out}"
merged = merge_adapter(base, out, os.path.join(work, "merged"))
acc1 = accuracy(merged)
print(f"after LoRA sft: accuracy {acc1:.2%} (base {acc0:.2%})")
assert acc1 >= 0.9, f"accuracy after sft {acc1:.2%} < 90%"

# The adapter through the peft package: same greedy answers as llmtune's merged model on a few prompts.
try:
    import peft  # noqa: F401
except ImportError:
    sys.exit("the peft package is required for this test (scripts/setup.sh installs it)")
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(out)
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32), out).eval()
agree = 0
for r in held[:10]:
    text = tok.apply_chat_template([r["messages"][0]], add_generation_prompt=True, tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    g = m.generate(ids, max_new_tokens=6, do_sample=False)
    agree += tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip() == r["messages"][1]["content"]
print(f"peft PeftModel.from_pretrained: {agree}/10 correct")
assert agree >= 9, agree
print("ok: sft learning")
