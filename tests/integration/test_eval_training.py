"""Run monitoring in `llmtune sft`: `eval_tasks:` run at every `eval_steps` next to the eval loss and land
in metrics.jsonl; `use_tensorboard: true` writes event files that TensorBoard's own readers load (its
record reader checks both masked CRC32Cs of every record); scalars equal the metrics.jsonl values
(float32), sample generations are text summaries; loss.svg shows the eval task metrics."""
import glob
import json
import math
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import FIXTURES, base_recipe, demo_model, last_word_task, run, write_jsonl, write_recipe  # noqa: E402

SOURCE = os.environ.get("LLMTUNE_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", ".."))
tasks_src = os.path.join(SOURCE, "tests", "fixtures-src", "eval")
model = demo_model()
work = tempfile.mkdtemp(prefix="llmtune-eval-train-")
data = os.path.join(work, "train.jsonl")
write_jsonl(data, last_word_task(64, seed=1))
out = os.path.join(work, "out")
# A relative task path resolves against the recipe's folder.
for f in ("last_word.yaml", "last_word.jsonl", "tiny_mc.yaml", "tiny_mc.jsonl"):
    shutil.copy(os.path.join(tasks_src, f), work)
recipe = write_recipe(os.path.join(work, "recipe.yaml"), base_recipe(
    model, data, out, max_steps=6, micro_batch_size=8, logging_steps=1, eval_steps=3, val_set_size=0.125,
    eval_tasks=["last_word.yaml", os.path.join(work, "tiny_mc.yaml")], use_tensorboard=True))
os.chdir(tempfile.gettempdir())
run(["sft", recipe])

# 1. metrics.jsonl: eval lines at steps 3 and 6 carry eval_loss and the task metrics.
lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
evals = [l for l in lines if "eval_loss" in l]
assert [l["step"] for l in evals] == [3, 6], evals
for l in evals:
    for k in ("eval_last_word/exact_match", "eval_tiny_mc/acc", "eval_tiny_mc/acc_norm"):
        assert k in l and 0.0 <= l[k] <= 1.0, (k, l)
    # 12 multiple-choice records: accuracy is a multiple of 1/12; 24 generation prompts: of 1/24.
    assert abs(l["eval_tiny_mc/acc"] * 12 - round(l["eval_tiny_mc/acc"] * 12)) < 1e-9, l
    assert abs(l["eval_last_word/exact_match"] * 24 - round(l["eval_last_word/exact_match"] * 24)) < 1e-9, l
train_lines = [l for l in lines if "loss" in l]
assert len(train_lines) == 6, train_lines

# 2. TensorBoard: one event file, read back by TensorBoard's own loader and accumulator.
from tensorboard.backend.event_processing import event_accumulator, event_file_loader  # noqa: E402
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import PyRecordReader_New  # noqa: E402

files = glob.glob(os.path.join(out, "runs", "events.out.tfevents.*"))
assert len(files) == 1, files
reader = PyRecordReader_New(files[0])  # raises DataLossError on a bad length or payload CRC
n_records = 0
while True:
    try:
        reader.GetNext()
    except Exception as e:  # OutOfRangeError at the end; anything else is a failure
        assert type(e).__name__ == "OutOfRangeError", repr(e)
        break
    n_records += 1
events = list(event_file_loader.LegacyEventFileLoader(files[0]).Load())
assert len(events) == n_records and events[0].file_version == "brain.Event:2", (len(events), n_records)
acc = event_accumulator.EventAccumulator(files[0], size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
acc.Reload()
tags = acc.Tags()
for t in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "eval/loss",
          "eval/last_word/exact_match", "eval/tiny_mc/acc", "eval/tiny_mc/acc_norm"):
    assert t in tags["scalars"], (t, tags["scalars"])


def close(a, b):
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


loss = acc.Scalars("train/loss")
assert [e.step for e in loss] == [l["step"] for l in train_lines], [e.step for e in loss]
for e, l in zip(loss, train_lines):
    assert close(e.value, l["loss"]), (e.value, l["loss"])
lr = acc.Scalars("train/learning_rate")
assert all(close(e.value, l["lr"]) for e, l in zip(lr, train_lines))
for key, tag in (("eval_loss", "eval/loss"), ("eval_tiny_mc/acc", "eval/tiny_mc/acc"),
                 ("eval_last_word/exact_match", "eval/last_word/exact_match")):
    got = acc.Scalars(tag)
    assert [e.step for e in got] == [3, 6] and all(close(e.value, l[key]) for e, l in zip(got, evals)), (tag, got)
# Sample generations: the text plugin's string tensor, one per evaluation.
assert "samples/last_word" in tags["tensors"], tags["tensors"]
texts = acc.Tensors("samples/last_word")
assert [t.step for t in texts] == [3, 6], texts
body = texts[0].tensor_proto.string_val[0].decode()
assert body.startswith("| prompt | output | reference | correct |") and "Last word:" in body, body[:200]
meta = acc.SummaryMetadata("samples/last_word")
assert meta.plugin_data.plugin_name == "text", meta

# 3. The plot shows the eval task metrics.
svg = open(os.path.join(out, "loss.svg")).read()
assert 'id="eval_metric_tiny_mc/acc"' in svg and 'id="eval_metric_last_word/exact_match"' in svg, "eval metrics missing from loss.svg"

print(f"sft with eval_tasks + TensorBoard: {len(evals)} evaluations, {n_records} records, scalars and text read back")
shutil.rmtree(work, ignore_errors=True)
