# ctest-processors: 2
"""`llmtune quantize --format gptq|awq` end to end on the pretrained default model:
- the checkpoints follow the Hugging Face layouts: an independent pure-Python reader (written from
  formats.md §8: GPTQ v1 qweight/qzeros(+1)/scales/g_idx, AWQ GEMM with the [0,2,4,6,1,3,5,7]
  nibble order) dequantizes them into a plain checkpoint, and llmtune's perplexity on that equals its
  perplexity on the quantized directory (rel. 1e-4); transformers parses quantization_config;
- GPTQ and AWQ (4-bit, one group per row) beat round-to-nearest at the same bits and group size on
  held-out text; act-order + symmetric GPTQ and AWQ at group 64 are layout-checked;
- bad input (missing --calib file, group size not dividing the widths, unsupported bits) fails clearly.
The model is the committed models/default (or LLMTUNE_DEFAULT_MODEL); the calibration and held-out text
come from scripts/data/make_data.py (Debian packages, installed by scripts/setup.sh)."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, SOURCE, run  # noqa: E402

LAYOUT_GROUP = 64  # the default model's intermediate_size 704 is not a multiple of 128
# At 4 bits with groups of 64 this small model loses only ~0.05% perplexity to plain rounding (within
# noise of the methods' differences); one group per row (-1) is where rounding visibly hurts, so the
# quality comparison runs there (same bits, same group size for every method).
QUALITY_GROUP = -1


def find_base():
    for c in [os.environ.get("LLMTUNE_DEFAULT_MODEL"), os.path.join(SOURCE, "models", "default")]:
        if c and os.path.exists(os.path.join(c, "model.safetensors")):
            return c
    raise SystemExit("FAIL: no default model: models/default is missing and LLMTUNE_DEFAULT_MODEL is unset")


def find_data(base):
    """The corpus from scripts/data/make_data.py (LLMTUNE_DEFAULT_DATA, else generated once into the fixtures)."""
    c = os.environ.get("LLMTUNE_DEFAULT_DATA")
    if c and glob.glob(os.path.join(c, "corpus", "*.txt")) and glob.glob(os.path.join(c, "corpus_test", "*.txt")):
        return c
    out = os.path.join(FIXTURES, "default-data")
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "data", "make_data.py"), "--out", out,
                    "--max-wordnet", "100"], check=True, capture_output=True)
    return out


def sample_text(files, per_file):
    out = []
    for f in sorted(files):
        with open(f, encoding="utf-8", errors="replace") as fh:
            out.append(fh.read(per_file))
    return "\n\n".join(out)


def ppl(model, data):
    p = run(["eval", "perplexity", "--model", model, "--data", data, "--max-length", 256, "--dtype", "fp32", "--threads", 1])
    m = re.search(r"perplexity ([0-9.]+)", p.stdout)
    assert m, p.stdout
    return float(m.group(1))


# ---- an independent reader of the two layouts ---------------------------------------------------

def unpack_rows(words, bits):
    """int32 [r, c] -> [r, c * 32/bits], value k of word (i, j) at column j*per + k, lowest bits first."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    parts = [(w >> (bits * k)) & ((1 << bits) - 1) for k in range(per)]
    return torch.stack(parts, dim=2).reshape(words.shape[0], -1)


def dequant_gptq(t, prefix, bits, v2=False):
    qweight, qzeros, scales, g_idx = (t[prefix + s] for s in (".qweight", ".qzeros", ".scales", ".g_idx"))
    q = unpack_rows(qweight.t().contiguous(), bits).t()  # [in, out]: packed along the input dim
    z = unpack_rows(qzeros, bits) + (0 if v2 else 1)     # v1 stores zero - 1
    g = g_idx.long()
    w = (q.float() - z[g].float()) * scales.float()[g]
    return w.t().contiguous()                            # [out, in]


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def dequant_awq(t, prefix, group):
    qweight, qzeros, scales = (t[prefix + s] for s in (".qweight", ".qzeros", ".scales"))
    def unpack(words):
        raw = unpack_rows(words, 4).view(words.shape[0], -1, 8)  # nibble k of word c = column 8c + ORDER[k]
        out = torch.empty_like(raw)
        out[:, :, AWQ_ORDER] = raw
        return out.reshape(words.shape[0], -1)
    q, z = unpack(qweight), unpack(qzeros)                        # [in, out], [G, out]
    g = torch.arange(q.shape[0]) // (q.shape[0] if group == -1 else group)
    w = (q.float() - z[g].float()) * scales.float()[g]
    return w.t().contiguous()


def to_dense_checkpoint(qdir, out):
    cfg = json.load(open(os.path.join(qdir, "config.json")))
    qc = cfg.pop("quantization_config")
    t = load_file(os.path.join(qdir, "model.safetensors"))
    dense = {}
    for name, v in t.items():
        if name.endswith(".qweight"):
            p = name[: -len(".qweight")]
            if qc["quant_method"] == "gptq":
                dense[p + ".weight"] = dequant_gptq(t, p, qc["bits"], qc.get("checkpoint_format") == "gptq_v2")
            else:
                dense[p + ".weight"] = dequant_awq(t, p, qc["group_size"])
        elif not re.search(r"\.(qzeros|scales|g_idx)$", name):
            dense[name] = v.float()
    os.makedirs(out, exist_ok=True)
    save_file(dense, os.path.join(out, "model.safetensors"))
    cfg["dtype"] = cfg["torch_dtype"] = "float32"
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    for f in os.listdir(qdir):
        if f.startswith("tokenizer") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(qdir, f), out)
    return qc, t


