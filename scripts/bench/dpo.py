#!/usr/bin/env python3
"""LoRA DPO benchmark: `llmtune dpo` vs TRL's DPOTrainer with peft on the same model, data and settings,
in one run. Prints tokens/s (prompt + completion tokens of chosen and rejected, per second of training
step, first step excluded) and peak RSS for each.

Default shape is SmolLM-135M (30 layers, H 576, 9 heads / 3 KV heads, I 1536, vocab 49152, tied), random
weights in bf16, fp32 LoRA r 16 / alpha 32 on all linears, sigmoid DPO beta 0.1, AdamW lr 1e-5, 1 pair
per step, prompts of ~64 tokens and completions of ~128 tokens (strings, EOS appended by both). The
reference is the base with the adapter off on both sides (no second model). The tokenizer is the demo
model's (speed does not depend on it). Each side runs in its own process with the same thread count;
--repeats N alternates the sides N times and reports the median per-pair ratio.
  python scripts/bench/dpo.py --bin build/llmtune [--steps 8] [--threads 2] [--repeats 1] [--small]
--small: 2 layers, H 64, 4/2 heads, I 128, vocab 1024 (a smoke run). Needs trl==1.16.0 in the venv.
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
sys.path.insert(0, HERE)
import sft as base_bench  # noqa: E402  (make_model, model_shape)


def shape(a):
    return base_bench.model_shape(a.small)


def make_assets(a, work):
    model_dir, demo = base_bench.make_model(shape(a), work)
    rng = random.Random(0)
    words = open(os.path.join(demo, "corpus.txt")).read().split()
    data = os.path.join(work, "pairs.jsonl")
    with open(data, "w") as f:
        for _ in range(a.steps + 2):
            p = " ".join(rng.choice(words) for _ in range(a.prompt_words))
            c = " " + " ".join(rng.choice(words) for _ in range(a.completion_words))
            r = " " + " ".join(rng.choice(words) for _ in range(a.completion_words))
            f.write(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n")
    return model_dir, data


def trl_worker(a, model_dir, data):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    ds = load_dataset("json", data_files=data, split="train")
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    cfg = DPOConfig(output_dir=os.path.join(os.path.dirname(data), "trl-out"), per_device_train_batch_size=1,
                    gradient_accumulation_steps=1, max_steps=a.steps, learning_rate=1e-5, lr_scheduler_type="cosine",
                    warmup_steps=0.1,  # transformers 5: a float < 1 is a ratio (warmup_ratio is gone)
                    beta=0.1, loss_type="sigmoid", logging_steps=1, save_strategy="no", report_to=[],
                    bf16=False, use_cpu=True, seed=0, max_length=1024, dataloader_num_workers=0,
                    remove_unused_columns=False)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[Timer()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    trainer.train()
    # Tokens per step: chosen + rejected rows as llmtune counts them (prompt + completion, no padding).
    n_tok = []
    for ex in trainer.train_dataset.select(range(a.steps)):
        p = len(ex["prompt_ids"]) if "prompt_ids" in ex else len(tok(ex["prompt"])["input_ids"])
        c = len(ex["chosen_ids"]) if "chosen_ids" in ex else len(tok(ex["chosen"])["input_ids"]) + 1
        r = len(ex["rejected_ids"]) if "rejected_ids" in ex else len(tok(ex["rejected"])["input_ids"]) + 1
        n_tok.append(2 * p + c + r)
    steady = times[1:] or times
    tps = sum(n_tok[1:len(times)]) / sum(steady) if steady else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(json.dumps({"impl": "trl DPOTrainer+peft", "tokens_per_s": tps, "peak_rss_bytes": rss,
                      "last_loss": loss[-1] if loss else float("nan")}))


def llmtune_run(a, model_dir, data, work):
    out = os.path.join(work, "llmtune-out")
    shutil.rmtree(out, ignore_errors=True)
    recipe = {"base_model": model_dir, "rl": "dpo", "rl_beta": 0.1, "datasets": [{"path": data}],
              "sequence_len": 1024, "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": a.steps,
              "learning_rate": 1e-5, "lr_scheduler": "cosine", "warmup_ratio": 0.1, "optimizer": "adamw_torch",
              "adapter": "lora", "lora_r": 16, "lora_alpha": 32, "lora_target_linear": True, "bf16": True,
              "output_dir": out, "logging_steps": 1, "save_strategy": "no", "seed": 0}
    rpath = os.path.join(work, "bench.yaml")
    json.dump(recipe, open(rpath, "w"))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(["/usr/bin/time", "-f", "%M", a.bin, "dpo", rpath, "--no-progress"], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"llmtune dpo failed:\n{p.stderr[-3000:]}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    m = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    m = [x for x in m if "tokens_per_s" in x]
    steady = m[1:] or m
    tps = sum(x["tokens_per_s"] for x in steady) / len(steady)
    return {"impl": "llmtune", "tokens_per_s": tps, "peak_rss_bytes": rss, "last_loss": m[-1]["loss"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("LLMTUNE_BIN", os.path.join(SOURCE, "build", "llmtune")))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=32)
    ap.add_argument("--completion-words", type=int, default=64)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default=os.path.join(os.environ.get("LLMTUNE_CACHE", os.path.expanduser("~/.cache/llmtune")),
                                                  "bench-dpo"))
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = os.path.join(a.work, "small" if a.small else "smollm")
    os.makedirs(work, exist_ok=True)
    model_dir, data = make_assets(a, work)
    if a.trl_worker:
        return trl_worker(a, model_dir, data)
    s = shape(a)
    cmd = [sys.executable, __file__, "--trl-worker", "--steps", str(a.steps), "--threads", str(a.threads),
           "--prompt-words", str(a.prompt_words), "--completion-words", str(a.completion_words),
           "--work", a.work] + (["--small"] if a.small else [])
    runs = {"llmtune": [], "trl DPOTrainer+peft": []}
    for _ in range(a.repeats):
        runs["llmtune"].append(llmtune_run(a, model_dir, data, work))
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(a.threads)))
        if p.returncode != 0:
            sys.exit(f"TRL worker failed:\n{p.stderr[-3000:]}")
        runs["trl DPOTrainer+peft"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    ratios = sorted(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(*runs.values()))
    print(f"LoRA DPO (sigmoid, beta 0.1), {s['layers']} layers H {s['hidden']} vocab {s['vocab']}, bf16 base, r 16, "
          f"1 pair/step, {a.steps} steps (first excluded), {a.threads} threads, {a.repeats} repeat(s)")
    print(f"{'impl':<22}{'tokens/s (median)':>19}{'peak RSS MiB':>15}{'last loss':>12}")
    for name, rs in runs.items():
        med = sorted(r["tokens_per_s"] for r in rs)[len(rs) // 2]
        rss = max(r["peak_rss_bytes"] for r in rs)
        print(f"{name:<22}{med:>19.1f}{rss / 2**20:>15.0f}{rs[-1]['last_loss']:>12.4f}")
    rss_ratio = max(r["peak_rss_bytes"] for r in runs["llmtune"]) / max(r["peak_rss_bytes"] for r in runs["trl DPOTrainer+peft"])
    print(f"llmtune / trl: tokens/s x{ratios[len(ratios) // 2]:.2f}, peak RSS x{rss_ratio:.2f}")


if __name__ == "__main__":
    main()
