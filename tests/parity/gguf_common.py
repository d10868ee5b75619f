"""Shared by the GGUF parity tests and scripts/bench/quantize.py: export with llmtune, read a GGUF
back with the `gguf` package (dequantized by gguf.quants, Q/K rows un-permuted) into a transformers
model, and run a file in llama.cpp (llama-cpp-python) to get its logits."""
import os
import subprocess
import sys
import time

import numpy as np

TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q6_k", "q5_k_m", "q4_k_m", "q3_k_m", "q2_k"]


def quantize(bin_path, model_dir, gtype, out):
    t0 = time.time()
    p = subprocess.run([bin_path, "quantize", "--model", model_dir, "--format", "gguf", "--type", gtype, "--out", out],
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        sys.exit(f"llmtune quantize --type {gtype} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return time.time() - t0, p.stdout


def unpermute(w, n_head):
    """llama.cpp's adjacent-pair rows back to HF's half-split rows (inverse of the export)."""
    rows = w.shape[0]
    d = rows // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_to_state_dict(path):
    """HF-named fp32 tensors from a GGUF file, dequantized by gguf.quants."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    r = GGUFReader(path)
    f = {k: r.fields[k] for k in r.fields}
    n_head = int(f["llama.attention.head_count"].parts[-1][0])
    n_kv = int(f["llama.attention.head_count_kv"].parts[-1][0])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    sd = {}
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape.tolist())]
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        n = t.name
        if n == "token_embd.weight": hf = "model.embed_tokens.weight"
        elif n == "output_norm.weight": hf = "model.norm.weight"
        elif n == "output.weight": hf = "lm_head.weight"
        else:
            _, layer, kind, suffix = n.split(".")
            hf = f"model.layers.{layer}.{names[kind]}.{suffix}"
            if kind == "attn_q": w = unpermute(w, n_head)
            if kind == "attn_k": w = unpermute(w, n_kv)
        sd[hf] = torch.from_numpy(np.ascontiguousarray(w))
    return sd


def hf_model_from_gguf(model_dir, path):
    """The checkpoint's architecture with the GGUF file's (dequantized) weights, fp32."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    sd = gguf_to_state_dict(path)
    missing, unexpected = m.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and m.config.tie_word_embeddings)]
    assert not missing and not unexpected, (missing, unexpected)
    if m.config.tie_word_embeddings:
        m.tie_weights()
    return m.eval()


def torch_logits(model, ids):
    import torch
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def nll(logits, ids):
    """Mean NLL of ids[1:] given logits rows [:-1] (fp64)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    lp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-lp[np.arange(len(ids) - 1), ids[1:]].mean())


class LlamaCpp:
    """One GGUF file loaded in llama.cpp, CPU, all logits kept. The KV cache is f32 (llama.cpp's
    default is f16) so that the comparisons measure the file and llama.cpp's matmuls, not the cache."""

    def __init__(self, path, n_ctx=256):
        from llama_cpp import Llama
        f32 = 0  # GGML_TYPE_F32
        self.llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                         n_threads=2, seed=0, type_k=f32, type_v=f32)

    def logits(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids, n, eos=None):
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            if eos is not None and tok in eos:
                break
            self.llm.eval([tok])
        return out

    def tokenize(self, text, add_bos):
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def close(self):
        self.llm.close() if hasattr(self.llm, "close") else None
