"""`llmtune eval --task` multiple choice against the LM Evaluation Harness (lm-eval, pinned in
versions.env) on the demo checkpoint and a tiny task made for the test (tests/fixtures-src/eval):
lm-eval runs the same model from its directory (`hf` model type, CPU, fp32, offline) on the same
JSONL. Required: acc, acc_norm and their standard errors equal (to 1e-9: they are counts), every
per-choice log-likelihood within 2e-4 absolute (fp32, different kernels/summation), and the same
prediction per record. Two settings: 2-shot with the tokenizer's default special tokens, and
0-shot without them (harness add_bos_token=False <-> llmtune --no-bos)."""
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import SOURCE, demo_model, run_json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

model_dir = demo_model()
src = os.path.join(SOURCE, "tests", "fixtures-src", "eval")
work = tempfile.mkdtemp(prefix="llmtune-eval-lmeval-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "hf-datasets")
data = os.path.join(work, "tiny_mc.jsonl")
shutil.copy(os.path.join(src, "tiny_mc.jsonl"), data)
docs = [json.loads(l) for l in open(data)]

import lm_eval  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402


def harness(num_fewshot, add_bos):
    tdir = os.path.join(work, f"tasks-{num_fewshot}-{add_bos}")
    os.makedirs(tdir, exist_ok=True)
    # YAML is a superset of JSON.
    cfg = {"task": "tiny_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
           "test_split": "test", "fewshot_split": "test", "output_type": "multiple_choice",
           "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
           "target_delimiter": " ", "fewshot_delimiter": "\n\n", "num_fewshot": num_fewshot,
           "fewshot_config": {"sampler": "first_n"},
           "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]}
    with open(os.path.join(tdir, "tiny_mc.yaml"), "w") as f:
        json.dump(cfg, f)
    args = f"pretrained={model_dir},dtype=float32" + ("" if add_bos is None else f",add_bos_token={add_bos}")
    res = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["tiny_mc"], device="cpu", batch_size=8,
                                  log_samples=True, task_manager=TaskManager(include_path=tdir))
    r = res["results"]["tiny_mc"]
    samples = sorted(res["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    lls = [[float(x[0][0]) for x in s["resps"]] for s in samples]
    return r, lls


def llmtune(num_fewshot, no_bos):
    tdir = os.path.join(work, f"ours-{num_fewshot}-{no_bos}")
    os.makedirs(tdir, exist_ok=True)
    yaml = os.path.join(tdir, "tiny_mc.yaml")
    with open(yaml, "w") as f:
        json.dump({"task": "tiny_mc", "type": "multiple_choice", "data": data, "context_field": "question",
                   "choices_field": "choices", "gold_field": "label", "num_fewshot": num_fewshot}, f)
    args = ["eval", "--model", model_dir, "--task", yaml, "--batch-size", "4", "--output", "-", "--json"]
    if no_bos:
        args.append("--no-bos")
    res = run_json(args)
    return res["runs"][0]["tasks"]["tiny_mc"]


for num_fewshot, bos in [(2, None), (0, False)]:
    ref, ref_lls = harness(num_fewshot, bos)
    ours = llmtune(num_fewshot, bos is False)
    m = ours["metrics"]
    assert ours["n"] == len(docs) == len(ref_lls), (ours["n"], len(docs), len(ref_lls))
    worst = 0.0
    for i, (s, rl) in enumerate(zip(ours["samples"], ref_lls)):
        assert len(s["loglikelihoods"]) == len(rl), (i, s["loglikelihoods"], rl)
        for a, b in zip(s["loglikelihoods"], rl):
            worst = max(worst, abs(a - b))
        assert max(range(len(rl)), key=lambda k: (rl[k], -k)) == s["pred"], (i, rl, s)
    assert worst < 2e-4, f"log-likelihoods differ by up to {worst}"
    for key in ("acc", "acc_norm"):
        assert abs(m[key] - ref[f"{key},none"]) < 1e-9, (key, m[key], ref[f"{key},none"])
        assert abs(m[key + "_stderr"] - ref[f"{key}_stderr,none"]) < 1e-9, (key, m[key + "_stderr"], ref[f"{key}_stderr,none"])
    print(f"{num_fewshot}-shot, add_bos_token={bos}: acc {m['acc']:.4f} ± {m['acc_stderr']:.4f}, acc_norm "
          f"{m['acc_norm']:.4f} ± {m['acc_norm_stderr']:.4f} equal to lm-eval; max |Δ loglik| {worst:.2e}")

shutil.rmtree(work, ignore_errors=True)
print("ok")
