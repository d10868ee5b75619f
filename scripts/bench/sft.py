#!/usr/bin/env python3
"""LoRA SFT benchmark: `llmtune sft` vs transformers + peft (plain PyTorch loop) on the same model,
data and hyperparameters, in one run. Prints tokens/s and peak RSS for each.

Default shape is SmolLM-135M (30 layers, H 576, 9 heads / 3 KV heads, I 1536, vocab 49152, tied),
random weights, bf16 base weights with fp32 LoRA adapters (r 16, alpha 32, all linears), AdamW
lr 2e-4, micro batch 1 x 512 tokens (every token trained: completion data truncated to 512).
The tokenizer is the demo model's (ids < 512, a subset of the vocab; speed does not depend on it).
Each side runs in its own process with the same thread count; the first step (warm-up) is excluded.
With --repeats N the two sides alternate N times and the median of the per-pair ratios is reported,
so load from other processes on this shared machine hits both sides alike.
  python scripts/bench/sft.py --bin build/llmtune [--steps 10] [--threads 2] [--repeats 3] [--small]
  python scripts/bench/sft.py --chunk-sweep [--micro-batch 4]   # llmtune only: peak RSS vs loss_chunk_tokens
--small: 2 layers, H 64, 4/2 heads, I 128, vocab 1024, seq 64 (a smoke run).
--with-sdpa: also run llmtune with LLMTUNE_ATTENTION=sdpa (LibTorch's flash attention instead of llmtune's
blocked causal attention), to show what the latter buys on CPUs with native bf16.
--with-native: also run llmtune with LLMTUNE_HALF_MATMUL=native (LibTorch's own bf16 GEMMs), to show
what computing bf16 products in fp32 buys on a CPU without AVX512_BF16/AMX (README: "Half-precision
products on the CPU"). The header line says whether this CPU has native bf16.
"""
import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.dirname(os.path.dirname(HERE))


def model_shape(small):
    """SmolLM-135M's dimensions (or the --small smoke shape); shared by the other benchmarks."""
    if small:
        return dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=1024)
    return dict(layers=30, hidden=576, heads=9, kv_heads=3, intermediate=1536, vocab=49152)


def shape(a):
    return dict(model_shape(a.small), seq=64 if a.small else a.seq)


def make_model(s, work):
    """A random bf16 Llama of shape `s` saved by transformers in work/model, with the demo model's
    tokenizer files (made in work/demo). Returns (model_dir, demo_dir); reused when present."""
    model_dir = os.path.join(work, "model")
    demo = os.path.join(work, "demo")
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "make_demo_model.py"), "--out", demo],
                   check=True, capture_output=True)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                          num_key_value_heads=s["kv_heads"], rope_theta=100000.0, tie_word_embeddings=True,
                          rms_norm_eps=1e-5, max_position_embeddings=8192, bos_token_id=0, eos_token_id=2,
                          pad_token_id=0)
        LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
            if os.path.exists(os.path.join(demo, f)):
                shutil.copy(os.path.join(demo, f), model_dir)
    return model_dir, demo


def make_assets(a, work):
    """Random model (saved by transformers) + demo tokenizer files + completion JSONL."""
    s = shape(a)
    model_dir, demo = make_model(s, work)
    rng = random.Random(0)
    words = open(os.path.join(demo, "corpus.txt")).read().split()
    data = os.path.join(work, f"data-{a.steps}.jsonl")
    n = a.steps + 2
    # Every row is one full sequence on both sides: words are added while BOS + text + EOS still
    # fits in seq tokens (llmtune's completion format would split a longer text into several
    # examples, transformers truncates it; either way the two sides would see different rows).
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(data, "w") as f:
        for _ in range(n):
            text = []
            while True:
                candidate = text + [rng.choice(words)]
                if len(tok(" ".join(candidate), add_special_tokens=True).input_ids) + 1 > s["seq"]:
                    break
                text = candidate
            f.write(json.dumps({"text": " ".join(text)}) + "\n")
    return model_dir, data


def hp(a):
    return dict(r=16, alpha=32, lr=2e-4, seq=shape(a)["seq"])


def hf_worker(a, model_dir, data):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(a.threads)
    h = hp(a)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=h["r"], lora_alpha=h["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=h["lr"], weight_decay=0.0)
    rows = [json.loads(l)["text"] for l in open(data)]
    times, tokens = [], 0
    model.train()
    for step in range(a.steps):
        ids = tok(rows[step], return_tensors="pt", add_special_tokens=True).input_ids[:, :h["seq"]]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t0)
            tokens += ids.numel()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"impl": "transformers+peft", "tokens_per_s": tokens / sum(times) if times else 0,
                      "peak_rss_bytes": rss, "last_loss": float(loss)}))


