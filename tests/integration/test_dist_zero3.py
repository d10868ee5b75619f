# ctest-processors: 2
"""Fully sharded data parallelism (`zero_stage: 3`, or Axolotl's `fsdp: [full_shard]`) through
`llmtune launch`, on the demo model (4 decoder layers, tied embeddings):
- LoRA on 2 ranks (accumulation 2) and on 4 ranks (accumulation 1) equals one process with
  accumulation 4 over the same 16-row global batch;
- a full fine-tune on 2 ranks equals one process;
- on 4 ranks, DDP / ZeRO-1 / ZeRO-2 (LoRA) and DDP / ZeRO-1 / ZeRO-2 / ZeRO-3 (full fine-tune) equal
  one process too (the 2-rank cases of the lower stages are in test_dist_sft);
- each rank keeps about 1/N of the decoder layers' parameters (the rank's log line);
- a 2-rank checkpoint (written unsharded by rank 0) resumes on 4 ranks, and after SIGKILL of one
  rank it resumes on 1 process; both end where the uninterrupted run ends; a bf16 full fine-tune
  resumed from its checkpoint ends bitwise equal to the uninterrupted run (fp32 masters gathered);
- DDP full fine-tuning of the tied model with gradient checkpointing: the tied embedding gets
  gradient contributions from the lookup and from every loss chunk, recomputed in backward; it
  equals one process (this once failed with "received a gradient after its DDP bucket was reduced").
Tolerance: fp32, differences come from the order of reductions (assert_close: rtol 1e-4, atol 1e-5)."""
import os
import re
import shutil
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (FIXTURES, assert_close, base_recipe, children, demo_model, last_word_task, launch,  # noqa
                         metrics, run, start_launch, wait_for, write_jsonl, write_recipe)

work = os.path.join(FIXTURES, "dist-zero3")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
train = os.path.join(work, "train.jsonl")
write_jsonl(train, last_word_task(2000, seed=11))
STEPS = 4
ADAPTER, MODEL = "adapter_model.safetensors", "model.safetensors"


def recipe(name, accum, **kw):
    out = os.path.join(work, name)
    kw.setdefault("max_steps", STEPS)
    r = base_recipe(base, train, out, micro_batch_size=4, gradient_accumulation_steps=accum, lora_dropout=0.0,
                    learning_rate=5e-3, max_grad_norm=1.0, **kw)
    if r.get("adapter") is None:  # full fine-tune
        for k in [k for k in r if k == "adapter" or k.startswith("lora_")]:
            r.pop(k)
    return write_recipe(os.path.join(work, name + ".yaml"), r), out


def sft(nproc, rec):
    return launch(nproc, ["sft", rec, "--no-progress"]) if nproc > 1 else run(["sft", rec, "--no-progress"])


# ---- LoRA ------------------------------------------------------------------------------------------
r1, out1 = recipe("lora-single", 4)
sft(1, r1)
r2, out2 = recipe("lora-zero3-2", 2, zero_stage=3)
p = sft(2, r2)
log = p.stdout + p.stderr
assert "ZeRO stage 3" in log, log[-2000:]
assert_close(os.path.join(out1, ADAPTER), os.path.join(out2, ADAPTER), what="ZeRO-3 LoRA, 2 ranks vs 1 process")
m1, m2 = metrics(out1), metrics(out2)
assert all(abs(a["loss"] - b["loss"]) < 1e-4 for a, b in zip(m1, m2)), (m1, m2)
r4, out4 = recipe("lora-fsdp-4", 1, fsdp=["full_shard", "auto_wrap"])
sft(4, r4)
assert_close(os.path.join(out1, ADAPTER), os.path.join(out4, ADAPTER), what="FSDP LoRA, 4 ranks vs 1 process")

# ---- full fine-tune --------------------------------------------------------------------------------
rf1, outf1 = recipe("full-single", 4, adapter=None)
sft(1, rf1)
rf2, outf2 = recipe("full-zero3-2", 2, adapter=None, zero_stage=3)
p = sft(2, rf2)
log = p.stdout + p.stderr
assert_close(os.path.join(outf1, MODEL), os.path.join(outf2, MODEL), what="ZeRO-3 full fine-tune, 2 ranks vs 1 process")
# What each rank keeps: the layers' parameters split in two (greedy by size, so within 25% of half).
kept = re.search(r"ZeRO-3: 4 decoder layers sharded over 2 ranks; this rank keeps ([0-9.]+) MiB of their parameters, "
                 r"a gathered layer takes ([0-9.]+) MiB", log)
assert kept, log[-3000:]
per_rank, layer = float(kept.group(1)), float(kept.group(2))
assert 0.75 * 2 * layer <= per_rank <= 1.25 * 2 * layer, (per_rank, layer)  # 4 layers / 2 ranks = 2 layers' worth

