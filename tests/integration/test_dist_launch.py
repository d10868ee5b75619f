"""`llmtune launch` failure handling and resume: SIGKILL of one rank stops the other and the
launcher exits non-zero naming the dead rank with its last lines; the run then resumes from its
(unsharded, ZeRO-1) checkpoint at a different world size (1 process) and ends where an
uninterrupted 1-process run ends; SIGINT to the launcher is forwarded and every rank stops at the
same step with a checkpoint; a rendezvous missing a rank fails naming it; bad launcher arguments."""
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from dist_common import (BIN, FIXTURES, assert_close, base_recipe, children, demo_model, last_word_task, launch,  # noqa
                         port, run, start_launch, wait_for, worker_env, write_jsonl, write_recipe)

work = os.path.join(FIXTURES, "dist-launch")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
train = os.path.join(work, "train.jsonl")
write_jsonl(train, last_word_task(3000, seed=8))
ADAPTER = "adapter_model.safetensors"


def recipe(name, accum, **kw):
    # adam_epsilon 1e-6 (not 1e-8): the runs compared below differ only in the fp32 summation order of
    # their gradients (2 ranks vs accumulation), and AdamW turns that rounding into a large change of
    # an element whose gradient is itself at the 1e-8 scale (at step 2 the LoRA A gradients still are,
    # B having moved once): with eps 1e-8 the max difference after 6 steps ranged 1e-6 to 1.5e-5 over
    # data seeds, one element of one tensor, while every other tensor agreed to 1e-6.
    out = os.path.join(work, name)
    r = base_recipe(base, train, out, micro_batch_size=4, gradient_accumulation_steps=accum, lora_dropout=0.0,
                    learning_rate=5e-3, adam_epsilon=1e-6, **kw)
    return write_recipe(os.path.join(work, name + ".yaml"), r), out


def start(rec, extra=()):
    return start_launch(2, ["sft", rec, "--no-progress"], extra)


# ---- reference: one process, 6 steps of 16 rows (constant lr, so run length does not matter) ----
ref, out_ref = recipe("reference", 4, max_steps=6)
run(["sft", ref, "--no-progress"])

# ---- SIGKILL one rank of a long ZeRO-1 run once checkpoint-2 exists ------------------------------
long_rec, out_long = recipe("killed", 2, max_steps=400, zero_stage=1, save_strategy="steps", save_steps=2)
p = start(long_rec, extra=["--log-dir", os.path.join(work, "logs")])
ok = wait_for(os.path.join(out_long, "checkpoint-2", "trainer_state.json"), p)
assert ok, f"no checkpoint appeared; launcher rc {p.poll()}"
workers = children(p.pid)
assert len(workers) == 2, workers
os.kill(workers[1], signal.SIGKILL)
t0 = time.time()
stdout, stderr = p.communicate(timeout=120)
print(f"launcher ended {time.time() - t0:.1f}s after the kill")
assert p.returncode == 128 + signal.SIGKILL, (p.returncode, stderr[-3000:])
assert "worker rank 1 (local rank 1" in stderr and "was killed by signal 9" in stderr, stderr[-3000:]
assert "Its last" in stderr and "  | " in stderr, stderr[-3000:]
assert "[rank 1] dist: rank 1 of 2 joined" in stderr
assert os.path.exists(os.path.join(work, "logs", "rank-0.log")) and os.path.exists(os.path.join(work, "logs", "rank-1.log"))
for w in workers:  # both workers are gone
    assert not os.path.exists(f"/proc/{w}") or open(f"/proc/{w}/stat").read().split()[2] == "Z"
assert not os.path.exists(os.path.join(out_long, ADAPTER))

# Resume the 2-rank checkpoint on 1 process (accumulation 4 keeps the global batch) up to step 6.
res, out_res = recipe("resumed", 4, max_steps=6)
shutil.copytree(os.path.join(out_long, "checkpoint-2"), os.path.join(out_res, "checkpoint-2"))
r = run(["sft", res, "--resume", os.path.join(out_res, "checkpoint-2"), "--no-progress"])
assert "resumed from" in r.stderr + r.stdout
assert_close(os.path.join(out_ref, ADAPTER), os.path.join(out_res, ADAPTER),
             what="2-rank ZeRO-1 checkpoint resumed on 1 process vs uninterrupted 1 process")

# ---- SIGINT to the launcher: forwarded; both ranks stop at the same step, checkpoint written --------
int_rec, out_int = recipe("interrupted", 1, max_steps=400, save_strategy="no")
p = start(int_rec)
assert wait_for(os.path.join(out_int, "metrics.jsonl"), p), "training did not start"
time.sleep(0.5)
p.send_signal(signal.SIGINT)
stdout, stderr = p.communicate(timeout=120)
assert p.returncode == 0, (p.returncode, stderr[-3000:])
assert "forwarding" in stderr and "stopping at step" in stderr + stdout, stderr[-3000:]
cks = [d for d in os.listdir(out_int) if d.startswith("checkpoint-")]
assert len(cks) == 1 and os.path.exists(os.path.join(out_int, ADAPTER)), cks
print(f"ok: SIGINT stopped both ranks at {cks[0]}")

# ---- a rendezvous missing rank 1 names it --------------------------------------------------------
p = subprocess.run([BIN, "sft", ref, "--no-progress"], capture_output=True, text=True, timeout=120,
                   env=worker_env({"RANK": 0, "WORLD_SIZE": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port(),
                                   "LLMTUNE_RDZV_TIMEOUT": 2}))
assert p.returncode != 0 and "missing rank(s): 1" in p.stderr and "1 of 2 ranks arrived" in p.stderr, p.stderr[-2000:]
assert "Traceback" not in p.stderr and "c10::Error" not in p.stderr

# ---- launcher argument errors -------------------------------------------------------------------
p = subprocess.run([BIN, "launch", "--nproc-per-node", "2", "--nnodes", "2", "--node-rank", "2", "--", "sft", ref],
                   capture_output=True, text=True, timeout=60)
assert p.returncode != 0 and "--node-rank 2 is outside 0..1" in p.stderr, p.stderr
p = subprocess.run([BIN, "launch", "--nproc-per-node", "2", "--master-port", str(port()), "--", "no-such-command"],
                   capture_output=True, text=True, timeout=60, env=worker_env({}))
assert p.returncode != 0 and "worker rank" in p.stderr, p.stderr
print("ok: launcher failure handling, resume at another world size, SIGINT, rendezvous timeout")