def llmtune_run(a, model_dir, data, work, loss_chunk=None, extra_env=None):
    h = hp(a)
    out = os.path.join(work, "llmtune-out")
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"base_model": model_dir, "datasets": [{"path": data, "type": "completion"}],
              "sequence_len": h["seq"], "excess_length_strategy": "truncate", "sample_packing": False,
              "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": a.steps,
              "learning_rate": h["lr"], "lr_scheduler": "constant", "optimizer": "adamw_torch", "weight_decay": 0.0,
              "adapter": "lora", "lora_r": h["r"], "lora_alpha": h["alpha"], "lora_target_linear": True,
              "bf16": True, "output_dir": out, "logging_steps": 1, "save_strategy": "no", "val_set_size": 0,
              "dataset_prepared_path": os.path.join(work, "cache"), "seed": 0}
    if loss_chunk:
        recipe["loss_chunk_tokens"] = loss_chunk
    if a.micro_batch > 1:
        recipe["micro_batch_size"] = a.micro_batch
    rpath = os.path.join(work, "bench.yaml")
    json.dump(recipe, open(rpath, "w"))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    env.update(extra_env or {})
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", a.bin, "sft", rpath, "--no-progress"], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"llmtune sft failed:\n{p.stderr[-3000:]}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    m = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    m = [x for x in m if "tokens_per_s" in x]
    steady = m[1:] or m  # drop the warm-up step
    tps = sum(x["tokens_per_s"] for x in steady) / len(steady)
    return {"impl": "llmtune", "tokens_per_s": tps, "peak_rss_bytes": rss, "last_loss": m[-1]["loss"],
            "wall_s": time.time() - t0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("LLMTUNE_BIN", os.path.join(SOURCE, "build", "llmtune")))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeats", type=int, default=1, help="alternate the two sides this many times")
    ap.add_argument("--micro-batch", type=int, default=1, help="llmtune micro batch (chunk sweep)")
    ap.add_argument("--chunk-sweep", action="store_true",
                    help="llmtune only: peak RSS and tokens/s for loss_chunk_tokens = B*T (one chunk), 1024, 256")
    ap.add_argument("--work", default=os.path.join(os.environ.get("LLMTUNE_CACHE", os.path.expanduser("~/.cache/llmtune")),
                                                  "bench-sft"))
    ap.add_argument("--with-native", action="store_true", help="also run llmtune with LLMTUNE_HALF_MATMUL=native")
    ap.add_argument("--with-sdpa", action="store_true",
                    help="also run llmtune with LLMTUNE_ATTENTION=sdpa (LibTorch's flash attention)")
    ap.add_argument("--hf-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = os.path.join(a.work, "small" if a.small else f"smollm-{a.seq}")
    os.makedirs(work, exist_ok=True)
    model_dir, data = make_assets(a, work)
    if a.hf_worker:
        return hf_worker(a, model_dir, data)
    s = shape(a)
    if a.chunk_sweep:
        bt = a.micro_batch * s["seq"]
        print(f"loss chunking, {s['layers']} layers H {s['hidden']} vocab {s['vocab']}, micro batch "
              f"{a.micro_batch} x seq {s['seq']}, bf16 LoRA r 16, {a.steps} steps")
        print(f"{'loss_chunk_tokens':<20}{'tokens/s':>12}{'peak RSS MiB':>15}")
        for chunk in [bt, 1024, 256]:
            r = llmtune_run(a, model_dir, data, work, loss_chunk=chunk)
            print(f"{chunk:<20}{r['tokens_per_s']:>12.1f}{r['peak_rss_bytes'] / 2**20:>15.0f}", flush=True)
        return
    cmd = [sys.executable, __file__, "--hf-worker", "--steps", str(a.steps), "--threads", str(a.threads),
           "--seq", str(a.seq), "--work", a.work] + (["--small"] if a.small else [])
    runs = {"llmtune": [], "transformers+peft": []}
    if a.with_native:
        runs["llmtune (native bf16)"] = []
    if a.with_sdpa:
        runs["llmtune (sdpa attention)"] = []
    for _ in range(a.repeats):
        runs["llmtune"].append(llmtune_run(a, model_dir, data, work))
        if a.with_native:
            runs["llmtune (native bf16)"].append(
                llmtune_run(a, model_dir, data, work, extra_env={"LLMTUNE_HALF_MATMUL": "native"}))
        if a.with_sdpa:
            runs["llmtune (sdpa attention)"].append(
                llmtune_run(a, model_dir, data, work, extra_env={"LLMTUNE_ATTENTION": "sdpa"}))
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
        if p.returncode != 0:
            sys.exit(f"transformers worker failed:\n{p.stderr[-3000:]}")
        runs["transformers+peft"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    ratios = sorted(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs["llmtune"], runs["transformers+peft"]))
    flags = open("/proc/cpuinfo").read()
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    print(f"CPU: {'has' if native else 'has no'} native bf16 (avx512_bf16/amx_bf16) -> llmtune computes bf16 products "
          f"{'natively' if native else 'in fp32'}")
    print(f"LoRA SFT, {s['layers']} layers H {s['hidden']} vocab {s['vocab']}, seq {s['seq']}, bf16, r 16, "
          f"{a.steps} steps (first excluded), {a.threads} threads, {a.repeats} alternating repeat(s)")
    print(f"{'impl':<24}{'tokens/s (median)':>19}{'peak RSS MiB':>15}{'last loss':>12}")
    for name, rs in runs.items():
        med = sorted(r["tokens_per_s"] for r in rs)[len(rs) // 2]
        rss = max(r["peak_rss_bytes"] for r in rs)
        print(f"{name:<24}{med:>19.1f}{rss / 2**20:>15.0f}{rs[-1]['last_loss']:>12.4f}")
    rss_ratio = max(r["peak_rss_bytes"] for r in runs["llmtune"]) / max(r["peak_rss_bytes"] for r in runs["transformers+peft"])
    print(f"llmtune / transformers+peft: tokens/s x{ratios[len(ratios) // 2]:.2f} (per-pair ratios "
          f"{', '.join(f'{r:.2f}' for r in ratios)}), peak RSS x{rss_ratio:.2f}")

if __name__ == "__main__":
    main()
