#!/usr/bin/env python3
"""Makes the quickstart's instruction data: a synthetic chat task with a checkable answer
("Last word: fox dog data" -> "data") over words the demo tokenizer knows, as train.jsonl and
a held-out.jsonl whose prompts never occur in training. Deterministic (seeded).
Usage: make_demo_data.py --out DIR [--train N] [--held-out N]"""
import argparse
import json
import os
import random

WORDS = ["word", "token", "model", "piece", "text", "quick", "brown", "fox", "jumps", "lazy", "dog", "capital",
         "France", "Paris", "little", "data", "task", "Numbers", "digits", "groups", "beginning", "predicts",
         "next", "splits", "adapts", "pretrained"]


def task(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ws = [rng.choice(WORDS) for _ in range(3)]
        rows.append({"messages": [{"role": "user", "content": "Last word: " + " ".join(ws)},
                                  {"role": "assistant", "content": ws[-1]}]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--held-out", type=int, default=40)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    train = task(a.train, seed=1)
    seen = {r["messages"][0]["content"] for r in train}
    held = [r for r in task(20 * a.held_out, seed=2) if r["messages"][0]["content"] not in seen][:a.held_out]
    for name, rows in [("train.jsonl", train), ("held-out.jsonl", held)]:
        with open(os.path.join(a.out, name), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"demo data: {len(train)} training and {len(held)} held-out examples in {a.out}")


if __name__ == "__main__":
    main()
