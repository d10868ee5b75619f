# ctest-processors: 2
"""LoRA on a GPTQ base, end to end with the real binary (Axolotl's `gptq: true`):
1. `llmtune quantize --format gptq` (4-bit, group 64) of the pretrained default model;
2. `llmtune sft` with `adapter: lora`, `gptq: true` on that directory for a few steps on text from the
   corpus test_gptq_awq.py calibrates with: the loss falls; the adapter is a PEFT LoRA directory
   (PEFT itself loads it, below) and llmtune_qlora.json records the base as GPTQ 4-bit group 64
   (not bitsandbytes nf4);
3. `llmtune merge` of that adapter on the GPTQ base: the reference is independent of llmtune: the
   GPTQ checkpoint dequantized by the pure-Python reader of test_gptq_awq.py, loaded in transformers,
   with the adapter applied by PEFT. The fp32 merge (`--dtype fp32`) gives its logits within 1e-4 (max
   abs); the default merge is a plain fp16 checkpoint (the GPTQ config's dtype), within 0.05;
4. errors: `gptq: true` on a base that is not GPTQ (the fp32 model, an AWQ checkpoint) names the key
   and the directory; `gptq: true` without `adapter: lora` is a contradiction; merging the adapter
   into the fp32 model instead of its GPTQ base stops with a clear message.
Wall time ~1 min on 2 cores."""
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time

import torch
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import metrics, write_jsonl, write_recipe  # noqa: E402
from test_gptq_awq import find_base, find_data, run, sample_text, to_dense_checkpoint  # noqa: E402

FP32_TOL = 1e-4   # merged fp32 vs dequantized base + adapter (PEFT), max |logit|; fp32 summation order only
FP16_TOL = 5e-2   # the default fp16 merge: weights rounded to fp16 (logits of magnitude ~10-20)


def recipe(base, data, out, **kw):
    r = {"base_model": base, "datasets": [{"path": data, "type": "completion"}], "sequence_len": 128,
         "micro_batch_size": 4, "max_steps": 24, "learning_rate": 3e-3, "lr_scheduler": "constant",
         "optimizer": "adamw_torch", "adapter": "lora", "gptq": True, "lora_r": 8, "lora_alpha": 16,
         "lora_dropout": 0.0, "lora_target_linear": True, "output_dir": out, "logging_steps": 1, "seed": 3,
         "dataset_prepared_path": os.path.join(out, "..", "cache"), "val_set_size": 0, "save_strategy": "no",
         "bf16": False}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def logits_hf(model_dir, ids, adapter=None):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter:
        from peft import PeftModel
        m = PeftModel.from_pretrained(m, adapter)
    m.eval()
    with torch.no_grad():
        return m(ids).logits.float()


