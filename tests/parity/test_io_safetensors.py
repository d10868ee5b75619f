#!/usr/bin/env python3
"""Parity of llmtune::io with the reference safetensors writer/reader, both directions.

1. Makes sure scripts/fixtures/io_safetensors.py has written OUT/io/py (files from safetensors.torch
   .save_file and huggingface_hub.save_torch_state_dict).
2. Runs the unit-test binary `test_io "[parity]"` (llmtune reads those files and checks the exact
   values) and `test_io "[write-fixture]"` (llmtune re-saves them into a temp dir).
3. Reads llmtune's files with the safetensors package: same dtypes/shapes/bits, byte-identical to
   safetensors.torch.save for the single file, same shard split/index as huggingface_hub.
The test binary is $LLMTUNE_TEST_IO, else test_io next to $LLMTUNE_BIN, else in the parent of
$LLMTUNE_FIXTURES (the build dir).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

src = Path(os.environ.get("LLMTUNE_SOURCE_DIR", Path(__file__).resolve().parents[2]))
fixtures = Path(os.environ.get("LLMTUNE_FIXTURES", src / "build" / "fixtures"))
sys.path.insert(0, str(src / "scripts" / "fixtures"))
import io_safetensors  # noqa: E402


def find_test_binary():
    cands = []
    if os.environ.get("LLMTUNE_TEST_IO"):
        cands.append(Path(os.environ["LLMTUNE_TEST_IO"]))
    if os.environ.get("LLMTUNE_BIN"):
        cands.append(Path(os.environ["LLMTUNE_BIN"]).parent / "test_io")
    cands.append(fixtures.parent / "test_io")
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    sys.exit("test_io binary not found (tried %s); build it or set LLMTUNE_TEST_IO" % ", ".join(map(str, cands)))


def bits_equal(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def main():
    subprocess.run([sys.executable, str(src / "scripts" / "fixtures" / "io_safetensors.py"), "--out", str(fixtures)],
                   check=True)
    binary = find_test_binary()
    env = dict(os.environ, LLMTUNE_FIXTURES=str(fixtures))
    subprocess.run([str(binary), "[parity]"], check=True, env=env)

    ref = io_safetensors.tensors()
    with tempfile.TemporaryDirectory(prefix="llmtune-io-parity-") as tmp:
        out = Path(tmp)
        subprocess.run([str(binary), "[write-fixture]"], check=True, env=dict(env, LLMTUNE_IO_OUT=str(out)))

        # Single file: values, metadata, and the exact bytes of the reference writer.
        got = load_file(str(out / "all.safetensors"))
        assert set(got) == set(ref), set(got) ^ set(ref)
        for k, v in ref.items():
            assert bits_equal(got[k], v), k
        with safe_open(str(out / "all.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}, f.metadata()
        ours = (out / "all.safetensors").read_bytes()
        theirs = save(ref, metadata={"format": "pt"})
        assert ours == theirs, "llmtune's file differs from safetensors.torch.save (%d vs %d bytes)" % (
            len(ours), len(theirs))

        # Sharded: same split and index as huggingface_hub, every shard readable by safetensors.
        expected = json.loads((fixtures / "io" / "py" / "expected.json").read_text())
        index = json.loads((out / "sharded" / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == expected["weight_map"], index["weight_map"]
        assert index["metadata"]["total_size"] == expected["total_size"], index["metadata"]
        for name, shard in index["weight_map"].items():
            with safe_open(str(out / "sharded" / shard), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                assert bits_equal(f.get_tensor(name), ref[name]), name
            theirs_shard = (fixtures / "io" / "py" / "sharded" / shard).read_bytes()
            assert (out / "sharded" / shard).read_bytes() == theirs_shard, "shard %s differs from huggingface_hub's" % shard

        # Non-contiguous input is stored as its contiguous values.
        t = load_file(str(out / "transposed.safetensors"))["t"]
        assert torch.equal(t, ref["f32.matrix"].t().contiguous())
    print("io safetensors parity: ok (%d tensors, both directions, byte-identical files)" % len(ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
