"""`llmtune generate` and `llmtune eval perplexity` against transformers on the same model and
tokens: greedy generation identical token for token (plain and chat prompts), perplexity
equal within a relative 1e-4 in fp32 (both sum the same per-token log-probabilities in fp32;
the difference is summation order only)."""
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from common import FIXTURES, demo_model, run, run_json  # noqa: E402

torch.manual_seed(0)
model_dir = demo_model()
hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(model_dir)

# 1. Plain prompt, greedy: token ids identical.
prompt = "The quick brown fox jumps"
res = run_json(["generate", "--model", model_dir, "--prompt", prompt, "--greedy", "-n", "32", "--json"])
ids = tok(prompt, return_tensors="pt").input_ids
assert res["prompt_tokens"] == ids.shape[1], (res["prompt_tokens"], ids.shape)
with torch.no_grad():
    out = hf.generate(ids, do_sample=False, max_new_tokens=32, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
expected = out[0, ids.shape[1]:].tolist()
assert res["tokens"] == expected, f"greedy tokens differ:\nllmtune {res['tokens']}\nhf      {expected}"
print(f"plain greedy: {len(expected)} tokens identical")

# 2. Chat prompt through the tokenizer's own Jinja template: same prompt ids, same tokens.
messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is the capital of France?"}]
res = run_json(["generate", "--model", model_dir, "--chat", "--system", messages[0]["content"], "--prompt",
                messages[1]["content"], "--greedy", "-n", "24", "--json"])
chat_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
assert res["prompt_tokens"] == chat_ids.shape[1], (res["prompt_tokens"], chat_ids.shape)
with torch.no_grad():
    out = hf.generate(chat_ids, do_sample=False, max_new_tokens=24, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
expected = out[0, chat_ids.shape[1]:].tolist()
assert res["tokens"] == expected, f"chat greedy tokens differ:\nllmtune {res['tokens']}\nhf      {expected}"
print(f"chat greedy: {len(expected)} tokens identical")

# 3. Perplexity over a text file, non-overlapping and strided windows.
text_path = os.path.join(model_dir, "corpus.txt")
text = open(text_path).read()
enc = tok(text, return_tensors="pt").input_ids


def hf_perplexity(max_length, stride):
    nll, count, prev_end = 0.0, 0, 0
    n = enc.shape[1]
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg = end - prev_end
        window = enc[:, begin:end]
        labels = window.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            logits = hf(window).logits.float()
        shift_logits, shift_labels = logits[0, :-1], labels[0, 1:]
        mask = shift_labels != -100
        lp = torch.log_softmax(shift_logits, -1)[mask].gather(1, shift_labels[mask].unsqueeze(1))
        nll += -lp.sum().item()
        count += int(mask.sum())
        prev_end = end
        if end == n:
            break
    return nll / count, count


for max_length, stride in [(128, 128), (128, 64)]:
    res = run_json(["eval", "perplexity", "--model", model_dir, "--data", text_path, "--max-length", max_length,
                    "--stride", stride, "--json"])
    mean, count = hf_perplexity(max_length, stride)
    assert res["tokens"] == enc.shape[1], (res["tokens"], enc.shape)
    assert res["scored_tokens"] == count, (res["scored_tokens"], count)
    rel = abs(res["mean_nll"] - mean) / mean
    assert rel <= 1e-4, f"mean NLL {res['mean_nll']} vs transformers {mean} (rel {rel:.2e})"
    assert abs(res["perplexity"] - math.exp(mean)) / math.exp(mean) <= 1e-4
    print(f"perplexity max_length={max_length} stride={stride}: {res['perplexity']:.4f} vs {math.exp(mean):.4f} "
          f"(rel {rel:.1e}, {count} tokens)")

# 4. JSONL input: one document per record.
jsonl = os.path.join(FIXTURES, "demo-docs.jsonl")
docs = text.splitlines()[:20]
with open(jsonl, "w") as f:
    for d in docs:
        f.write(json.dumps({"text": d}) + "\n")
res = run_json(["eval", "perplexity", "--model", model_dir, "--data", jsonl, "--json"])
nll, count = 0.0, 0
for d in docs:
    ids = tok(d, return_tensors="pt").input_ids
    with torch.no_grad():
        out = hf(ids, labels=ids)
    n = ids.shape[1] - 1
    nll += out.loss.item() * n
    count += n
assert res["scored_tokens"] == count and res["documents"] == len(docs)
assert abs(res["mean_nll"] - nll / count) / (nll / count) <= 1e-4, (res["mean_nll"], nll / count)
print("jsonl perplexity matches")