def main():
    t_start = time.time()
    base = find_base()
    data = find_data(base)
    tmp = tempfile.mkdtemp(prefix="llmtune-gptq-lora-")
    corpus = sorted(glob.glob(os.path.join(data, "corpus", "*.txt")))
    calib = os.path.join(tmp, "calib.txt")
    open(calib, "w").write(sample_text(corpus, 60_000))

    # 1. GPTQ 4-bit, group 64
    gptq = os.path.join(tmp, "gptq")
    p = run(["quantize", "--model", base, "--format", "gptq", "--bits", 4, "--group-size", 64, "--calib", calib,
             "--calib-samples", 8, "--calib-seqlen", 256, "--threads", 2, "--out", gptq])
    print(p.stdout.strip())

    # 2. LoRA sft on it: 16 passages of the corpus, ~6 epochs, so the loss clearly falls
    text = sample_text(corpus, 4_000)
    rows = [{"text": text[i:i + 500]} for i in range(0, 16 * 500, 500)]
    train = os.path.join(tmp, "train.jsonl")
    write_jsonl(train, rows)
    out = os.path.join(tmp, "lora")
    p = run(["sft", write_recipe(os.path.join(tmp, "sft.yaml"), recipe(gptq, train, out)), "--no-progress"])
    log = p.stdout + p.stderr
    assert "`gptq: true`" in log and "gptq 4-bit, group 64" in log, log[-3000:]
    losses = [m["loss"] for m in metrics(out) if "loss" in m]
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"sft on the GPTQ base: {len(losses)} steps, loss {first:.3f} (first 4) -> {last:.3f} (last 4)")
    assert len(losses) == 24 and last < first - 0.3, losses

    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16, cfg
    assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}, cfg
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys, keys[:4]
    assert len(keys) == 2 * 7 * json.load(open(os.path.join(base, "config.json")))["num_hidden_layers"], len(keys)
    rec = json.load(open(os.path.join(out, "llmtune_qlora.json")))
    qc = rec["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 64, rec
    assert "bnb_4bit_quant_type" not in qc and "blocksize" not in rec, rec
    assert rec["quantized_linears"] == 42, rec

    # 3. merge; reference: independent dequantizer + transformers + PEFT
    dense = os.path.join(tmp, "gptq-dense")
    to_dense_checkpoint(gptq, dense)
    ids = torch.tensor([[(1 + 7919 * t) % 8000 for t in range(48)], [(5 + 104729 * t) % 8000 for t in range(48)]])
    ref = logits_hf(dense, ids, adapter=out)
    plain = logits_hf(dense, ids)
    moved = (ref - plain).abs().max().item()
    assert moved > 0.05, f"the adapter should change the logits (moved {moved})"

    merged32 = os.path.join(tmp, "merged-fp32")
    p = run(["merge", "--base", gptq, "--adapter", out, "--out", merged32, "--dtype", "fp32"])
    assert "gptq 4-bit, group 64" in p.stderr and "nf4" not in p.stderr, p.stderr
    assert "fingerprint mismatch" not in p.stderr, p.stderr
    m = re.search(r"max abs logit diff merged vs base\+adapter on \d+ probes: ([0-9.e+-]+)", p.stdout)
    assert m and float(m.group(1)) < FP32_TOL, p.stdout
    mcfg = json.load(open(os.path.join(merged32, "config.json")))
    assert "quantization_config" not in mcfg, "a merged model must not claim to be quantized"
    d32 = (logits_hf(merged32, ids) - ref).abs().max().item()

    merged16 = os.path.join(tmp, "merged-default")
    run(["merge", "--base", gptq, "--adapter", out, "--out", merged16])
    mcfg = json.load(open(os.path.join(merged16, "config.json")))
    assert "quantization_config" not in mcfg and mcfg.get("dtype", mcfg.get("torch_dtype")) == "float16", mcfg
    with safe_open(os.path.join(merged16, "model.safetensors"), "pt") as f:
        w = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert w.dtype == torch.float16 and not any(k.endswith(".qweight") for k in f.keys())
    d16 = (logits_hf(merged16, ids) - ref).abs().max().item()
    print(f"merge vs dequantized GPTQ base + adapter (PEFT): fp32 max |dlogit| {d32:.2e} (tol {FP32_TOL}), "
          f"default fp16 {d16:.2e} (tol {FP16_TOL}); the adapter moves logits by {moved:.3f}")
    assert d32 < FP32_TOL, d32
    assert d16 < FP16_TOL, d16

    # 4. recipe errors
    p = run(["sft", write_recipe(os.path.join(tmp, "bad1.yaml"), recipe(base, train, os.path.join(tmp, "b1"))),
             "--dry-run"], check=False)
    assert p.returncode != 0 and "`gptq: true`" in p.stderr and base.rstrip("/") in p.stderr \
        and "not quantized" in p.stderr, p.stderr
    awq = os.path.join(tmp, "awq-rtn")
    run(["quantize", "--model", base, "--format", "awq", "--rtn", "--bits", 4, "--group-size", 64, "--out", awq])
    p = run(["sft", write_recipe(os.path.join(tmp, "bad2.yaml"), recipe(awq, train, os.path.join(tmp, "b2"))), "--dry-run"],
            check=False)
    assert p.returncode != 0 and "`gptq: true`" in p.stderr and awq in p.stderr and "an AWQ checkpoint" in p.stderr, p.stderr
    p = run(["merge", "--base", base, "--adapter", out, "--out", os.path.join(tmp, "m-wrong")], check=False)
    assert p.returncode != 0 and "not a GPTQ/AWQ checkpoint" in p.stderr, p.stderr
    p = run(["sft", write_recipe(os.path.join(tmp, "bad3.yaml"), recipe(gptq, train, os.path.join(tmp, "b3"), adapter=None)),
             "--dry-run"], check=False)
    assert p.returncode != 0 and "`gptq`" in p.stderr and "adapter: lora" in p.stderr, p.stderr

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ok ({time.time() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
