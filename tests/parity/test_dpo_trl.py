"""`llmtune dpo` against TRL's DPOTrainer (trl 1.16.0, peft LoRA, reference = adapter off) on the demo
model and the same preference pairs (string prompts and completions, EOS appended by both): at the first
step, before any update, both compute the same policy log-probs of chosen and rejected completions
(tokenization, prompt/completion masking, shifted log-softmax summed over completion tokens) and the
same loss (log 2, since a fresh LoRA leaves the policy equal to the reference).
Both sides run in fp32: TRL's bf16/fp16 are pinned off, because otherwise its CPU run autocasts to bf16
and its log-probs move by ~3e-4 relative (llmtune's fp32 values equal a plain transformers forward).
Tolerance: 1e-4 relative on the log-probs, 1e-6 on the loss. The loss formulas themselves are checked
against TRL on fixed numbers in test_align (unit).
"""
import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import FIXTURES, demo_model, run  # noqa: E402


def main():
    base = demo_model()
    work = os.path.join(FIXTURES, "..", "test-dpo-trl")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = os.path.join(work, "pairs.jsonl")
    pair = {"prompt": "Describe: quick Paris", "chosen": " capital brown fox", "rejected": " splits"}
    with open(data, "w") as f:
        for _ in range(4):  # identical records: the first batch is the same whatever the shuffling
            f.write(json.dumps(pair) + "\n")
    out = os.path.join(work, "llmtune")
    recipe = {"base_model": base, "rl": "dpo", "rl_beta": 0.1, "datasets": [{"path": data}], "sequence_len": 64,
              "micro_batch_size": 1, "max_steps": 1, "learning_rate": 1e-5, "adapter": "lora", "lora_r": 8,
              "lora_alpha": 16, "lora_target_linear": True, "output_dir": out, "logging_steps": 1,
              "save_strategy": "no", "seed": 0}
    path = os.path.join(work, "dpo.yaml")
    with open(path, "w") as f:
        json.dump(recipe, f)
    run(["dpo", path, "--no-progress"])
    ours = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l][0]

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import trl
    from trl import DPOConfig, DPOTrainer
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = DPOConfig(output_dir=os.path.join(work, "trl"), per_device_train_batch_size=1, max_steps=1,
                    learning_rate=1e-5, beta=0.1, loss_type="sigmoid", logging_steps=1, save_strategy="no",
                    report_to=[], use_cpu=True, seed=0, max_length=64, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=load_dataset("json", data_files=data, split="train"),
                         processing_class=tok, peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                      task_type="CAUSAL_LM"))
    trainer.train()
    theirs = [h for h in trainer.state.log_history if "loss" in h][0]
    print(f"trl {trl.__version__}: loss {theirs['loss']:.6f} logps/chosen {theirs['logps/chosen']:.5f} "
          f"logps/rejected {theirs['logps/rejected']:.5f}")
    print(f"llmtune:   loss {ours['loss']:.6f} logps/chosen {ours['logps/chosen']:.5f} "
          f"logps/rejected {ours['logps/rejected']:.5f}")
    for k in ("logps/chosen", "logps/rejected"):
        assert abs(ours[k] - theirs[k]) <= 1e-4 * abs(theirs[k]) + 1e-5, (k, ours[k], theirs[k])
    assert abs(ours["loss"] - math.log(2)) < 1e-6 and abs(theirs["loss"] - math.log(2)) < 1e-4, (ours, theirs)
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
