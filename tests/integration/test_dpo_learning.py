# ctest-processors: 2  (trains with both cores for minutes; see CMakeLists.txt)
"""`llmtune dpo` end to end on the demo model (tiny Llama + BPE tokenizer + chat template) with LoRA:
preference data as chat messages, recipe filters (`status != "tie"`, `chosen_score >= 8`) with their
counts printed, held-out evaluation. Proves learning: the held-out DPO preference accuracy and the
implicit-reward margin (measured by llmtune during training and independently afterwards with
transformers + peft on the saved adapter) rise from 0, while the reference (the base weights, adapter
off) is untouched: the base checkpoint's bytes and llmtune's in-memory fingerprint of the frozen weights.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, SOURCE, demo_model, run  # noqa: E402


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def main():
    base = demo_model()
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
                   check=True, capture_output=True)
    data = os.path.join(FIXTURES, "align")
    work = os.path.join(FIXTURES, "..", "test-dpo-learning")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    out = os.path.join(work, "out")
    recipe = {
        "base_model": base, "rl": "dpo", "rl_beta": 0.5, "chat_template": "tokenizer_default",
        "datasets": [{"path": os.path.join(data, "dpo_train.jsonl"),
                      "filters": ["status != \"tie\"", "chosen_score >= 8"]}],
        "test_datasets": [{"path": os.path.join(data, "dpo_held.jsonl")}],
        "sequence_len": 64, "micro_batch_size": 8, "eval_batch_size": 32, "num_epochs": 1, "learning_rate": 2e-3,
        "lr_scheduler": "cosine", "warmup_ratio": 0.1, "optimizer": "adamw_torch", "adapter": "lora", "lora_r": 8,
        "lora_alpha": 16, "lora_target_linear": True, "output_dir": out, "logging_steps": 5, "eval_steps": 20,
        "seed": 7, "save_strategy": "no",
    }
    path = os.path.join(work, "dpo.yaml")
    with open(path, "w") as f:
        json.dump(recipe, f, indent=1)
    before = sha(os.path.join(base, "model.safetensors"))
    p = run(["dpo", path, "--no-progress"])
    log = p.stdout + p.stderr
    # Filters: 48 noise records in dpo_train.jsonl, half ties and half low scores.
    assert "filter `status != \"tie\"` removed 24 record(s)" in log, log
    assert "filter `chosen_score >= 8` removed 24 record(s)" in log, log
    assert "480 train, 64 eval" in log, log

    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    evals = [l for l in lines if "eval_rewards/accuracies" in l]
    assert len(evals) >= 2, lines
    first, last = evals[0], evals[-1]
    print(f"held-out: accuracy {first['eval_rewards/accuracies']:.3f} -> {last['eval_rewards/accuracies']:.3f}, "
          f"margin {first['eval_rewards/margins']:.3f} -> {last['eval_rewards/margins']:.3f} "
          f"(steps {first['step']} -> {last['step']})")
    # Before training the policy equals the reference: accuracy 0 and margin 0 by definition.
    assert last["eval_rewards/accuracies"] >= 0.8, last
    assert last["eval_rewards/margins"] > 0.5, last
    train_lines = [l for l in lines if "loss" in l and "rewards/margins" in l]
    assert train_lines[-1]["rewards/margins"] > train_lines[0]["rewards/margins"], train_lines

    # The reference is untouched.
    assert sha(os.path.join(base, "model.safetensors")) == before
    check = json.load(open(os.path.join(out, "reference_check.json")))
    assert check["unchanged"] and check["frozen_weights_before"] == check["frozen_weights_after"], check

    # Independent check with transformers + peft on the saved adapter: held-out implicit-reward accuracy.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(base)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pol = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()

    def logp(model, prompt_ids, comp_ids):
        ids = torch.tensor([prompt_ids + comp_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        tgt = ids[0, 1:]
        return float(lp[torch.arange(len(tgt)), tgt][len(prompt_ids) - 1:].sum())

    correct, margins = 0, []
    held = [json.loads(l) for l in open(os.path.join(data, "dpo_held.jsonl"))]
    for r in held:
        ptext = tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        pids = tok(ptext, add_special_tokens=True)["input_ids"]
        diffs = []
        for key in ("chosen", "rejected"):
            full = tok.apply_chat_template(r["prompt"] + r[key], tokenize=False)
            cids = tok(full[len(ptext):], add_special_tokens=False)["input_ids"]
            diffs.append(logp(pol, pids, cids) - logp(ref, pids, cids))
        m = 0.5 * (diffs[0] - diffs[1])
        margins.append(m)
        correct += m > 0
    acc = correct / len(held)
    mean_margin = sum(margins) / len(margins)
    print(f"transformers+peft on the saved adapter: held-out accuracy {acc:.3f}, margin {mean_margin:.3f} "
          f"(llmtune: {last['eval_rewards/accuracies']:.3f}, {last['eval_rewards/margins']:.3f})")
    assert abs(acc - last["eval_rewards/accuracies"]) <= 2 / len(held), (acc, last)
    assert abs(mean_margin - last["eval_rewards/margins"]) <= 1e-3 + 1e-3 * abs(mean_margin), (mean_margin, last)
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
