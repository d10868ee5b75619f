"""`llmtune pretrain` end to end on a generated corpus with a tokenizer trained by `llmtune tokenizer train`:
  1. filters: the counts in filter_report.json equal what the corpus was built with (exact duplicates,
     near duplicates, too-short documents, a foreign-language document);
  2. exact resume: a run killed with SIGKILL right after its first checkpoint and resumed with
     --resume auto writes a model.safetensors byte-identical to an uninterrupted run's, and the same
     metrics (data position, RNG, optimizer all restored);
  3. the result is an HF checkpoint: transformers loads it and its loss on a held-out window equals
     llmtune's eval (tolerance 1e-4); the loss went down; the per-document-mask mode trains too."""
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import BIN, FIXTURES, run  # noqa: E402

work = os.path.join(FIXTURES, "pretrain-resume")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)

WORDS = ("river stone light morning bread road north house king people land glad went said unto them "
         "and the of a to in was for with his her they all were from into upon over").split()
rng = random.Random(11)


def doc(n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


docs = [doc(rng.randint(30, 80)) for _ in range(260)]
exact = docs[:12]                       # 12 exact duplicates (extra whitespace is trimmed)
near = []
for d in docs[12:20]:                   # 8 near duplicates: one word of ~50 changed
    w = d.split()
    w[len(w) // 2] = "zebra"
    near.append(" ".join(w))
short = ["Too short." for _ in range(1)] + ["Tiny one.", "Hm."]  # 3 below min_chars (one also a dup later: no)
french = ["Le renard brun saute par-dessus le chien paresseux pendant que le fermier regarde depuis la grange "
          "et que les enfants jouent dans le jardin derrière la maison du village."]
corpus = docs + ["  " + d + "  " for d in exact] + near + short + french
random.Random(3).shuffle(corpus)
corpus_file = os.path.join(work, "corpus.txt")
with open(corpus_file, "w") as f:
    f.write("\n\n".join(corpus) + "\n")
tok_text = os.path.join(work, "tok.txt")
with open(tok_text, "w") as f:
    f.write("\n".join(docs) + "\n")
tok = os.path.join(work, "tok")
run(["tokenizer", "train", "--input", tok_text, "--vocab-size", 320, "--type", "bpe", "--out", tok, "--threads", 1])

FILTERS = {"min_chars": 20, "dedup": True, "language": {"allow": ["en"]},
           "near_dedup": {"threshold": 0.7, "num_perm": 128, "bands": 32, "ngram": 3}}
MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "tie_word_embeddings": False}


def recipe(name, **kw):
    out = os.path.join(work, name)
    r = {"random_init_weights": True, "model_config": MODEL, "tokenizer_config": tok,
         "pretraining_dataset": [{"path": corpus_file, "text_split": "paragraph"}], "filters": FILTERS,
         "sequence_len": 32, "micro_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 16,
         "learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_steps": 2, "weight_decay": 0.01,
         "val_set_size": 0.05, "eval_steps": 8, "logging_steps": 1, "save_steps": 4, "save_total_limit": 2,
         "seed": 5, "output_dir": out, "dataset_prepared_path": os.path.join(work, "cache")}
    r.update(kw)
    r = {k: v for k, v in r.items() if v is not None}  # None = leave the key out
    path = os.path.join(work, name + ".yaml")
    with open(path, "w") as f:
        json.dump(r, f, indent=1)
    return path, out


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if l.strip()]


# ---- uninterrupted reference ----
ra, out_a = recipe("a")
t0 = time.time()
p = run(["pretrain", ra, "--no-progress"])
print(f"uninterrupted: {time.time() - t0:.1f}s")

# ---- 1. filter counts ----
rep = json.load(open(os.path.join(out_a, "filter_report.json")))
print("filter report:", json.dumps(rep["removed"]))
assert rep["documents_in"] == len(corpus), rep
assert rep["removed"]["dedup"] == len(exact), rep
assert rep["removed"]["min_chars"] == len(short), rep
assert rep["removed"]["language"] == len(french), rep
assert rep["removed"]["near_dedup"] == len(near), rep
assert rep["documents_out"] == len(docs), rep
assert "near_dedup" in p.stderr and "dedup" in p.stderr, "the filter table is printed"

