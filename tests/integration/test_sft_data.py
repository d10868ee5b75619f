"""`llmtune sft` data handling end to end: (c) sample_packing true/false give the same first-step
loss (loss is a sum over target tokens / their count, so packing must not change it; 1e-5);
(d) with train_on_inputs false the target-token count equals an independent count from
transformers' apply_chat_template + the tokenizer's offsets (assistant content + its <|im_end|>);
(e) a malformed JSONL line exits 1 naming file:line, an unknown key gets a did-you-mean,
adapter: qlora without load_in_4bit is refused clearly; plus recipes/ci-tiny-sft.yaml: --dry-run plan, then a real run
(full fine-tune output files) and a SIGINT stop that leaves a checkpoint."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import FIXTURES, base_recipe, demo_model, metrics, run, write_jsonl, write_recipe  # noqa: E402
from common import BIN, SOURCE  # noqa: E402

work = os.path.join(FIXTURES, "sft-data")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()

convs = []
for i in range(8):
    m = []
    if i % 3 == 0:
        m.append({"role": "system", "content": "You answer briefly."})
    m.append({"role": "user", "content": f"What is the capital of France? number {i}"})
    m.append({"role": "assistant", "content": "Paris." + " The quick brown fox." * (i % 4)})
    if i % 2:
        m.append({"role": "user", "content": "And the dog?"})
        m.append({"role": "assistant", "content": "The lazy dog jumps over " + "the word " * i})
    convs.append({"messages": m})
data = os.path.join(work, "chat.jsonl")
write_jsonl(data, convs)

# (c) packed vs unpacked, all 8 examples in the first (only) step either way.
loss = {}
for packed in (False, True):
    out = os.path.join(work, f"pack-{packed}")
    kw = dict(sample_packing=True, micro_batch_size=1, sequence_len=1024) if packed else dict(micro_batch_size=8, sequence_len=1024)
    r = write_recipe(os.path.join(work, f"pack-{packed}.yaml"), base_recipe(base, data, out, max_steps=1, **kw))
    run(["sft", r, "--no-progress"])
    loss[packed] = metrics(out)[0]["loss"]
print(f"first-step loss: unpacked {loss[False]:.8f}, packed {loss[True]:.8f}")
assert abs(loss[False] - loss[True]) < 1e-5, loss

# (d) target-token count vs transformers.
r = write_recipe(os.path.join(work, "count.yaml"), base_recipe(base, data, os.path.join(work, "count"), max_steps=1, sequence_len=1024))
plan = json.loads(run(["sft", r, "--dry-run"]).stdout.strip().splitlines()[-1])
from transformers import AutoTokenizer  # noqa: E402
tok = AutoTokenizer.from_pretrained(base)
expected = 0
for c in convs:
    text = tok.apply_chat_template(c["messages"], tokenize=False)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    spans, pos = [], 0
    for m in c["messages"]:  # locate each assistant content in the rendered text, in order
        start = text.index("<|im_start|>" + m["role"] + "\n", pos) + len("<|im_start|>" + m["role"] + "\n")
        end = start + len(m["content"])
        pos = end
        if m["role"] == "assistant":
            spans.append((start, end + len("<|im_end|>")))  # train_on_eos: turn -> its <|im_end|> too
    expected += sum(1 for (a, b) in enc["offset_mapping"] if any(s <= a and b <= e and b > a for s, e in spans))
print(f"target tokens: llmtune {plan['train_target_tokens']}, transformers {expected}")
assert plan["train_target_tokens"] == expected, (plan, expected)
assert plan["train_examples"] == len(convs) and plan["total_steps"] == 1 and plan["trainable_params"] > 0, plan
assert plan["memory"]["total_bytes"] > plan["memory"]["weights_bytes"] > 0, plan


# (e) bad input.
def expect_error(args, *needles):
    p = run(args, check=False)
    assert p.returncode == 1, f"expected exit 1 from {args}, got {p.returncode}\n{p.stdout}\n{p.stderr}"
    for n in needles:
        assert n in p.stderr, f"expected {n!r} in:\n{p.stderr}"
    print("ok error:", p.stderr.strip().splitlines()[-1][:200])


bad = os.path.join(work, "bad.jsonl")
with open(bad, "w") as f:
    f.write(json.dumps(convs[0]) + "\n" + json.dumps(convs[1]) + "\n" + '{"messages": [{"role": "user", "content": \n')
expect_error(["sft", write_recipe(os.path.join(work, "bad.yaml"), base_recipe(base, bad, os.path.join(work, "bad")))],
             "bad.jsonl", "3")
typo = base_recipe(base, data, os.path.join(work, "typo"))
typo["learning_rte"] = typo.pop("learning_rate")
expect_error(["sft", write_recipe(os.path.join(work, "typo.yaml"), typo)], "learning_rte", "learning_rate")
expect_error(["sft", write_recipe(os.path.join(work, "q.yaml"), base_recipe(base, data, os.path.join(work, "q"))),
              "--set", "adapter=qlora"], "qlora", "needs `load_in_4bit: true`")

# recipes/ci-tiny-sft.yaml: dry run, a full fine-tune run, outputs.
ci = os.path.join(SOURCE, "recipes", "ci-tiny-sft.yaml")
out = os.path.join(work, "ci")
sets = ["--set", f"base_model={base}", "--set", f"output_dir={out}", "--set", f"dataset_prepared_path={work}/cache"]
p = subprocess.run([BIN, "sft", ci, "--dry-run"] + sets, capture_output=True, text=True, cwd=SOURCE)
assert p.returncode == 0, p.stderr
assert "plan (dry run" in p.stdout and "peak memory" in p.stdout, p.stdout
assert not os.path.exists(os.path.join(out, "metrics.jsonl")), "dry run trained"
p = subprocess.run([BIN, "sft", ci, "--no-progress"] + sets, capture_output=True, text=True, cwd=SOURCE)
assert p.returncode == 0, p.stderr
for f in ["config.json", "model.safetensors", "tokenizer.json", "recipe.resolved.yaml", "metrics.jsonl", "loss.svg"]:
    assert os.path.isfile(os.path.join(out, f)), f"missing {f}"
print("ok: ci-tiny-sft.yaml full fine-tune outputs")

# SIGINT: stops after the current step and leaves a checkpoint.
out = os.path.join(work, "ci-int")
sets_int = ["--set", f"base_model={base}", "--set", f"output_dir={out}", "--set", f"dataset_prepared_path={work}/cache",
            "--set", "max_steps=100000", "--set", "save_steps=100000"]
p = subprocess.Popen([BIN, "sft", ci, "--no-progress"] + sets_int, cwd=SOURCE, stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True)
deadline = time.time() + 120
while time.time() < deadline and not (os.path.exists(os.path.join(out, "metrics.jsonl"))
                                      and os.path.getsize(os.path.join(out, "metrics.jsonl")) > 0):
    time.sleep(0.05)
p.send_signal(signal.SIGINT)
so, se = p.communicate(timeout=120)
assert p.returncode == 0, se
ck = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
assert ck and os.path.isfile(os.path.join(out, "model.safetensors")), (os.listdir(out), se[-1000:])
print(f"ok: SIGINT stopped cleanly with {ck}")
print("ok: sft data")
