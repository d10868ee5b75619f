"""Reward models written by `llmtune reward` load in transformers as <Family>ForSequenceClassification
(num_labels 1) and give the same scores as llmtune: for a Llama (the demo model, tied embeddings, LoRA
reward run, merged on save), a Mistral and a Qwen2 tiny model (untied, full fine-tuning), a few training
steps each, then `llmtune reward --score` vs AutoModelForSequenceClassification on the same token ids.
Tolerance: |Δscore| <= 1e-4 + 1e-4·|score| (fp32 on CPU).
"""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import FIXTURES, SOURCE, demo_model, run  # noqa: E402


def family_model(base, kind, dest):
    """A tiny random Mistral/Qwen2 causal LM with the demo tokenizer, saved by transformers."""
    import torch
    import transformers
    if os.path.exists(os.path.join(dest, "model.safetensors")):
        return dest
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(base):
        if f.startswith("tokenizer") or f in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(os.path.join(base, f), dest)
    vocab = json.load(open(os.path.join(base, "config.json")))["vocab_size"]
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(1)
    if kind == "mistral":
        m = transformers.MistralForCausalLM(transformers.MistralConfig(sliding_window=None, **common))
    else:
        m = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    m.save_pretrained(dest, safe_serialization=True)
    return dest


def main():
    base = demo_model()
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
                   check=True, capture_output=True)
    data = os.path.join(FIXTURES, "align")
    work = os.path.join(FIXTURES, "..", "test-reward-parity")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    import torch
    from transformers import AutoModelForSequenceClassification

    held = os.path.join(work, "held.jsonl")
    with open(held, "w") as f:
        for l in open(os.path.join(data, "reward_held.jsonl")).readlines()[:12]:
            f.write(l)
    models = [("llama", base, {"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_linear": True}),
              ("mistral", family_model(base, "mistral", os.path.join(FIXTURES, "align", "tiny-mistral")), {}),
              ("qwen2", family_model(base, "qwen2", os.path.join(FIXTURES, "align", "tiny-qwen2")), {})]
    for name, model_dir, extra in models:
        out = os.path.join(work, name)
        recipe = {"base_model": model_dir, "reward_model": True,
                  "datasets": [{"path": os.path.join(data, "reward_train.jsonl")}], "sequence_len": 32,
                  "micro_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "output_dir": out, "seed": 1,
                  "save_strategy": "no", "logging_steps": 1, **extra}
        path = os.path.join(work, f"{name}.yaml")
        with open(path, "w") as f:
            json.dump(recipe, f)
        run(["reward", path, "--no-progress"])
        rows = [json.loads(l) for l in run(["reward", "--score", out, "--data", held]).stdout.splitlines()
                if l.startswith("{")]
        assert len(rows) == 12, rows
        hf = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
        arch = type(hf).__name__
        assert arch == {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
                        "qwen2": "Qwen2ForSequenceClassification"}[name], arch
        assert hf.config.num_labels == 1
        worst = 0.0
        with torch.no_grad():
            for r in rows:
                for key in ("chosen", "rejected"):
                    ids = torch.tensor([r[f"{key}_ids"]])
                    got = float(hf(input_ids=ids).logits[0, 0])
                    want = r[f"{key}_score"]
                    worst = max(worst, abs(got - want))
                    assert abs(got - want) <= 1e-4 + 1e-4 * abs(want), (name, key, got, want)
        print(f"{name}: {arch} scores match llmtune on {2 * len(rows)} sequences (max |diff| {worst:.2e})")
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