# ---- 2. exact resume after SIGKILL ----
rb, out_b = recipe("b")
proc = subprocess.Popen([BIN, "pretrain", rb, "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
killed_at, deadline = None, time.time() + 300
while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(out_b):
        ck = [d for d in os.listdir(out_b) if d.startswith("checkpoint-") and d[11:].isdigit()]
        if ck:
            proc.send_signal(signal.SIGKILL)
            killed_at = sorted(ck, key=lambda d: int(d[11:]))[-1]
            break
    time.sleep(0.01)
proc.wait()
assert killed_at and proc.returncode == -signal.SIGKILL, f"not killed (rc {proc.returncode}): {proc.stderr.read().decode()[-1500:]}"
r = run(["pretrain", rb, "--resume", "auto", "--no-progress"])
assert "resumed" in r.stderr + r.stdout, r.stderr[-1500:]
a = open(os.path.join(out_a, "model.safetensors"), "rb").read()
b = open(os.path.join(out_b, "model.safetensors"), "rb").read()
assert a == b, "resumed model differs from the uninterrupted run"
ma, mb = metrics(out_a), metrics(out_b)
la = [(m["step"], m.get("loss"), m.get("eval_loss")) for m in ma]
lb = [(m["step"], m.get("loss"), m.get("eval_loss")) for m in mb]
assert la == lb, (la, lb)
print(f"killed after {killed_at}; resumed run is bitwise identical (model.safetensors, {len(ma)} metric lines)")

# ---- 3. HF checkpoint, learning, held-out loss parity ----
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

losses = [m["loss"] for m in ma if "loss" in m]
assert losses[-1] < losses[0] - 0.5, f"loss did not go down: {losses[0]:.3f} -> {losses[-1]:.3f}"
evals = [m["eval_loss"] for m in ma if "eval_loss" in m]
assert evals, "no eval loss logged"
model = AutoModelForCausalLM.from_pretrained(out_a, dtype=torch.float32).eval()
tk = AutoTokenizer.from_pretrained(out_a)
# The held-out windows are the tail of the token cache: recompute llmtune's final eval loss with HF.
cache_dirs = [d for d in os.listdir(os.path.join(work, "cache")) if d.startswith("pretrain-") and ".tmp" not in d]
assert len(cache_dirs) == 1, cache_dirs
cdir = os.path.join(work, "cache", cache_dirs[0])
meta = json.load(open(os.path.join(cdir, "meta.json")))
import numpy as np  # noqa: E402
toks = np.fromfile(os.path.join(cdir, "tokens.bin"), dtype=np.uint16 if meta["token_bytes"] == 2 else np.int32)
T = 32
W = len(toks) // T
n_val = math.ceil(0.05 * W)
n_batches = n_val // 4
tot, cnt = 0.0, 0
with torch.no_grad():
    for bi in range(n_batches):
        ids = torch.tensor(toks[(W - n_val + bi * 4) * T:(W - n_val + bi * 4 + 4) * T].astype(np.int64)).view(4, T)
        out = model(input_ids=ids, labels=ids)
        tot += out.loss.item() * 4 * (T - 1)
        cnt += 4 * (T - 1)
hf_eval = tot / cnt
assert abs(hf_eval - evals[-1]) < 1e-4, (hf_eval, evals[-1])
ids = tk("the river", return_tensors="pt")["input_ids"]
assert ids[0, 0].item() == 1
gen = model.generate(ids, max_new_tokens=5, do_sample=False)
assert gen.shape[1] == ids.shape[1] + 5 or gen[0, -1].item() == 2
print(f"HF loads the checkpoint; held-out loss {hf_eval:.4f} == llmtune eval {evals[-1]:.4f}; train loss {losses[0]:.2f} -> {losses[-1]:.2f}")

# ---- per-document attention mode, continued from the checkpoint (base_model) ----
rc, out_c = recipe("c", random_init_weights=False, base_model=out_a, max_steps=4, save_steps=None, save_strategy="no",
                   pretraining_document_mask=True, val_set_size=0, eval_steps=None)
run(["pretrain", rc, "--no-progress"])
mc = metrics(out_c)
assert all(math.isfinite(m["loss"]) for m in mc if "loss" in m)
assert mc[0]["loss"] < losses[0] - 0.3, "continued pretraining did not start from the trained weights"
print("document-mask continued pretraining ok")

# ---- errors for people ----
rd, _ = recipe("d", filters={"min_char": 3})
p = run(["pretrain", rd], check=False)
assert p.returncode != 0 and "min_chars" in p.stderr, p.stderr
print("ok")
