#!/usr/bin/env python3
"""Per-rank peak memory and communication volume of `llmtune launch ... -- sft` under DDP and
ZeRO-1/2/3 on a randomly initialised SmolLM-135M-shaped Llama (full fine-tune, fp32, AdamW), against
the ZeRO paper's model-state formulas adapted to fp32 training (params 4Ψ, grads 4Ψ, AdamW 8Ψ bytes):
  DDP 16Ψ;  ZeRO-1 4Ψ + 4Ψ + 8Ψ/N;  ZeRO-2 4Ψ + (4 + 8)Ψ/N   (per rank, N ranks)
  ZeRO-3 (llmtune shards the decoder layers, Ψ_L; the rest, Ψ_R = embeddings + final norm, stays whole
  with ZeRO-2 treatment): 4Ψ_R + 4Ψ_R (its gradient, whole until reduced) + (4 + 4)Ψ_L/N + 8Ψ/N,
  plus one gathered layer at a time
and the ring volumes per step (bytes a rank sends): all-reduce 2(N-1)/N·4Ψ; ZeRO-1 adds the owners'
broadcast (≈ 4Ψ/N each); ZeRO-2 reduces to owners ((N-1)/N·4Ψ) + broadcast; ZeRO-3 all-gathers each
layer in forward and again in backward and reduces its gradients to owners (3·(N-1)/N·4Ψ_L), plus
ZeRO-2's volume for Ψ_R.
Measured peak = process peak RSS (includes LibTorch, activations, data); the model-state column is
the formula. Usage: dist.py --llmtune build/llmtune [--ranks 1,2,4] [--stages 0,1,2] [--steps 2]
Runs briefly: the machine is shared. Prints a Markdown table (and --json FILE)."""
import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_demo_data import task as last_word_task  # noqa: E402

SMOLLM = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
              tie_word_embeddings=True)


def make_model(dest, demo):
    if os.path.exists(os.path.join(dest, "model.safetensors")):
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM))
    model.save_pretrained(dest, safe_serialization=True)
    for f in os.listdir(demo):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(os.path.join(demo, f), dest)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmtune", default=os.path.join(ROOT, "build", "llmtune"))
    ap.add_argument("--ranks", default="1,2")
    ap.add_argument("--stages", default="0,1,2,3")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(os.environ.get("LLMTUNE_CACHE", os.path.expanduser("~/.cache/llmtune")), "bench-dist"))
    ap.add_argument("--json")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    demo = os.path.join(a.work, "demo")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_demo_model.py"), "--out", demo], check=True,
                   capture_output=True)
    model = os.path.join(a.work, "smollm135m-random")
    make_model(model, demo)
    data = os.path.join(a.work, "train.jsonl")
    with open(data, "w") as f:
        for r in last_word_task(200, seed=1):
            f.write(json.dumps(r) + "\n")
    from safetensors import safe_open
    with safe_open(os.path.join(model, "model.safetensors"), "pt") as f:
        psi = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        psi_l = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.layers."))
    psi_r = psi - psi_l
    rows = []
    port = 29600
    for n in [int(x) for x in a.ranks.split(",")]:
        for stage in [int(x) for x in a.stages.split(",")]:
            if n == 1 and stage > 0:
                continue
            out = os.path.join(a.work, f"out-{n}-{stage}")
            shutil.rmtree(out, ignore_errors=True)
            recipe = {"base_model": model, "datasets": [{"path": data, "type": "chat_template"}],
                      "chat_template": "tokenizer_default", "sequence_len": 64, "micro_batch_size": 1,
                      "gradient_accumulation_steps": 1, "max_steps": a.steps, "learning_rate": 1e-5,
                      "optimizer": "adamw_torch", "output_dir": out, "logging_steps": 1, "val_set_size": 0,
                      "save_strategy": "no", "zero_stage": stage, "bf16": False,
                      "dataset_prepared_path": os.path.join(a.work, "cache")}
            rp = os.path.join(a.work, f"recipe-{n}-{stage}.yaml")
            json.dump(recipe, open(rp, "w"))
            port += 1
            env = dict(os.environ, OMP_NUM_THREADS="1")
            p = subprocess.run([a.llmtune, "launch", "--nproc-per-node", str(n), "--master-port", str(port), "--",
                                "sft", rp, "--no-progress"], capture_output=True, text=True, env=env, timeout=3600)
            if p.returncode != 0:
                sys.exit(f"run N={n} stage={stage} failed:\n{p.stderr[-3000:]}")
            ranks = {}
            for m in re.finditer(r"dist: rank (\d+) summary: peak_rss_mib ([\d.]+), collectives_sent_mib ([\d.]+), "
                                 r"steps (\d+)", p.stderr):
                ranks[int(m[1])] = (float(m[2]), float(m[3]), int(m[4]))
            if not ranks:  # one process: no process group; the loop logs peak RSS itself
                last = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][-1]
                ranks[0] = (last["peak_rss_mib"], 0.0, a.steps)
            states = {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n,
                      3: 8 * psi_r + 8 * psi_l / n + 8 * psi / n}[stage]
            ring = 2 * (n - 1) / n * 4 * psi if n > 1 else 0
            comm = {0: ring, 1: ring + 4 * psi / n, 2: (n - 1) / n * 4 * psi + 4 * psi / n,
                    3: 3 * (n - 1) / n * 4 * psi_l + (n - 1) / n * 4 * psi_r + 4 * psi_r / n}[stage] if n > 1 else 0
            for r, (peak, sent, steps) in sorted(ranks.items()):
                rows.append({"ranks": n, "stage": stage, "rank": r, "peak_rss_mib": peak,
                             "model_states_predicted_mib": states / 2**20, "sent_mib_per_step": sent / max(steps, 1),
                             "predicted_sent_mib_per_step": comm / 2**20})
            print(f"N={n} ZeRO-{stage}: done", file=sys.stderr)
    print(f"Ψ = {psi/1e6:.1f} M parameters (SmolLM-135M shape, fp32), Ψ_L = {psi_l/1e6:.1f} M in the decoder layers\n")
    print("| ranks | mode | rank | peak RSS MiB | model states (formula) MiB | sent MiB/step | predicted MiB/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        mode = "DDP" if r["stage"] == 0 else f"ZeRO-{r['stage']}"
        print(f"| {r['ranks']} | {mode} | {r['rank']} | {r['peak_rss_mib']:.0f} | {r['model_states_predicted_mib']:.0f} "
              f"| {r['sent_mib_per_step']:.0f} | {r['predicted_sent_mib_per_step']:.0f} |")
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
