#!/usr/bin/env python3
"""Pretraining throughput and model FLOPs utilisation of `llmtune pretrain` for the default model's
shape (recipes/tiny/pretrain.yaml: 6 layers, H 256, 4 heads, I 704, vocab 8000, tied, seq 256,
micro batch 16), against this machine's measured GEMM rate (torch.matmul, same thread count).

MFU = achieved model FLOP/s / measured GEMM FLOP/s, with the model FLOPs per token of a forward +
backward = 6 * (non-embedding params + lm head) + 12 * layers * seq * hidden (attention scores),
the PaLM-paper accounting. Both fp32 (what the CPU recipe trains in) and bf16 GEMM rates are reported.
The corpus is generated (seeded pseudo-words) and a 1000-piece tokenizer trained on it (the model keeps the
default's vocab_size 8000, so the cost is the same), so no data is needed.
  python scripts/bench/pretrain.py --bin build/llmtune [--steps 8] [--threads 2] [--dtypes fp32,bf16] [--small]
Prints one JSON line; the first two logged steps (warm-up) are excluded from tokens/s."""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))


def shape(a):
    if a.small:
        return dict(layers=2, hidden=64, heads=4, intermediate=128, vocab=400, seq=64, batch=4)
    return dict(layers=6, hidden=256, heads=4, intermediate=704, vocab=8000, seq=256, batch=16)


def gemm_rate(dtype_name, m, k, n, threads, seconds=2.0):
    import torch
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype_name)
    a = torch.randn(m, k).to(dt)
    b = torch.randn(k, n).to(dt)
    for _ in range(3):
        a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2.0 * m * k * n * reps / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(SOURCE, "build", "llmtune"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small", action="store_true", help="a smoke-sized model")
    ap.add_argument("--dtypes", default="fp32,bf16", help="training precisions to run (fp32: the recipe's; bf16: bf16: true)")
    a = ap.parse_args()
    s = shape(a)
    work = tempfile.mkdtemp(prefix="llmtune-bench-pretrain-")
    try:
        rng = random.Random(1)
        syl = ["ka", "lo", "ri", "the", "an", "ster", "mo", "ing", "ed", "ar", "el", "on", "is", "tion", "un", "ble"]
        words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 3))) for _ in range(3000)]
        corpus = os.path.join(work, "corpus.txt")
        need_tokens = (a.steps + 2) * s["batch"] * s["seq"] * 2
        with open(corpus, "w") as f:
            n = 0
            while n < need_tokens:
                para = " ".join(rng.choice(words) for _ in range(rng.randint(50, 200)))
                f.write(para + ".\n\n")
                n += len(para.split()) * 2
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
        tok = os.path.join(work, "tok")
        subprocess.run([a.bin, "tokenizer", "train", "--input", corpus, "--vocab-size", str(min(s["vocab"], 1000)), "--out", tok,
                        "--input-sentence-size", "20000"], check=True, capture_output=True, env=env)
        recipe = {"random_init_weights": True, "tokenizer_config": tok,
                  "model_config": {"hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
                                   "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
                                   "tie_word_embeddings": True, "vocab_size": s["vocab"]},
                  "pretraining_dataset": [{"path": corpus, "text_split": "paragraph"}],
                  "sequence_len": s["seq"], "micro_batch_size": s["batch"], "max_steps": a.steps,
                  "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "seed": 1,
                  "output_dir": os.path.join(work, "out"), "dataset_prepared_path": os.path.join(work, "cache")}
        L, C, I, V, T = s["layers"], s["hidden"], s["intermediate"], s["vocab"], s["seq"]
        params_matmul = L * (4 * C * C + 3 * C * I) + V * C  # layers + (tied) lm head
        flops_per_token = 6 * params_matmul + 12 * L * T * C
        m = s["batch"] * T
        fp32 = gemm_rate("float32", m, C, I, a.threads)
        bf16 = gemm_rate("bfloat16", m, C, I, a.threads)
        res = {"shape": s, "threads": a.threads, "model_gflop_per_token": round(flops_per_token / 1e9, 4),
               "gemm_gflops_fp32": round(fp32 / 1e9, 2), "gemm_gflops_bf16": round(bf16 / 1e9, 2)}
        for dtype in a.dtypes.split(","):
            recipe["bf16"] = dtype == "bf16"
            recipe["output_dir"] = os.path.join(work, "out-" + dtype)
            rp = os.path.join(work, f"r-{dtype}.yaml")
            json.dump(recipe, open(rp, "w"))
            subprocess.run([a.bin, "pretrain", rp, "--no-progress"], check=True, capture_output=True, env=env)
            rows = [json.loads(l) for l in open(os.path.join(recipe["output_dir"], "metrics.jsonl")) if l.strip()]
            rates = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 2]
            tps = sorted(rates)[len(rates) // 2]
            achieved = tps * flops_per_token
            res[dtype] = {"tokens_per_s": round(tps, 1), "step_time_s": round(s["batch"] * T / tps, 3),
                          "achieved_gflops": round(achieved / 1e9, 2),
                          "mfu_vs_fp32_gemm": round(achieved / fp32, 3), "mfu_vs_bf16_gemm": round(achieved / bf16, 3),
                          "peak_rss_mib": round(max(r.get("peak_rss_mib", 0) for r in rows)),
                          "one_hour_tokens": int(tps * 3600), "steps_logged": len(rows)}
        print(json.dumps(res))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
