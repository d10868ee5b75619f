# ctest-processors: 2
"""llmtune's GPTQ and AWQ checkpoints read by a third-party loader on the CPU: transformers with
optimum + gptqmodel (its pure-torch kernels; pinned in scripts/versions.env), on the pretrained default model:
1. `AutoModelForCausalLM.from_pretrained(DIR)` builds gptqmodel quantized linears from our
   qweight/qzeros/scales(/g_idx) and quantization_config (GPTQ asymmetric v1 at group 64, GPTQ
   act-order + symmetric at group 64, AWQ GEMM at group 64), and its fp16 logits equal transformers' fp32 logits on the same checkpoint
   dequantized by the independent pure-Python reader of tests/integration/test_gptq_awq.py:
   max |Δlogit| <= 0.05 (gptqmodel's CPU kernel computes in fp16/bf16 only; measured ~0.02, the
   size of fp16 rounding on logits of magnitude ~20);
2. llmtune's own forward of the same directory (`llmtune eval perplexity --dtype fp32`) gives the
   loader's perplexity on held-out text within a relative 1e-4 in mean NLL (same windows, same tokens;
   measured <= 2e-5, fp16 llmtune likewise, by hand)."""
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))
from common import run_json  # noqa: E402
from test_gptq_awq import find_base, find_data, run, sample_text, to_dense_checkpoint  # noqa: E402

LOGIT_TOL = 0.05   # loader (fp16 compute) vs fp32 on the independently dequantized weights, max |Δlogit|
PPL_TOL = 1e-4     # relative mean NLL: llmtune (fp32) vs the loader (fp16 compute), same windows; measured <= 2e-5


def loader_perplexity(model, enc, max_length):
    nll, count = 0.0, 0
    for begin in range(0, enc.shape[1], max_length):
        window = enc[:, begin:begin + max_length]
        if window.shape[1] < 2:
            break
        with torch.no_grad():
            logits = model(window).logits.float()
        lp = torch.log_softmax(logits[0, :-1], -1).gather(1, window[0, 1:].unsqueeze(1))
        nll += -lp.sum().item()
        count += window.shape[1] - 1
    return nll / count, count


def main():
    t0 = time.time()
    try:
        import gptqmodel  # noqa: F401
        import optimum  # noqa: F401
    except ImportError as e:
        sys.exit(f"FAIL: {e}: scripts/setup.sh installs gptqmodel and optimum (scripts/versions.env)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = find_base()
    data = find_data(base)
    tmp = tempfile.mkdtemp(prefix="llmtune-gptq-hf-")
    calib = os.path.join(tmp, "calib.txt")
    open(calib, "w").write(sample_text(glob.glob(os.path.join(data, "corpus", "*.txt")), 60_000))
    held = os.path.join(tmp, "held-out.txt")
    open(held, "w").write(sample_text(glob.glob(os.path.join(data, "corpus_test", "bible-kjv.txt")), 2_500))
    tok = AutoTokenizer.from_pretrained(base)
    enc = tok(open(held).read(), return_tensors="pt").input_ids
    ids = torch.tensor([[(1 + 7919 * t) % 8000 for t in range(64)], [(5 + 104729 * t) % 8000 for t in range(64)]])

    for name, fmt, extra in [("gptq-g64", "gptq", []), ("gptq-actorder-sym-g64", "gptq", ["--act-order", "--sym"]),
                             ("awq-g64", "awq", [])]:
        d = os.path.join(tmp, name)
        run(["quantize", "--model", base, "--format", fmt, "--bits", 4, "--group-size", 64, "--calib", calib,
             "--calib-samples", 4, "--calib-seqlen", 256, "--threads", 2, "--out", d, *extra])
        to_dense_checkpoint(d, d + "-dense")
        ref = AutoModelForCausalLM.from_pretrained(d + "-dense", dtype=torch.float32).eval()
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float16, device_map="cpu").eval()
        kinds = {type(m).__name__ for m in hf.modules() if "gptqmodel" in type(m).__module__}
        assert kinds, "transformers did not build gptqmodel quantized linears"
        with torch.no_grad():
            diff = (hf(ids).logits.float() - ref(ids).logits.float()).abs().max().item()
        mean_hf, count = loader_perplexity(hf, enc, 128)
        line = f"{name}: loader {sorted(kinds)}; max |Δlogit| vs independent dequantizer (fp32) {diff:.4f} (tol {LOGIT_TOL})"
        for dtype in ["fp32"]:
            res = run_json(["eval", "perplexity", "--model", d, "--data", held, "--max-length", 128, "--dtype", dtype,
                            "--threads", 2, "--json"])
            assert res["tokens"] == enc.shape[1] and res["scored_tokens"] == count, (res, enc.shape, count)
            rel = abs(res["mean_nll"] - mean_hf) / mean_hf
            line += f"; llmtune {dtype} ppl {math.exp(res['mean_nll']):.4f} vs loader {math.exp(mean_hf):.4f} (rel NLL {rel:.1e})"
            assert rel <= PPL_TOL, line
        print(line)
        assert diff <= LOGIT_TOL, line
        json.load(open(os.path.join(d, "config.json")))  # still a valid config after the loader read it

    shutil.rmtree(tmp, ignore_errors=True)
    print(f"ok ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
