"""`llmtune reward` end to end (full fine-tuning of the demo model + a score head): on a learnable
synthetic preference task (chosen completions use one half of the vocabulary list, rejected the other)
the reward model reaches >= 90% pairwise accuracy on held-out pairs (prompts and word combinations never
seen in training), measured by llmtune's eval during training and again by `llmtune reward --score`
on the saved model. Also checks the filters' counts and that the margin column is used.
"""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, SOURCE, demo_model, run  # noqa: E402


def main():
    base = demo_model()
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
                   check=True, capture_output=True)
    data = os.path.join(FIXTURES, "align")
    work = os.path.join(FIXTURES, "..", "test-reward-learning")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    out = os.path.join(work, "out")
    recipe = {
        "base_model": base, "reward_model": True,
        "datasets": [{"path": os.path.join(data, "reward_train.jsonl"),
                      "filters": ["status != 'tie'", "chosen_score >= 8"]}],
        "test_datasets": [{"path": os.path.join(data, "reward_held.jsonl")}],
        "sequence_len": 32, "micro_batch_size": 8, "eval_batch_size": 50, "num_epochs": 2, "learning_rate": 5e-4,
        "lr_scheduler": "linear", "warmup_ratio": 0.05, "optimizer": "adamw_torch", "output_dir": out,
        "logging_steps": 5, "eval_steps": 25, "seed": 3, "save_strategy": "no",
    }
    path = os.path.join(work, "reward.yaml")
    with open(path, "w") as f:
        json.dump(recipe, f, indent=1)
    p = run(["reward", path, "--no-progress"])
    log = p.stdout + p.stderr
    assert "filter `status != 'tie'` removed 20 record(s)" in log, log
    assert "filter `chosen_score >= 8` removed 20 record(s)" in log, log
    assert "400 train, 100 eval" in log, log
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    evals = [l for l in lines if "eval_accuracy" in l]
    assert evals, lines
    print("held-out accuracy during training:", [(e["step"], round(e["eval_accuracy"], 3)) for e in evals])
    assert evals[-1]["eval_accuracy"] >= 0.9, evals[-1]
    assert evals[-1]["eval_margin"] > 1.0, evals[-1]  # the margin column (1.0) is in the loss

    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForSequenceClassification"], cfg
    s = run(["reward", "--score", out, "--data", os.path.join(data, "reward_held.jsonl")])
    rows = [json.loads(l) for l in s.stdout.splitlines() if l.startswith("{")]
    assert len(rows) == 100
    acc = sum(r["chosen_score"] > r["rejected_score"] for r in rows) / len(rows)
    print(f"llmtune reward --score on held-out pairs: accuracy {acc:.3f}")
    assert acc >= 0.9 and abs(acc - evals[-1]["eval_accuracy"]) <= 0.02, (acc, evals[-1])
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
