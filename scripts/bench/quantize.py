#!/usr/bin/env python3
"""GGUF export figures for the README: for each --type, the file size, bits per weight, export time,
and perplexity on a fixed text relative to f16, measured two ways side by side:
  llmtune   - `llmtune eval perplexity` on the file's weights (dequantized from the GGUF by the
              `gguf` package, whose dequantizers equal llmtune's bit for bit, saved as a checkpoint)
  llama.cpp - llama-cpp-python running the GGUF file itself (its kernels, its activation rounding).
  python scripts/bench/quantize.py --bin build/llmtune [--model DIR] [--text FILE] [--types f16,q4_0]
Defaults: the export fixture model (scripts/fixtures/export_make.py) and its text.txt. Prints a
Markdown table and the command lines used."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tests", "parity"))
import gguf_common as G  # noqa: E402


def llmtune_ppl(bin_path, model_dir, text, max_length):
    p = subprocess.run([bin_path, "eval", "perplexity", "--model", model_dir, "--data", text, "--max-length",
                        str(max_length), "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"llmtune eval perplexity failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])["perplexity"]


def main():
    fixtures = os.environ.get("LLMTUNE_FIXTURES", "build/fixtures")
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="build/llmtune")
    ap.add_argument("--eval-bin", default=None, help="llmtune binary for `eval perplexity` (default: --bin)")
    ap.add_argument("--model", default=os.path.join(fixtures, "export", "bpe"))
    ap.add_argument("--text", default=os.path.join(fixtures, "export", "text.txt"))
    ap.add_argument("--types", default=",".join(G.TYPES))
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()
    import shutil

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(a.model)
    ids = tok.encode(open(a.text).read())
    if len(ids) > a.max_length:
        sys.exit(f"{a.text}: {len(ids)} tokens; keep the text within --max-length {a.max_length} (one window)")
    tmp = tempfile.mkdtemp(prefix="llmtune_qbench_")
    rows = []
    for t in a.types.split(","):
        path = os.path.join(tmp, f"model-{t}.gguf")
        secs, out = G.quantize(a.bin, a.model, t, path)
        bpw = float(out.split(" bits/weight")[0].split()[-1])
        # llmtune's model on the file's weights
        d = os.path.join(tmp, f"deq-{t}")
        os.makedirs(d, exist_ok=True)
        for f in os.listdir(a.model):
            if f.endswith(".json") or f.endswith(".jinja") or f == "tokenizer.model":
                shutil.copy(os.path.join(a.model, f), d)
        sd = {k: v.contiguous() for k, v in G.gguf_to_state_dict(path).items()}
        save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        ppl_ours = llmtune_ppl(a.eval_bin or a.bin, d, a.text, a.max_length)
        lc = G.LlamaCpp(path, n_ctx=a.max_length)
        ppl_lc = float(np.exp(G.nll(lc.logits(ids), ids)))
        lc.close()
        rows.append(dict(type=t, bytes=os.path.getsize(path), bpw=bpw, secs=secs, ppl_ours=ppl_ours, ppl_lc=ppl_lc))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["type"] == "f16"), rows[0])
    print(f"\nModel: {a.model} ({len(ids)} tokens of {a.text}); perplexity relative to {base['type']}.\n")
    print("| type | file size | bits/weight | ppl ratio (llmtune) | ppl ratio (llama.cpp) | export time |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['type']} | {r['bytes'] / 1e6:.2f} MB | {r['bpw']:.2f} | {r['ppl_ours'] / base['ppl_ours']:.4f} | "
              f"{r['ppl_lc'] / base['ppl_lc']:.4f} | {r['secs']:.1f} s |")
    print(f"\nf16 perplexity: llmtune {base['ppl_ours']:.4f}, llama.cpp {base['ppl_lc']:.4f}")
    print(f"command: llmtune quantize --model {a.model} --format gguf --type TYPE --out model-TYPE.gguf")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
