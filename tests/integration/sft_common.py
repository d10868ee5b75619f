"""Shared helpers for the `llmtune sft` end-to-end tests: the synthetic "last word" chat task,
recipe files written from dicts, and an independent adapter merge (plain torch: W + s * B @ A)
so the merged model can be checked with `llmtune generate`."""
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, demo_model, run  # noqa: E402,F401

# The synthetic "last word" task is the quickstart's (scripts/make_demo_data.py): one copy.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "scripts"))
from make_demo_data import WORDS, task as last_word_task  # noqa: E402,F401


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_recipe(path, d):
    """YAML is a superset of JSON: a dict dumped as JSON is a valid recipe."""
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    return path


def base_recipe(base, data, out, **kw):
    r = {"base_model": base, "datasets": [{"path": data, "type": "chat_template"}], "chat_template": "tokenizer_default",
         "sequence_len": 64, "micro_batch_size": 8, "num_epochs": 1, "learning_rate": 1e-3, "lr_scheduler": "constant",
         "optimizer": "adamw_torch", "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_target_linear": True,
         "output_dir": out, "logging_steps": 1, "seed": 7, "dataset_prepared_path": os.path.join(out, "..", "cache"),
         "val_set_size": 0, "save_strategy": "no"}
    r.update(kw)
    return r


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f if l.strip()]


def merge_adapter(base, adapter, dest):
    """Merges a PEFT LoRA adapter into a copy of base with torch only (independent of llmtune)."""
    import torch
    from safetensors.torch import load_file, save_file
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(base, dest)
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    scale = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg.get("use_rslora") else cfg["r"])
    ad = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    w = load_file(os.path.join(base, "model.safetensors"))
    for k, a in ad.items():
        if ".lora_A." not in k:
            continue
        mod = k[len("base_model.model."):].split(".lora_A.")[0]
        b = ad[k.replace(".lora_A.", ".lora_B.")]
        wk = mod + ".weight"
        w[wk] = (w[wk].float() + scale * (b.float() @ a.float())).to(w[wk].dtype)
    save_file(w, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    return dest
