"""Helpers for the end-to-end tests: where the binary and fixtures are, running llmtune, and
the demo checkpoint (a tiny Llama with a trained byte-level BPE tokenizer and a chat template)."""
import json
import os
import subprocess
import sys

SOURCE = os.environ.get("LLMTUNE_SOURCE_DIR", os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
BIN = os.environ.get("LLMTUNE_BIN", os.path.join(SOURCE, "build", "llmtune"))
FIXTURES = os.environ.get("LLMTUNE_FIXTURES", os.path.join(SOURCE, "build", "fixtures"))


def run(args, check=True, stdin=None):
    """Runs llmtune with args; returns the CompletedProcess (text mode)."""
    p = subprocess.run([BIN] + [str(a) for a in args], capture_output=True, text=True, input=stdin, timeout=600)
    if check and p.returncode != 0:
        sys.exit(f"llmtune {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def run_json(args):
    out = run(args).stdout.strip().splitlines()
    return json.loads(out[-1])


def demo_model():
    """The quickstart's demo checkpoint, made once into the fixtures directory."""
    out = os.path.join(FIXTURES, "demo-model")
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "make_demo_model.py"), "--out", out],
                   check=True, capture_output=True)
    return out


def model_fixture(name):
    path = os.path.join(FIXTURES, "model", name)
    if not os.path.isdir(path):
        sys.exit(f"missing fixture {path}: run scripts/fixtures/make_all.sh")
    return path
