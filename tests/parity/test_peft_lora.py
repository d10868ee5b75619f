"""LoRA adapters against the `peft` package, both directions, unmerged and merged (fp32):

(a) peft makes an adapter with non-zero B (init_lora_weights=False, plus lm_head in modules_to_save);
    `llmtune merge` folds it and transformers' logits on the merged checkpoint equal peft's
    unmerged logits within 1e-4; `llmtune generate --adapter` greedy tokens equal peft's.
(b) llmtune writes an adapter (hidden Catch2 test `test_peft [.write-adapter]`, random A/B,
    all linear layers, rsLoRA); PeftModel.from_pretrained loads it; `llmtune eval perplexity
    --adapter` equals peft's perplexity to rel 1e-5 and greedy tokens are identical.
(c) two adapters merged in order by `llmtune merge` equal peft's merge_and_unload applied in turn
    within 1e-4.
The test binary is $LLMTUNE_TEST_PEFT, else test_peft beside $LLMTUNE_BIN, else in the build dir.
"""
import math
import shutil
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, FIXTURES, demo_model, model_fixture, run, run_json  # noqa: E402

torch.manual_seed(0)
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def find_test_binary():
    cands = [Path(os.environ["LLMTUNE_TEST_PEFT"])] if os.environ.get("LLMTUNE_TEST_PEFT") else []
    cands += [Path(BIN).parent / "test_peft", Path(FIXTURES).parent / "test_peft"]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    sys.exit("test_peft binary not found (tried %s); build it or set LLMTUNE_TEST_PEFT" % ", ".join(map(str, cands)))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def peft_adapter(base_dir, out, seed, rslora=False, modules_to_save=None, targets=LINEARS):
    """A peft LoRA adapter with random A and B (init_lora_weights=False) saved to `out`."""
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                     modules_to_save=modules_to_save, task_type="CAUSAL_LM")
    pm = get_peft_model(load(base_dir), cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(out)
    return out


def greedy(model, ids, n, tok):
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


tmp = Path(tempfile.mkdtemp(prefix="llmtune-peft-parity-"))
ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(1))

# (a) peft -> llmtune, merged through the CLI, on the untied GQA fixture (lm_head in modules_to_save)
base = model_fixture("llama-gqa")
a1 = peft_adapter(base, tmp / "a1", 10, modules_to_save=["lm_head"])
with torch.no_grad():
    pm = PeftModel.from_pretrained(load(base), a1).eval()
    ref = pm(ids).logits
    assert max_diff(ref, load(base)(ids).logits) > 1e-2, "adapter is a no-op; test would prove nothing"
res = run(["merge", "--base", base, "--adapter", a1, "--out", tmp / "m1", "--dtype", "fp32"])
print(res.stdout.strip())
with torch.no_grad():
    got = load(tmp / "m1")(ids).logits
d = max_diff(got, ref)
assert d <= 1e-4, f"(a) merged llmtune vs peft unmerged: max abs logit diff {d:.3g}"
print(f"(a) peft adapter merged by llmtune vs peft: max abs logit diff {d:.2e}")

# (c) two adapters (second one rsLoRA) merged in order vs peft merge_and_unload in turn
a2 = peft_adapter(base, tmp / "a2", 11, rslora=True, targets=["q_proj", "v_proj", "down_proj"])
with torch.no_grad():
    m = PeftModel.from_pretrained(load(base), a1).merge_and_unload()
    m = PeftModel.from_pretrained(m, a2).merge_and_unload().eval()
    ref2 = m(ids).logits
run(["merge", "--base", base, "--adapter", a1, "--adapter", a2, "--out", tmp / "m12", "--dtype", "fp32"])
with torch.no_grad():
    got2 = load(tmp / "m12")(ids).logits
d = max_diff(got2, ref2)
assert d <= 1e-4, f"(c) two merged adapters: max abs logit diff {d:.3g}"
print(f"(c) merge of two adapters vs peft merge_and_unload: max abs logit diff {d:.2e}")

# (a) unmerged generation on the demo model (has a tokenizer)
demo = demo_model()
tok = AutoTokenizer.from_pretrained(demo)
prompt = "The quick brown fox jumps"
pids = tok(prompt, return_tensors="pt").input_ids
a3 = peft_adapter(demo, tmp / "a3", 12)
pm = PeftModel.from_pretrained(load(demo), a3).eval()
expected = greedy(pm, pids, 24, tok)
res = run_json(["generate", "--model", demo, "--adapter", a3, "--prompt", prompt, "--greedy", "-n", 24, "--json"])
assert res["tokens"] == expected, f"(a) greedy with peft adapter:\nllmtune {res['tokens']}\npeft    {expected}"
print(f"(a) generate --adapter: {len(expected)} greedy tokens identical to peft")

# (b) llmtune -> peft: adapter written by llmtune, loaded by PeftModel.from_pretrained
a4 = tmp / "a4"
env = dict(os.environ, LLMTUNE_PEFT_MODEL=str(demo), LLMTUNE_PEFT_OUT=str(a4), LLMTUNE_PEFT_RSLORA="1")
subprocess.run([str(find_test_binary()), "[.write-adapter]"], check=True, env=env, capture_output=True)
pm = PeftModel.from_pretrained(load(demo), a4).eval()
assert pm.peft_config["default"].use_rslora
n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith("lora_A.default"))
assert n_lora == 7 * pm.config.num_hidden_layers, n_lora
expected = greedy(pm, pids, 24, tok)
res = run_json(["generate", "--model", demo, "--adapter", a4, "--prompt", prompt, "--greedy", "-n", 24, "--json"])
assert res["tokens"] == expected, f"(b) greedy with llmtune adapter:\nllmtune {res['tokens']}\npeft    {expected}"
print(f"(b) llmtune adapter in peft: {len(expected)} greedy tokens identical")

text_path = os.path.join(demo, "corpus.txt")
enc = tok(open(text_path).read(), return_tensors="pt").input_ids[:, :256]
with open(tmp / "probe.txt", "w") as f:
    f.write(tok.decode(enc[0], skip_special_tokens=True))
enc = tok(open(tmp / "probe.txt").read(), return_tensors="pt").input_ids
with torch.no_grad():
    logits = pm(enc).logits.float()
lp = torch.log_softmax(logits[0, :-1], -1).gather(1, enc[0, 1:].unsqueeze(1))
mean = -lp.mean().item()
res = run_json(["eval", "perplexity", "--model", demo, "--adapter", a4, "--data", tmp / "probe.txt",
                "--max-length", enc.shape[1], "--json"])
assert res["scored_tokens"] == enc.shape[1] - 1, (res["scored_tokens"], enc.shape)
rel = abs(res["mean_nll"] - mean) / mean
assert rel <= 1e-5, f"(b) eval perplexity --adapter {res['mean_nll']} vs peft {mean} (rel {rel:.2e})"
print(f"(b) perplexity with llmtune adapter: {res['perplexity']:.5f} vs peft {math.exp(mean):.5f} (rel {rel:.1e})")
shutil.rmtree(tmp, ignore_errors=True)
print("peft parity: all passed")
