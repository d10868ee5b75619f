"""`llmtune sft` on 2 Gloo ranks equals one process over the same global batch: DDP (with gradient
accumulation, so the no-sync micro-steps are exercised), ZeRO-1 and ZeRO-2 (LoRA), and ZeRO-2 / a
DeepSpeed JSON for a full fine-tune; ranks started by torchrun's or Slurm's environment instead of
the launcher give the same result; rank 0 alone writes outputs. Tolerance: fp32 reduction order."""
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (FIXTURES, assert_close, base_recipe, demo_model, last_word_task, launch, metrics, port,  # noqa
                         run, run_ranks, write_jsonl, write_recipe)

work = os.path.join(FIXTURES, "dist-sft")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
train = os.path.join(work, "train.jsonl")
write_jsonl(train, last_word_task(400, seed=5))
STEPS = 4


def recipe(name, accum, **kw):
    out = os.path.join(work, name)
    r = base_recipe(base, train, out, max_steps=STEPS, micro_batch_size=4, gradient_accumulation_steps=accum,
                    lora_dropout=0.0, learning_rate=5e-3, max_grad_norm=1.0, **kw)
    if r.get("adapter") is None:  # full fine-tune
        for k in [k for k in r if k == "adapter" or k.startswith("lora_")]:
            r.pop(k)
    return write_recipe(os.path.join(work, name + ".yaml"), r), out


ADAPTER = "adapter_model.safetensors"

# One process, accumulation 4: the global batch of 16 rows per step.
r1, out1 = recipe("single", 4)
run(["sft", r1, "--no-progress"])

# Two ranks x accumulation 2, through the launcher (DDP buckets; micro-step 1 of 2 does not reduce).
r2, out2 = recipe("ddp", 2)
p = launch(2, ["sft", r2, "--no-progress"])
assert "[rank 0]" in p.stdout + p.stderr and "[rank 1] dist: rank 1 of 2 joined" in p.stderr, p.stderr[-2000:]
assert_close(os.path.join(out1, ADAPTER), os.path.join(out2, ADAPTER), what="DDP 2 ranks vs 1 process")
m1, m2 = metrics(out1), metrics(out2)
assert len(m2) == STEPS and all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(m1, m2)), (m1, m2)
assert all(a["tokens"] == b["tokens"] for a, b in zip(m1, m2)), "token counts are not summed over ranks"
assert os.path.exists(os.path.join(out2, "recipe.resolved.yaml"))

for stage in (1, 2):
    rz, outz = recipe(f"zero{stage}", 2, zero_stage=stage)
    launch(2, ["sft", rz, "--no-progress"])
    assert_close(os.path.join(out1, ADAPTER), os.path.join(outz, ADAPTER), what=f"ZeRO-{stage} 2 ranks vs 1 process")

# Full fine-tune: one process vs ZeRO-2 from an Axolotl-style DeepSpeed JSON.
ds = os.path.join(work, "zero2.json")
json.dump({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}, open(ds, "w"))
rf1, outf1 = recipe("full-single", 4, adapter=None)
rf2, outf2 = recipe("full-zero2", 2, adapter=None, deepspeed=ds)
run(["sft", rf1, "--no-progress"])
launch(2, ["sft", rf2, "--no-progress"])
assert_close(os.path.join(outf1, "model.safetensors"), os.path.join(outf2, "model.safetensors"),
             what="full fine-tune ZeRO-2 (deepspeed JSON) vs 1 process")

# Workers started the way torchrun and srun start them (no llmtune launcher).
rt, outt = recipe("torchrun", 2)
pt = port()
run_ranks([{"RANK": r, "WORLD_SIZE": 2, "LOCAL_RANK": r, "LOCAL_WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": pt} for r in range(2)], ["sft", rt, "--no-progress"])
assert_close(os.path.join(out1, ADAPTER), os.path.join(outt, ADAPTER), what="torchrun-env workers vs 1 process")
rs, outs = recipe("slurm", 2)
ps = port()
run_ranks([{"SLURM_PROCID": r, "SLURM_NTASKS": 2, "SLURM_LOCALID": r, "SLURM_TASKS_PER_NODE": "2",
            "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": ps} for r in range(2)], ["sft", rs, "--no-progress"])
assert_close(os.path.join(out1, ADAPTER), os.path.join(outs, ADAPTER), what="Slurm-env workers vs 1 process")
print("ok: distributed sft matches single-process training")