def check_config(qc):
    from transformers.utils.quantization_config import AwqConfig, GPTQConfig
    try:
        cls = GPTQConfig if qc["quant_method"] == "gptq" else AwqConfig
        c = cls.from_dict(dict(qc))
    except ImportError as e:  # some versions insist on optimum/gptqmodel being importable
        print(f"note: transformers could not build the config object ({e}); keys checked by hand")
        return
    assert c.bits == qc["bits"] and c.group_size == qc["group_size"], (c, qc)


def quantize(base, out, fmt, group, *extra):
    return run(["quantize", "--model", base, "--format", fmt, "--out", out, "--bits", 4, "--group-size", group,
                "--threads", 1, *extra])  # small layers: one thread beats two on a loaded machine


def main():
    base = find_base()
    data = find_data(base)
    tmp = tempfile.mkdtemp(prefix="llmtune-gptq-")
    calib = os.path.join(tmp, "calib.txt")
    open(calib, "w").write(sample_text(glob.glob(os.path.join(data, "corpus", "*.txt")), 120_000))
    held = os.path.join(tmp, "held-out.txt")
    open(held, "w").write(sample_text(glob.glob(os.path.join(data, "corpus_test", "bible-kjv.txt")), 40_000))
    cal = ["--calib", calib, "--calib-samples", 16, "--calib-seqlen", 256]

    # ---- bad input ----
    p = run(["quantize", "--model", base, "--format", "gptq", "--out", os.path.join(tmp, "x"), "--calib",
             os.path.join(tmp, "missing.txt")], check=False)
    assert p.returncode != 0 and "missing.txt" in p.stderr and "does not exist" in p.stderr, p.stderr
    p = run(["quantize", "--model", base, "--format", "gptq", "--out", os.path.join(tmp, "x"), "--bits", 3, *cal], check=False)
    assert p.returncode != 0 and "--bits 3" in p.stderr, p.stderr
    p = run(["quantize", "--model", base, "--format", "gptq", "--out", os.path.join(tmp, "x"), "--group-size", 100, *cal],
            check=False)
    assert p.returncode != 0 and "--group-size 100 does not divide" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(tmp, "x"))

    # ---- quantize ----
    runs = {
        "gptq": ["gptq", QUALITY_GROUP, *cal],
        "gptq-actorder-sym-g64": ["gptq", LAYOUT_GROUP, "--act-order", "--sym", *cal],
        "rtn": ["gptq", QUALITY_GROUP, "--rtn"],
        "awq": ["awq", QUALITY_GROUP, *cal],
        "awq-rtn-g64": ["awq", LAYOUT_GROUP, "--rtn"],
        "awq-rtn": ["awq", QUALITY_GROUP, "--rtn"],
    }
    dirs = {}
    for name, (fmt, group, *extra) in runs.items():
        dirs[name] = os.path.join(tmp, name)
        out = quantize(base, dirs[name], fmt, group, *extra).stdout
        print(f"{name}: {out.strip()}")

    # ---- layout: independent reader == llmtune's reader; transformers parses the config ----
    results = {"base (fp32)": ppl(base, held)}
    for name, d in dirs.items():
        qc, t = to_dense_checkpoint(d, d + "-dense")
        check_config(qc)
        if qc["quant_method"] == "gptq":
            group = runs[name][1]
            assert qc["checkpoint_format"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == group, qc
            special = name == "gptq-actorder-sym-g64"
            assert qc["desc_act"] == special and qc["sym"] == special, qc
            q = t["model.layers.0.self_attn.q_proj.qweight"]
            hidden = json.load(open(os.path.join(d, "config.json")))["hidden_size"]
            assert q.dtype == torch.int32 and tuple(q.shape) == (hidden // 8, hidden), q.shape
            assert tuple(t["model.layers.0.self_attn.q_proj.g_idx"].shape) == (hidden,)
            groups = 1 if group == -1 else hidden // group
            assert tuple(t["model.layers.0.self_attn.q_proj.scales"].shape) == (groups, hidden)
            assert t["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float16
            if special:  # symmetric 4-bit: zero 8, stored as 7 in every nibble (v1)
                assert (t["model.layers.0.mlp.down_proj.qzeros"] == 0x77777777).all()
                g = t["model.layers.0.mlp.down_proj.g_idx"]
                assert not bool((g[1:] >= g[:-1]).all()), "act-order g_idx should not be monotonic"
        else:
            assert qc["version"] == "gemm" and qc["zero_point"] is True, qc
            q = t["model.layers.0.mlp.down_proj.qweight"]
            cfg = json.load(open(os.path.join(d, "config.json")))
            assert tuple(q.shape) == (cfg["intermediate_size"], cfg["hidden_size"] // 8), q.shape
            groups = 1 if runs[name][1] == -1 else cfg["intermediate_size"] // runs[name][1]
            assert tuple(t["model.layers.0.mlp.down_proj.qzeros"].shape) == (groups, cfg["hidden_size"] // 8)
        a, b = ppl(d, held), ppl(d + "-dense", held)
        assert abs(a - b) <= 1e-4 * b, f"{name}: llmtune reads {a}, the independent reader's weights give {b}"
        results[name] = a

    print(json.dumps(results, indent=1))
    assert results["gptq"] < results["rtn"], results
    assert results["awq"] < results["awq-rtn"], results
    assert results["awq"] < results["rtn"], results
    # Rounding visibly hurts; GPTQ is a real quantization but can land within noise of the original,
    # even just below it (85.3739 vs 85.3761 with this corpus, same with the old exporter).
    assert results["base (fp32)"] < results["rtn"], results
    assert results["gptq"] != results["base (fp32)"], results
    shutil.rmtree(tmp, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
