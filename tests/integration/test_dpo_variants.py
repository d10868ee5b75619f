"""Every `llmtune dpo` loss runs end to end on the demo model (4 steps each) with finite losses and its
metrics; precomputed reference log-probs give the same losses as the live reference, both with LoRA
(adapter switched off) and with full fine-tuning (precomputed from the untrained policy vs a frozen copy);
bad recipes fail with messages that name the problem.
"""
import json
import math
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, SOURCE, demo_model, run  # noqa: E402


def train(work, name, base, data, **kw):
    out = os.path.join(work, name)
    recipe = {"base_model": base, "chat_template": "tokenizer_default", "datasets": [{"path": data}],
              "sequence_len": 64, "micro_batch_size": 4, "max_steps": 4, "learning_rate": 5e-3,
              "lr_scheduler": "constant", "optimizer": "adamw_torch", "adapter": "lora", "lora_r": 4,
              "lora_alpha": 8, "lora_target_linear": True, "output_dir": out, "logging_steps": 1, "seed": 5,
              "save_strategy": "no"}
    recipe.update(kw)
    recipe = {k: v for k, v in recipe.items() if v is not None}
    path = os.path.join(work, f"{name}.yaml")
    with open(path, "w") as f:
        json.dump(recipe, f)
    run(["dpo", path, "--no-progress"])
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip() and '"loss"' in l]


def main():
    base = demo_model()
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
                   check=True, capture_output=True)
    data = os.path.join(FIXTURES, "align", "dpo_train.jsonl")
    work = os.path.join(FIXTURES, "..", "test-dpo-variants")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    variants = {
        "sigmoid": dict(rl="dpo"), "cdpo": dict(rl="dpo", dpo_label_smoothing=0.1),
        "hinge": dict(rl="dpo", dpo_loss_type="hinge"), "robust": dict(rl="dpo", dpo_loss_type="robust",
                                                                       dpo_label_smoothing=0.1),
        "ipo": dict(rl="ipo"), "simpo": dict(rl="simpo", rl_beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
        "orpo": dict(rl="orpo", orpo_alpha=0.1), "kto": dict(rl="kto"), "rpo": dict(rl="dpo", rpo_alpha=1.0),
    }
    for name, kw in variants.items():
        lines = train(work, name, base, data, **kw)
        assert [l["step"] for l in lines] == [1, 2, 3, 4], (name, lines)
        for l in lines:
            assert math.isfinite(l["loss"]), (name, l)
            # KTO logs chosen/rejected only for micro-batches that hold desirable/undesirable examples.
            keys = ("kl",) if name == "kto" else ("rewards/chosen", "rewards/rejected", "logps/chosen")
            for k in keys:
                assert k in l, (name, k, l)
        if name in ("sigmoid", "cdpo", "hinge", "robust", "ipo", "simpo", "orpo", "rpo"):
            assert "rewards/accuracies" in lines[-1] and "rewards/margins" in lines[-1], (name, lines[-1])
        if name in ("orpo", "rpo"):
            assert "nll_loss" in lines[-1], lines[-1]
        if name == "orpo":
            assert "log_odds_ratio" in lines[-1], lines[-1]
        if name == "kto":
            assert "kl" in lines[-1], lines[-1]
        if name == "sigmoid":  # LoRA B = 0 at step 1: policy == reference, so the loss is log 2
            assert abs(lines[0]["loss"] - math.log(2)) < 1e-5, lines[0]
        print(f"{name}: losses {[round(l['loss'], 4) for l in lines]}")

    # Precomputed reference log-probs == live reference (LoRA: adapter off; full: frozen copy).
    for adapter in ("lora", None):
        live = train(work, f"live-{adapter}", base, data, rl="dpo", adapter=adapter, learning_rate=1e-3,
                     **({} if adapter else {"lora_r": None, "lora_alpha": None, "lora_target_linear": None}))
        pre = train(work, f"pre-{adapter}", base, data, rl="dpo", adapter=adapter, learning_rate=1e-3,
                    precompute_ref_log_probs=True,
                    **({} if adapter else {"lora_r": None, "lora_alpha": None, "lora_target_linear": None}))
        for a, b in zip(live, pre):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 + 1e-5 * abs(a["loss"]), (adapter, a, b)
            assert abs(a["rewards/margins"] - b["rewards/margins"]) <= 1e-4, (adapter, a, b)
        print(f"precompute_ref_log_probs ({adapter or 'full'}): losses match the live reference "
              f"{[round(l['loss'], 5) for l in pre]}")

    # Errors people will hit.
    bad = os.path.join(work, "bad.yaml")
    with open(bad, "w") as f:
        json.dump({"base_model": base, "rl": "dpo", "datasets": [{"path": data, "filters": ["status tie"]}],
                   "output_dir": os.path.join(work, "bad")}, f)
    p = run(["dpo", bad], check=False)
    assert p.returncode != 0 and "no comparison operator" in p.stderr, p.stderr
    with open(bad, "w") as f:
        json.dump({"base_model": base, "rl": "dpo", "datasets": [{"path": os.path.join(FIXTURES, "align", "x.jsonl")}],
                   "output_dir": os.path.join(work, "bad")}, f)
    with open(os.path.join(FIXTURES, "align", "x.jsonl"), "w") as f:
        f.write(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    p = run(["dpo", bad], check=False)
    assert p.returncode != 0 and "x.jsonl (line 1)" in p.stderr and "field_chosen" in p.stderr, p.stderr
    os.remove(os.path.join(FIXTURES, "align", "x.jsonl"))
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
