"""Bad input gets the message a user needs, through the real binary: a truncated safetensors
file, a wrong tensor shape, a missing tokenizer, an unknown recipe key, an unsupported
model_type, a pickle-only checkpoint; plus --help/--version and the command table."""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import BIN, FIXTURES, demo_model, run  # noqa: E402

work = os.path.join(FIXTURES, "cli-errors")
shutil.rmtree(work, ignore_errors=True)
os.makedirs(work)
demo = demo_model()


def expect_error(args, *needles):
    p = run(args, check=False)
    assert p.returncode == 1, f"expected exit 1 from {args}, got {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr and "c10::" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, f"expected {n!r} in the error of {args}:\n{p.stderr}"
    print(f"ok: {' '.join(map(str, args[:2]))}: {p.stderr.strip().splitlines()[-1][:160]}")


def copy_demo(name):
    d = os.path.join(work, name)
    shutil.copytree(demo, d)
    return d


# Help, version, and only working commands in the table.
p = run(["--help"])
for cmd in ["generate", "eval", "inspect", "tokenize"]:
    assert cmd in p.stdout, p.stdout
version = run(["--version"]).stdout
assert "llmtune" in version, version
# scripts/setup.sh installs libjemalloc-dev, so the build links jemalloc (CMakeLists.txt says why);
# check that it is the allocator in use, not only named: jemalloc answers MALLOC_CONF at exit.
assert "allocator: jemalloc" in version, version
stats = subprocess.run([BIN, "--version"], env=dict(os.environ, MALLOC_CONF="stats_print:true"), capture_output=True,
                       text=True, timeout=60)
assert "jemalloc statistics" in stats.stdout + stats.stderr, "jemalloc is linked but not the active malloc"

# Truncated safetensors: names the file, the tensor and what to do.
d = copy_demo("truncated")
st = os.path.join(d, "model.safetensors")
size = os.path.getsize(st)
with open(st, "r+b") as f:
    f.truncate(size - 1000)
expect_error(["generate", "--model", d, "--prompt", "hi"], "model.safetensors", "truncated", "re-download")

# Wrong shape: config says more KV heads than the weights hold.
d = copy_demo("wrong-shape")
cfg = json.load(open(os.path.join(d, "config.json")))
cfg["num_key_value_heads"] = cfg["num_attention_heads"]
json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
expect_error(["generate", "--model", d, "--prompt", "hi"], "k_proj.weight", "has shape", "num_key_value_heads")

# Missing tokenizer.
d = copy_demo("no-tokenizer")
for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]:
    if os.path.exists(os.path.join(d, f)):
        os.remove(os.path.join(d, f))
expect_error(["generate", "--model", d, "--prompt", "hi"], "no tokenizer", "tokenizer.json or tokenizer.model")

# Unsupported model_type lists the supported ones.
d = copy_demo("gpt2-type")
cfg["model_type"] = "gpt2"
cfg["num_key_value_heads"] = 2
json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
expect_error(["generate", "--model", d, "--prompt", "hi"], "gpt2", "llama", "mistral", "qwen2")

# Pickle-only checkpoints are refused with the conversion recipe.
d = copy_demo("pickle")
os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
expect_error(["generate", "--model", d, "--prompt", "hi"], "pickle", "safe_serialization")

# Unknown recipe key with did-you-mean and file:line:column.
recipe = os.path.join(work, "typo.yaml")
open(recipe, "w").write("base_model: ./m\nlora_r: 8\nlora_alhpa: 16\n")
expect_error(["inspect", recipe], "lora_alhpa", "typo.yaml:3:1", "did you mean `lora_alpha`")

# Contradictory keys.
open(recipe, "w").write("base_model: ./m\nwarmup_steps: 10\nwarmup_ratio: 0.1\n")
expect_error(["inspect", recipe], "warmup_steps", "warmup_ratio")

# --set with an unknown key.
open(recipe, "w").write("base_model: ./m\n")
expect_error(["inspect", recipe, "--set", "learning_rte=1e-4"], "learning_rte", "learning_rate")

# Malformed JSONL in eval names file:line.
bad = os.path.join(work, "bad.jsonl")
open(bad, "w").write('{"text": "fine"}\n{"text": broken\n')
expect_error(["eval", "perplexity", "--model", demo, "--data", bad], "bad.jsonl:2", "malformed JSON")

# Hub id with no cache and offline mode: says what is missing and where it looked.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = os.path.join(work, "empty-hub-cache")
expect_error(["generate", "--model", "someorg/some-model", "--prompt", "hi"], "someorg/some-model", "HF_HUB_OFFLINE")
print("all CLI error checks passed")