# ---- checkpoints: resume at another world size -----------------------------------------------------
rc, outc = recipe("ckpt-zero3-2", 2, zero_stage=3, save_strategy="steps", save_steps=2)
sft(2, rc)
rr, outr = recipe("resume-zero3-4", 1, zero_stage=3)
shutil.copytree(os.path.join(outc, "checkpoint-2"), os.path.join(outr, "checkpoint-2"))
p = launch(4, ["sft", rr, "--resume", os.path.join(outr, "checkpoint-2"), "--no-progress"])
assert "resumed from" in p.stdout + p.stderr
assert_close(os.path.join(out1, ADAPTER), os.path.join(outr, ADAPTER),
             what="2-rank ZeRO-3 checkpoint resumed on 4 ranks vs uninterrupted 1 process")

# bf16 full fine-tune: the fp32 masters of every rank's parameters go into the checkpoint, so a
# resumed 2-rank run ends exactly where the uninterrupted one does.
rb, outb = recipe("bf16-full-zero3", 2, adapter=None, zero_stage=3, bf16=True, save_strategy="steps", save_steps=2)
sft(2, rb)
rbr, outbr = recipe("bf16-full-zero3-resumed", 2, adapter=None, zero_stage=3, bf16=True)
shutil.copytree(os.path.join(outb, "checkpoint-2"), os.path.join(outbr, "checkpoint-2"))
launch(2, ["sft", rbr, "--resume", os.path.join(outbr, "checkpoint-2"), "--no-progress"])
assert_close(os.path.join(outb, MODEL), os.path.join(outbr, MODEL), rtol=0, atol=0,
             what="bf16 ZeRO-3 full fine-tune resumed from its checkpoint vs uninterrupted (masters restored)")

# SIGKILL of one rank once checkpoint-2 exists; the checkpoint resumes on one process.
rk, outk = recipe("killed-zero3", 2, zero_stage=3, max_steps=400, save_strategy="steps", save_steps=2)
proc = start_launch(2, ["sft", rk, "--no-progress"])
assert wait_for(os.path.join(outk, "checkpoint-2", "trainer_state.json"), proc), f"no checkpoint; rc {proc.poll()}"
workers = children(proc.pid)
assert len(workers) == 2, workers
os.kill(workers[1], signal.SIGKILL)
_, stderr = proc.communicate(timeout=120)
assert proc.returncode == 128 + signal.SIGKILL, (proc.returncode, stderr[-3000:])
rk1, outk1 = recipe("killed-resumed-1", 4, max_steps=STEPS)
shutil.copytree(os.path.join(outk, "checkpoint-2"), os.path.join(outk1, "checkpoint-2"))
run(["sft", rk1, "--resume", os.path.join(outk1, "checkpoint-2"), "--no-progress"])
assert_close(os.path.join(out1, ADAPTER), os.path.join(outk1, ADAPTER),
             what="ZeRO-3 checkpoint of a run whose rank 1 was SIGKILLed, resumed on 1 process")

# ---- 4 ranks x accumulation 1 for every stage, LoRA and full -----------------------------------------
for stage in (0, 1, 2):
    rs, outs = recipe(f"lora-zero{stage}-4", 1, zero_stage=stage)
    sft(4, rs)
    assert_close(os.path.join(out1, ADAPTER), os.path.join(outs, ADAPTER), what=f"ZeRO-{stage} LoRA, 4 ranks vs 1 process")
for stage in (0, 1, 2, 3):
    rs, outs = recipe(f"full-zero{stage}-4", 1, adapter=None, zero_stage=stage)
    sft(4, rs)
    assert_close(os.path.join(outf1, MODEL), os.path.join(outs, MODEL),
                 what=f"ZeRO-{stage} full fine-tune, 4 ranks vs 1 process")

# ---- DDP, tied embeddings, full fine-tune, gradient checkpointing ----------------------------------
rg1, outg1 = recipe("tied-ckpt-single", 4, adapter=None, gradient_checkpointing=True, loss_chunk_tokens=32)
sft(1, rg1)
for stage in (0, 1):
    rg2, outg2 = recipe(f"tied-ckpt-ddp-zero{stage}", 2, adapter=None, gradient_checkpointing=True,
                        loss_chunk_tokens=32, zero_stage=stage)
    sft(2, rg2)
    assert_close(os.path.join(outg1, MODEL), os.path.join(outg2, MODEL),
                 what=f"tied full fine-tune, gradient checkpointing, chunked loss, ZeRO-{stage}/DDP 2 ranks vs 1 process")
print("ok: every ZeRO stage equals one process on 4 ranks (LoRA and full); ZeRO-3 on 2 ranks, resume across world "
      "sizes; DDP tied full FT with recompute")
