# ctest-processors: 2  (two ranks)
"""The alignment stages under `llmtune launch` on 2 Gloo ranks: `dpo` (LoRA, DDP, ZeRO-1 and ZeRO-3)
and `reward` (LoRA + score head, DDP and ZeRO-3) end with the same weights as one process over the same global batch
(one process with gradient accumulation 2 = two ranks x accumulation 1; each rank takes every second
batch of the epoch), and rank 0 alone writes; `ppo` (GRPO, LoRA) runs on 2 ranks, each rank sampling
its own prompts with its own seed, and writes one output (ZeRO-3 is refused for rollouts). Tolerance: fp32 reduction order (the
gradients of two micro-batches are summed in another order), as in test_dist_sft."""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import FIXTURES, assert_close, demo_model, launch, metrics, run, write_recipe  # noqa: E402
from common import SOURCE  # noqa: E402,I001

work = os.path.join(FIXTURES, "dist-align")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
               check=True, capture_output=True)
data = os.path.join(FIXTURES, "align")
STEPS = 4


def recipe(stage, name, accum, **kw):
    out = os.path.join(work, name)
    r = {"base_model": base, "chat_template": "tokenizer_default", "sequence_len": 64, "micro_batch_size": 4,
         "gradient_accumulation_steps": accum, "max_steps": STEPS, "learning_rate": 5e-3, "lr_scheduler": "constant",
         "optimizer": "adamw_torch", "max_grad_norm": 1.0, "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
         "lora_dropout": 0.0, "lora_target_linear": True, "output_dir": out, "logging_steps": 1, "seed": 5,
         "save_strategy": "no", "eval_strategy": "no"}
    if stage == "dpo":
        r.update({"rl": "dpo", "rl_beta": 0.5, "datasets": [{"path": os.path.join(data, "dpo_train.jsonl")}]})
    else:
        r.update({"reward_model": True, "datasets": [{"path": os.path.join(data, "reward_train.jsonl")}]})
    r.update(kw)
    return write_recipe(os.path.join(work, name + ".yaml"), r), out


ADAPTER = "adapter_model.safetensors"

# ---- DPO: one process (accumulation 2) vs 2 ranks under DDP and under ZeRO-1 ---------------------
r1, out1 = recipe("dpo", "dpo-single", 2)
run(["dpo", r1, "--no-progress"])
for name, extra in (("dpo-ddp", {}), ("dpo-zero1", {"zero_stage": 1}), ("dpo-zero3", {"zero_stage": 3})):
    r2, out2 = recipe("dpo", name, 1, **extra)
    p = launch(2, ["dpo", r2, "--no-progress"])
    assert "[rank 1] dist: rank 1 of 2 joined" in p.stderr, p.stderr[-2000:]
    assert_close(os.path.join(out1, ADAPTER), os.path.join(out2, ADAPTER), what=f"{name} 2 ranks vs 1 process")
    m1, m2 = metrics(out1), metrics(out2)
    assert len(m2) == STEPS and all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(m1, m2)), (m1, m2)
    check = json.load(open(os.path.join(out2, "reference_check.json")))
    assert check["unchanged"], check

# ---- reward: LoRA + score head; the saved classifier (adapter merged) must match --------------------
rr1, outr1 = recipe("reward", "reward-single", 2)
run(["reward", rr1, "--no-progress"])
for name, extra in (("reward-ddp", {}), ("reward-zero3", {"zero_stage": 3})):
    rr2, outr2 = recipe("reward", name, 1, **extra)
    launch(2, ["reward", rr2, "--no-progress"])
    assert_close(os.path.join(outr1, "model.safetensors"), os.path.join(outr2, "model.safetensors"),
                 what=f"reward model ({name}) 2 ranks vs 1 process")

# ---- GRPO on 2 ranks: runs in step, one output, eval of the held-out reward on every rank --------------
prompts = os.path.join(work, "prompts.jsonl")
with open(os.path.join(data, "dpo_train.jsonl")) as f, open(prompts, "w") as g:
    for line in list(f)[:64]:
        rec = json.loads(line)
        g.write(json.dumps({"prompt": rec["prompt"], "answer": rec["chosen"][-1]["content"]}) + "\n")
rg = write_recipe(os.path.join(work, "grpo.yaml"), {
    "base_model": base, "rl": "grpo", "chat_template": "tokenizer_default", "datasets": [{"path": prompts}],
    "sequence_len": 64, "micro_batch_size": 2, "max_steps": 4, "learning_rate": 1e-3, "lr_scheduler": "constant",
    "optimizer": "adamw_torch", "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
    "lora_target_linear": True, "output_dir": os.path.join(work, "grpo"), "logging_steps": 1, "seed": 3,
    "save_strategy": "no",
    "trl": {"reward_funcs": ["exact_match"], "num_generations": 4, "max_completion_length": 4,
            "num_ppo_epochs": 1, "num_mini_batches": 2}})
p = launch(2, ["ppo", rg, "--no-progress", "--set", "zero_stage=3"], check=False)
assert p.returncode != 0 and "zero_stage 3 / fsdp is not supported for rollouts" in p.stdout + p.stderr, p.stderr[-2000:]
p = launch(2, ["ppo", rg, "--no-progress"])
log = p.stdout + p.stderr
assert "[rank 1] dist: rank 1 of 2 joined" in log, log[-2000:]
assert log.count("written to") == 1, "only rank 0 writes the output:\n" + log[-3000:]
lines = metrics(os.path.join(work, "grpo"))
assert len([l for l in lines if "reward" in l]) == 4, lines
assert os.path.isfile(os.path.join(work, "grpo", ADAPTER))
shutil.rmtree(work, ignore_errors=True)
print("ok: dpo, reward and grpo under llmtune launch")
