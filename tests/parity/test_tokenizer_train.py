"""`llmtune tokenizer train` against the references: for BPE and Unigram, the written tokenizer.json
(run by HF `tokenizers`) gives exactly sentencepiece's ids on held-out text, decodes back to it, and
loads in transformers' AutoTokenizer (ids, specials, chat template) and in llmtune's own tokenizer;
training twice gives byte-identical files. Text: seeded pseudo-English with digits, punctuation,
accents, CJK and emoji (byte fallback), generated here, so the test is offline and deterministic."""
import json
import os
import random
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import run  # noqa: E402

import sentencepiece as spm  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

SYL = ["ka", "lo", "ri", "the", "an", "ster", "mo", "ing", "ed", "qu", "ar", "el", "on", "is", "tion", "pre", "un",
       "ble", "ous", "ver", "sh", "th", "ce", "ly", "ment"]
EXTRA = ["1999", "42", "3.14", "café", "naïve", "Zürich", "東京", "😀", "C++", "e-mail", "(see", "above)", "—", "don't"]


def text(rng, n_lines):
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(3, 18)):
            if rng.random() < 0.08:
                words.append(rng.choice(EXTRA))
            else:
                w = "".join(rng.choice(SYL) for _ in range(rng.randint(1, 3)))
                words.append(w.capitalize() if rng.random() < 0.1 else w)
        sep = rng.choice([" ", " ", " ", "  ", ", "])
        lines.append(sep.join(words) + rng.choice([".", "?", "!", ""]))
    return lines


def main():
    rng = random.Random(20240521)
    tmp = tempfile.mkdtemp(prefix="llmtune-toktrain-")
    try:
        train = os.path.join(tmp, "train.txt")
        with open(train, "w") as f:
            f.write("\n".join(text(rng, 4000)) + "\n")
        held = text(random.Random(7), 400) + ["  leading spaces", "trailing  ", "tab\there", "a\nb", "", " ", "ÿ̈ 𝔘"]
        for kind in ("bpe", "unigram"):
            out = os.path.join(tmp, kind)
            run(["tokenizer", "train", "--input", train, "--vocab-size", 700, "--type", kind, "--out", out, "--threads", 1])
            sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer.model"))
            hf = Tokenizer.from_file(os.path.join(out, "tokenizer.json"))
            assert sp.get_piece_size() == 700 == hf.get_vocab_size(), (sp.get_piece_size(), hf.get_vocab_size())
            mism = 0
            for line in held:
                ref = sp.encode(line)
                got = hf.encode(line, add_special_tokens=False).ids
                if got != ref:
                    mism += 1
                    print(f"{kind}: {line!r}\n  sentencepiece {ref}\n  tokenizer.json {got}")
                assert hf.encode(line).ids == [1] + ref
                assert hf.decode(ref) == sp.decode(ref), (line, hf.decode(ref), sp.decode(ref))
            assert mism == 0, f"{kind}: {mism} of {len(held)} held-out lines differ"
            # transformers loads it: BOS added, specials, chat template with the reserved chat markers.
            at = AutoTokenizer.from_pretrained(out)
            line = held[0]
            assert at(line)["input_ids"] == [1] + sp.encode(line)
            assert (at.bos_token_id, at.eos_token_id, at.unk_token_id) == (1, 2, 0)
            assert at.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [3, 4]
            chat = at.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=False,
                                          add_generation_prompt=True)
            assert chat.startswith("<|im_start|>user\nHi there<|im_end|>"), chat
            ids = at.apply_chat_template([{"role": "user", "content": "Hi there"}], tokenize=True, add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ids.count(3) == 2 and ids.count(4) == 1, ids
            # llmtune's own tokenizer (tokenizer.json for BPE, tokenizer.model for Unigram) agrees.
            lines_file = os.path.join(tmp, "held.txt")
            sample = [l for l in held[:60] if l.strip() and "\n" not in l]
            with open(lines_file, "w") as f:
                f.write("\n".join(sample) + "\n")
            got = [json.loads(l) for l in run(["tokenize", "--model", out, "--file", lines_file, "--json"]).stdout.splitlines() if l.strip()]
            assert got == [[1] + sp.encode(l) for l in sample], kind
            chat_ids = json.loads(run(["tokenize", "--model", out, "--text", chat, "--json"]).stdout.strip())
            assert chat_ids == at(chat)["input_ids"], (chat_ids, at(chat)["input_ids"])
            # Deterministic: a second training run writes the same files.
            again = os.path.join(tmp, kind + "-again")
            run(["tokenizer", "train", "--input", train, "--vocab-size", 700, "--type", kind, "--out", again, "--threads", 1])
            for f in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
                assert open(os.path.join(out, f), "rb").read() == open(os.path.join(again, f), "rb").read(), f
            print(f"{kind}: {len(held)} held-out lines identical to sentencepiece; AutoTokenizer and llmtune agree")
        # Errors for people.
        p = run(["tokenizer", "train", "--input", train, "--vocab-size", 100, "--out", os.path.join(tmp, "x")], check=False)
        assert p.returncode != 0 and "reserved" in p.stderr, p.stderr
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
