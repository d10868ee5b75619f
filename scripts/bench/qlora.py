#!/usr/bin/env python3
"""QLoRA benchmark (not a test): `llmtune sft` with `adapter: qlora` (NF4 + double quant, bf16
compute) against bf16 LoRA on the same SmolLM-135M-shaped random model, data and hyperparameters
(scripts/bench/sft.py's setup: r 16, all linears, micro batch 1 x seq tokens). Reports, as ratios:
  base-weight memory  bytes held by the quantized linears / the same linears in bf16 (target <= 0.3)
  step time           QLoRA seconds per step / bf16 LoRA seconds per step (target <= 1.3)
  peak RSS            of each run
and, when bitsandbytes runs on this CPU, transformers + peft + bitsandbytes QLoRA tokens/s.
Runs alternate (--repeats) so load from other processes hits both alike; keep it short on shared
machines:  python scripts/bench/qlora.py --bin build/llmtune --steps 6 --seq 256 [--small] [--hf]"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sft as base_bench  # noqa: E402  (make_assets, shape, hp)


def run_llmtune(a, model_dir, data, work, qlora):
    h = base_bench.hp(a)
    out = os.path.join(work, "out-qlora" if qlora else "out-lora")
    shutil.rmtree(out, ignore_errors=True)
    r = {"base_model": model_dir, "datasets": [{"path": data, "type": "completion"}], "sequence_len": h["seq"],
         "excess_length_strategy": "truncate", "sample_packing": False, "micro_batch_size": 1,
         "max_steps": a.steps, "learning_rate": h["lr"], "lr_scheduler": "constant", "optimizer": "adamw_torch",
         "adapter": "lora", "lora_r": h["r"], "lora_alpha": h["alpha"], "lora_target_linear": True, "bf16": True,
         "output_dir": out, "logging_steps": 1, "save_strategy": "no", "val_set_size": 0,
         "dataset_prepared_path": os.path.join(work, "cache"), "seed": 0}
    if qlora:
        r.update(adapter="qlora", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype="bfloat16")
    path = os.path.join(work, "qlora.yaml" if qlora else "lora.yaml")
    json.dump(r, open(path, "w"))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(["/usr/bin/time", "-f", "%M", a.bin, "sft", path, "--no-progress"], capture_output=True,
                       text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"llmtune sft failed:\n{p.stderr[-3000:]}")
    rss = int(p.stderr.strip().splitlines()[-1]) * 1024
    m = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]
    m = [x for x in m if "tokens_per_s" in x][1:]  # drop the warm-up step
    tps = statistics.median(x["tokens_per_s"] for x in m)
    mib = re.search(r"quantized weights hold ([0-9.]+) MiB", p.stderr)
    return {"tokens_per_s": tps, "peak_rss_bytes": rss, "quant_mib": float(mib.group(1)) if mib else None}


def hf_qlora(a, model_dir, data):
    """transformers + peft + bitsandbytes QLoRA on the CPU (tokens/s), or the reason it cannot run."""
    code = f"""
import json, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from peft import LoraConfig, get_peft_model
torch.set_num_threads({a.threads})
tok = AutoTokenizer.from_pretrained({model_dir!r})
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
m = AutoModelForCausalLM.from_pretrained({model_dir!r}, quantization_config=q, dtype=torch.bfloat16, device_map="cpu")
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-4)
rows = [json.loads(l)["text"] for l in open({data!r})]
t, n = [], 0
for s in range({a.steps}):
    ids = tok(rows[s], return_tensors="pt").input_ids[:, :{base_bench.hp(a)["seq"]}]
    t0 = time.perf_counter(); loss = m(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad()
    if s: t.append(time.perf_counter() - t0); n += ids.numel()
print(json.dumps({{"tokens_per_s": n / sum(t)}}))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr.strip().splitlines()[-1][:300] if p.stderr.strip() else "failed"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("LLMTUNE_BIN", os.path.join(base_bench.SOURCE, "build", "llmtune")))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--hf", action="store_true", help="also time transformers + peft + bitsandbytes")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--work", default=os.path.join(base_bench.SOURCE, "build", "bench-qlora"))
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    model_dir, data = base_bench.make_assets(a, a.work)
    s = base_bench.shape(a)
    bf16_mib = s["layers"] * 2 * (s["hidden"] * s["hidden"] * 2 + 2 * s["hidden"] * s["hidden"] * s["kv_heads"] // s["heads"]
                                  + 3 * s["hidden"] * s["intermediate"]) / 2**20
    ratios, runs = [], []
    for _ in range(a.repeats):
        lo = run_llmtune(a, model_dir, data, a.work, False)
        ql = run_llmtune(a, model_dir, data, a.work, True)
        ratios.append(lo["tokens_per_s"] / ql["tokens_per_s"])
        runs.append((lo, ql))
    lo, ql = runs[-1]
    res = {"shape": s, "steps": a.steps, "threads": a.threads,
           "base_weight_memory_ratio": ql["quant_mib"] / bf16_mib if ql["quant_mib"] else None,
           "quantized_mib": ql["quant_mib"], "bf16_linear_mib": bf16_mib,
           "step_time_ratio_qlora_over_lora": statistics.median(ratios),
           "peak_rss_ratio_qlora_over_lora": ql["peak_rss_bytes"] / lo["peak_rss_bytes"],
           "lora_tokens_per_s": lo["tokens_per_s"], "qlora_tokens_per_s": ql["tokens_per_s"]}
    if a.hf:
        res["transformers_peft_bnb"] = hf_qlora(a, model_dir, data)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
