"""Resume exactness under SIGKILL: `llmtune sft` with save_steps 5 is killed with SIGKILL as soon
as a checkpoint appears, resumed with `--resume auto`, and its final adapter_model.safetensors must
equal, byte for byte, the one of an uninterrupted run with the same seed."""
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import FIXTURES, base_recipe, demo_model, last_word_task, run, write_jsonl, write_recipe  # noqa
from common import BIN  # noqa: E402,I001

work = os.path.join(FIXTURES, "sft-resume")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
base = demo_model()
train = os.path.join(work, "train.jsonl")
write_jsonl(train, last_word_task(800, seed=3))
STEPS = 60


def recipe(name):
    out = os.path.join(work, name)
    return write_recipe(os.path.join(work, name + ".yaml"), base_recipe(
        base, train, out, max_steps=STEPS, save_strategy="steps", save_steps=5, save_total_limit=2,
        lr_scheduler="cosine", warmup_steps=5, learning_rate=2e-3, lora_dropout=0.1)), out


# Uninterrupted reference.
ra, out_a = recipe("a")
t0 = time.time()
run(["sft", ra, "--no-progress"])
print(f"uninterrupted run: {time.time() - t0:.1f}s")

# Killed run: SIGKILL right after the first complete checkpoint shows up.
rb, out_b = recipe("b")
p = subprocess.Popen([BIN, "sft", rb, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
deadline = time.time() + 300
killed_at = None
while time.time() < deadline and p.poll() is None:
    if os.path.isdir(out_b):
        ck = [d for d in os.listdir(out_b) if d.startswith("checkpoint-") and d[11:].isdigit()]
        if ck:
            p.send_signal(signal.SIGKILL)
            killed_at = sorted(ck, key=lambda d: int(d[11:]))[-1]
            break
    time.sleep(0.02)
p.wait()
assert killed_at is not None and p.returncode == -signal.SIGKILL, \
    f"the run ended (rc {p.returncode}) before it could be killed; stderr:\n{p.stderr.read().decode()[-2000:]}"
assert not os.path.exists(os.path.join(out_b, "adapter_model.safetensors")), "final adapter written before the kill"
print(f"killed after {killed_at} appeared")
r = run(["sft", rb, "--resume", "auto", "--no-progress"])
assert "resumed from" in r.stderr + r.stdout, r.stderr
a = open(os.path.join(out_a, "adapter_model.safetensors"), "rb").read()
b = open(os.path.join(out_b, "adapter_model.safetensors"), "rb").read()
assert a == b, "resumed adapter differs from the uninterrupted run"
print("ok: resumed adapter is bitwise identical to the uninterrupted run")
