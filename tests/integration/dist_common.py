"""Shared helpers for the multi-process tests: recipes on the demo model, launching ranks through
`llmtune launch` or by hand (torchrun / Slurm environments), and comparing saved tensors."""
import os
import random
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import FIXTURES, base_recipe, demo_model, last_word_task, metrics, run, write_jsonl, write_recipe  # noqa
from common import BIN  # noqa: E402,I001

_port = [random.Random(os.getpid()).randrange(21000, 29000)]


def port():
    _port[0] += 1
    return _port[0]


def worker_env(extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("SLURM_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(nproc, args, check=True, extra=()):
    """`llmtune launch --nproc-per-node N -- args` (a free port each time)."""
    cmd = [BIN, "launch", "--nproc-per-node", str(nproc), "--master-port", str(port()), *extra, "--", *map(str, args)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=worker_env({}))
    if check and p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return p


def start_launch(nproc, args, extra=()):
    """`llmtune launch` in the background (for tests that signal it or its workers)."""
    cmd = [BIN, "launch", "--nproc-per-node", str(nproc), "--master-port", str(port()), *extra, "--",
           *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env({}))


def children(pid):
    """The launcher's worker processes."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def wait_for(path, proc, seconds=300):
    """True once `path` exists, False if `proc` ended or time ran out first."""
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


def run_ranks(envs, args):
    """Starts one `llmtune args` per env dict (as torchrun or srun would) and waits for all."""
    procs = [subprocess.Popen([BIN, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=worker_env(e)) for e in envs]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        if p.returncode != 0:
            sys.exit(f"worker failed ({p.returncode}):\n{o[-3000:]}\n{e[-3000:]}")
    return outs


def load(path):
    from safetensors.torch import load_file
    return load_file(path)


def assert_close(a_path, b_path, rtol=1e-4, atol=1e-5, what=""):
    """Every tensor of two safetensors files equal within fp32 tolerance (and not trivially equal to
    an untrained start: callers compare runs that trained)."""
    import torch
    a, b = load(a_path), load(b_path)
    assert sorted(a) == sorted(b), f"{what}: tensor names differ"
    worst = 0.0
    for k in a:
        d = (a[k].float() - b[k].float()).abs().max().item()
        worst = max(worst, d)
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol), f"{what}: {k} differs by {d}"
    print(f"ok: {what} (max abs diff {worst:.2e})")
    return worst
