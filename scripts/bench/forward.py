#!/usr/bin/env python3
"""Forward-pass benchmark: llmtune (bench/forward_bench) vs transformers on the same model shape.

Default shape is SmolLM-135M (30 layers, H 576, 9 heads / 3 KV heads, I 1536, vocab 49152, tied,
theta 1e5), random weights, batch 1 x 512 tokens, full logits, no grad, fp32 and bf16. Each side
runs in its own process (so peak RSS is its own) with the same thread count. Prints a table.
  python scripts/bench/forward.py --bin build/forward_bench [--threads 2] [--seq 512] [--iters 3]
Tiny smoke run: --layers 2 --hidden 64 --heads 4 --kv-heads 2 --intermediate 128 --vocab 512 --seq 64
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPE_KEYS = ["layers", "hidden", "heads", "kv_heads", "intermediate", "vocab"]


def hf_worker(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(a.threads)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      rope_theta=100000.0, tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
        t0 = time.perf_counter()
        for _ in range(a.iters):
            model(input_ids=ids, use_cache=False)
        dt = (time.perf_counter() - t0) / a.iters
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "transformers", "dtype": a.dtype, "seconds": dt, "tokens_per_s": a.batch * a.seq / dt,
                      "peak_rss_bytes": rss, "threads": torch.get_num_threads()}))


def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
    return json.loads(out[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("LLMTUNE_BENCH_BIN", "build/forward_bench"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", dest="kv_heads", type=int, default=3)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker == "hf":
        return hf_worker(a)
    common = ["--seq", str(a.seq), "--batch", str(a.batch), "--iters", str(a.iters), "--threads", str(a.threads)]
    shape = []
    for k in SHAPE_KEYS:
        shape += ["--" + k.replace("_", "-"), str(getattr(a, k))]
    rows = []
    for dt in a.dtypes.split(","):
        ours = run([a.bin, "--dtype", dt] + common + shape)
        ref = run([sys.executable, __file__, "--worker", "hf", "--dtype", dt] + common + shape)
        rows.append((dt, ours, ref))
    print(f"forward, batch {a.batch} x {a.seq} tokens, {a.threads} threads, {a.layers} layers H{a.hidden}")
    print(f"{'dtype':<10}{'llmtune tok/s':>15}{'HF tok/s':>12}{'speedup':>9}{'llmtune RSS':>13}{'HF RSS':>10}")
    for dt, o, r in rows:
        print(f"{dt:<10}{o['tokens_per_s']:>15.1f}{r['tokens_per_s']:>12.1f}{o['tokens_per_s'] / r['tokens_per_s']:>8.2f}x"
              f"{o['peak_rss_bytes'] / 2**20:>11.0f}MB{r['peak_rss_bytes'] / 2**20:>8.0f}MB")


if __name__ == "__main__":
    main()
