"""DoRA, IA3, prompt tuning and prefix tuning (with and without prefix_projection) against the `peft`
package, both directions, on the demo model (fp32; tolerance: max |logit diff| <= 1e-4):

(a) peft -> llmtune: peft makes each adapter with non-trivial weights (DoRA: random B and
    magnitudes; IA3: random vectors; prompt/prefix: PEFT's random init) and saves it; llmtune loads it
    (hidden Catch2 test `test_peft [.adapter-logits]`) and its logits equal peft's; `llmtune generate
    --adapter` greedy tokens equal peft's generate().
(b) llmtune -> peft: `llmtune sft` trains each method for a few steps on the synthetic task; the
    adapter loads with PeftModel.from_pretrained, logits equal llmtune's, greedy tokens equal.
(c) merge: `llmtune merge` of the DoRA and IA3 adapters (from (a) and (b)) loads in transformers
    and equals peft's unmerged logits; prompt/prefix adapters are refused by merge with a message.
The test binary is $LLMTUNE_TEST_PEFT, else test_peft beside $LLMTUNE_BIN.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(__file__))
from common import BIN, FIXTURES, demo_model, run, run_json  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from sft_common import base_recipe, last_word_task, write_jsonl, write_recipe  # noqa: E402

TOL = 1e-4
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_binary():
    cands = [Path(os.environ["LLMTUNE_TEST_PEFT"])] if os.environ.get("LLMTUNE_TEST_PEFT") else []
    cands += [Path(BIN).parent / "test_peft", Path(FIXTURES).parent / "test_peft"]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    sys.exit("test_peft binary not found (tried %s); build it or set LLMTUNE_TEST_PEFT" % ", ".join(map(str, cands)))


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def llmtune_logits(base, adapter, ids, tmp):
    out = tmp / "logits.safetensors"
    env = dict(os.environ, LLMTUNE_PEFT_MODEL=str(base), LLMTUNE_PEFT_ADAPTER=str(adapter),
               LLMTUNE_PEFT_IDS=";".join(",".join(map(str, r)) for r in ids.tolist()), LLMTUNE_PEFT_OUT=str(out))
    p = subprocess.run([str(test_binary()), "[.adapter-logits]"], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"test_peft [.adapter-logits] failed for {adapter}:\n{p.stdout}\n{p.stderr}")
    return load_file(str(out))["logits"]


def peft_logits(pm, ids, n_virtual=0):
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits[:, n_virtual:]  # prompt tuning returns the virtual positions too


def greedy(model, ids, n, tok):
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def n_virtual(pm):
    cfg = pm.peft_config["default"]
    return cfg.num_virtual_tokens if cfg.peft_type.value == "PROMPT_TUNING" else 0


def compare(name, base, adapter, pm, ids, tmp, tok, prompt):
    ref = peft_logits(pm, ids, n_virtual(pm))
    got = llmtune_logits(base, adapter, ids, tmp)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    d = (got - ref).abs().max().item()
    assert d <= TOL, f"{name}: max abs logit diff llmtune vs peft {d:.3g} > {TOL}"
    pids = tok(prompt, return_tensors="pt").input_ids
    expected = greedy(pm, pids, 20, tok)
    res = run_json(["generate", "--model", base, "--adapter", adapter, "--prompt", prompt, "--greedy", "-n", 20,
                    "--json", "--threads", "2"])
    assert res["tokens"] == expected, f"{name}: greedy tokens differ\nllmtune {res['tokens']}\npeft    {expected}"
    print(f"  {name}: max abs logit diff {d:.2e}; {len(expected)} greedy tokens identical")
    return ref


def peft_made(base, method, out, seed):
    torch.manual_seed(seed)
    if method == "dora":
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=LINEARS, use_dora=True, init_lora_weights=False,
                         task_type="CAUSAL_LM")
    elif method == "ia3":
        cfg = IA3Config(task_type="CAUSAL_LM")
    elif method == "prompt_tuning":
        cfg = PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    elif method == "prefix_tuning":
        cfg = PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")
    else:  # prefix with the MLP reparameterisation
        cfg = PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=48,
                                 task_type="CAUSAL_LM")
    pm = get_peft_model(load(base), cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(torch.rand_like(p) + 0.5)
            elif "ia3_l" in n:
                p.copy_(torch.rand_like(p) + 0.5)
    pm.save_pretrained(out)
    return out


tmp = Path(tempfile.mkdtemp(prefix="llmtune-peft-methods-"))
base = demo_model()
tok = AutoTokenizer.from_pretrained(base)
ids = torch.randint(3, 440, (2, 20), generator=torch.Generator().manual_seed(1))
prompt = "The quick brown fox jumps"
methods = ["dora", "ia3", "prompt_tuning", "prefix_tuning", "prefix_projection"]

print("(a) adapters made by peft, loaded by llmtune")
refs = {}
for i, m in enumerate(methods):
    a = peft_made(base, m, tmp / f"peft-{m}", 100 + i)
    pm = PeftModel.from_pretrained(load(base), a).eval()
    with torch.no_grad():
        plain = load(base)(ids).logits
    refs[m] = compare(m, base, a, pm, ids, tmp, tok, prompt)
    assert (refs[m] - plain).abs().max().item() > 1e-2, f"{m}: adapter is a no-op; test would prove nothing"

print("(b) adapters trained by llmtune sft, loaded by peft")
train = tmp / "train.jsonl"
write_jsonl(train, last_word_task(200, seed=1))
extra = {"dora": {"adapter": "lora", "peft_use_dora": True, "lora_r": 4, "lora_alpha": 8},
         "ia3": {"adapter": "ia3", "learning_rate": 1e-2},
         "prompt_tuning": {"adapter": "prompt_tuning", "num_virtual_tokens": 6, "prompt_tuning_init_text": "Last word"},
         "prefix_tuning": {"adapter": "prefix_tuning", "num_virtual_tokens": 6},
         "prefix_projection": {"adapter": "prefix_tuning", "num_virtual_tokens": 6, "prefix_projection": True}}
trained = {}
for m in methods:
    out = tmp / f"sft-{m}"
    r = base_recipe(base, str(train), str(out), max_steps=8, micro_batch_size=8, learning_rate=1e-3)
    for k in ("lora_r", "lora_alpha", "lora_target_linear"):
        r.pop(k, None)
    if m == "dora":
        r["lora_target_linear"] = True
    r.update(extra[m])
    run(["sft", write_recipe(tmp / f"{m}.yaml", r), "--no-progress"])
    pm = PeftModel.from_pretrained(load(base), out).eval()
    trained[m] = (out, pm)
    compare(m + " (sft)", base, out, pm, ids, tmp, tok, prompt)
init = trained["prompt_tuning"][1].peft_config["default"].prompt_tuning_init
assert getattr(init, "value", init) == "TEXT", init  # peft keeps the enum or its string

print("(c) merge")
for m in ["dora", "ia3"]:
    for tag, adapter in [("peft", tmp / f"peft-{m}"), ("sft", trained[m][0])]:
        pm = PeftModel.from_pretrained(load(base), adapter).eval()
        ref = peft_logits(pm, ids)
        res = run(["merge", "--base", base, "--adapter", adapter, "--out", tmp / f"merged-{m}-{tag}", "--dtype", "fp32"])
        with torch.no_grad():
            got = load(tmp / f"merged-{m}-{tag}")(ids).logits
        d = (got - ref).abs().max().item()
        assert d <= TOL, f"merge {m} ({tag}): transformers on merged vs peft unmerged {d:.3g}"
        print(f"  merge {m} ({tag} adapter): transformers(merged) vs peft(unmerged) max abs logit diff {d:.2e}")
for m in ["prompt_tuning", "prefix_tuning"]:
    p = run(["merge", "--base", base, "--adapter", tmp / f"peft-{m}", "--out", tmp / "nope"], check=False)
    assert p.returncode != 0 and "cannot be merged" in (p.stdout + p.stderr), p.stderr
print("  prompt/prefix tuning: merge refused with a message")
shutil.rmtree(tmp, ignore_errors=True)
print("peft methods parity: all passed")
