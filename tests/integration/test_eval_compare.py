# ctest-processors: 2  (trains with both cores for minutes; see CMakeLists.txt)
"""Before/after with `llmtune eval --model BASE --adapter OUT`: a short LoRA SFT on the "last word" chat
task, then both runs on a generation task and a multiple-choice task plus held-out perplexity. Checks:
two runs side by side; one results JSON + Markdown report written, equal to the printed JSON; batched
greedy generations equal `llmtune generate --chat --greedy` one prompt at a time; exact match recomputed
from the samples; perplexity equal to `llmtune eval perplexity`; the adapter run equals `--model MERGED`;
and the tuned model is better at the task it was trained on."""
import glob
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import base_recipe, demo_model, last_word_task, run, write_jsonl, write_recipe  # noqa: E402

SOURCE = os.environ.get("LLMTUNE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
tasks = os.path.join(SOURCE, "tests", "fixtures-src", "eval")
model = demo_model()
work = tempfile.mkdtemp(prefix="llmtune-eval-compare-")
data = os.path.join(work, "train.jsonl")
write_jsonl(data, last_word_task(3000, seed=1))
out = os.path.join(work, "out")
run(["sft", write_recipe(os.path.join(work, "r.yaml"), base_recipe(
    model, data, out, max_steps=300, micro_batch_size=16, lora_r=32, lora_alpha=32, logging_steps=20))])  # as test_sft_learning

ppl_text = os.path.join(model, "corpus.txt")
res_dir = os.path.join(work, "results")
p = run(["eval", "--model", model, "--adapter", out, "--task", os.path.join(tasks, "last_word.yaml"),
         "--task", os.path.join(tasks, "tiny_mc.yaml"), "--perplexity-data", ppl_text, "--perplexity-max-length", "128",
         "--label", "before", "--label", "after", "--output", res_dir, "--batch-size", "5", "--json"])
printed = json.loads(p.stdout.strip().splitlines()[-1])
print("\n".join(p.stdout.strip().splitlines()[:-1]))
files = glob.glob(os.path.join(res_dir, "results-*.json"))
assert len(files) == 1 and os.path.exists(files[0][:-5] + ".md"), files
saved = json.load(open(files[0]))
assert saved == printed, "results file differs from the printed JSON"
runs = saved["runs"]
assert [r["label"] for r in runs] == ["before", "after"], [r["label"] for r in runs]
assert runs[1]["identity"]["adapters"][0]["path"] == os.path.abspath(out)
assert "adapter_model.safetensors" in runs[1]["identity"]["adapters"][0]["files"]
md = open(files[0][:-5] + ".md").read()
assert "| last_word exact_match (%) |" in md and "## Generations" in md and "| perplexity |" in md, md
assert "before" in p.stdout and "after" in p.stdout and "generations:" in p.stdout

# Batched generation (5 prompts per batch, left-padded) equals one-at-a-time greedy generation.
rows = [json.loads(l) for l in open(os.path.join(tasks, "last_word.jsonl"))]
for r in runs:
    s = r["tasks"]["last_word"]["samples"]
    assert len(s) == len(rows)
    em = sum(x["correct"] for x in s) / len(s)
    assert abs(em - r["tasks"]["last_word"]["metrics"]["exact_match"]) < 1e-12
    for x in s:
        assert x["correct"] == (x["output"].strip() == x["target"].strip()), x
    adapter = ["--adapter", out] if r["label"] == "after" else []
    for i in (0, 6, 13):
        q = rows[i]["messages"][0]["content"]
        g = json.loads(run(["generate", "--model", model, *adapter, "--chat", "--greedy", "-n", "6", "--json", "-p", q])
                       .stdout.strip().splitlines()[-1])
        assert g["text"] == s[i]["output"], (r["label"], i, g["text"], s[i]["output"])

# Perplexity equals the perplexity subcommand.
for r in runs:
    adapter = ["--adapter", out] if r["label"] == "after" else []
    ref = json.loads(run(["eval", "perplexity", "--model", model, *adapter, "--data", ppl_text, "--max-length", "128",
                          "--json"]).stdout.strip().splitlines()[-1])
    assert abs(r["perplexity"]["perplexity"] - ref["perplexity"]) <= 1e-9 * ref["perplexity"], (r["perplexity"], ref)

# The adapter run equals the merged model's run (same metrics, same generations).
merged = os.path.join(work, "merged")
run(["merge", "--base", model, "--adapter", out, "--out", merged])
mj = json.loads(run(["eval", "--model", merged, "--task", os.path.join(tasks, "last_word.yaml"), "--task",
                     os.path.join(tasks, "tiny_mc.yaml"), "--output", "-", "--json"]).stdout.strip().splitlines()[-1])
mt = mj["runs"][0]["tasks"]
assert [x["output"] for x in mt["last_word"]["samples"]] == [x["output"] for x in runs[1]["tasks"]["last_word"]["samples"]]
assert mt["tiny_mc"]["metrics"]["acc"] == runs[1]["tasks"]["tiny_mc"]["metrics"]["acc"]
for a, b in zip(mt["tiny_mc"]["samples"], runs[1]["tasks"]["tiny_mc"]["samples"]):
    assert all(abs(x - y) < 1e-3 for x, y in zip(a["loglikelihoods"], b["loglikelihoods"])), (a, b)

before = runs[0]["tasks"]["last_word"]["metrics"]["exact_match"]
after = runs[1]["tasks"]["last_word"]["metrics"]["exact_match"]
assert after > before + 0.25, f"SFT did not improve the trained task: {before} -> {after}"
print(f"before/after: last_word exact match {before:.3f} -> {after:.3f}; perplexity "
      f"{runs[0]['perplexity']['perplexity']:.2f} -> {runs[1]['perplexity']['perplexity']:.2f}")
shutil.rmtree(work, ignore_errors=True)
