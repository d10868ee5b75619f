#!/usr/bin/env python3
"""Deterministic data for the embedded default model, from Debian packages (public domain or
permissive; licences recorded in OUT/LICENSES.json):

  corpus/   pretraining text: King James Bible (bible-kjv), Jargon File (jargon-text), Devil's
            Dictionary (dict-devil); one paragraph per document, held-out tail in corpus_test/
  sft_{train,test}.jsonl    chat examples {"messages": [...], "category", "source"}:
            bsdgames quiz pairs ("What is the capital of Algeria?" -> "Algiers"), fortune riddles,
            WordNet glosses ("Define 'X'." -> gloss)
  pref_{train,test}.jsonl   {"prompt": [user message], "chosen", "rejected", "category"}: rejected is
            another item's answer from the same category (a hard negative)

Usage: scripts/data/make_data.py --out DIR [--max-wordnet N] [--test-fraction 0.1]
Needs: apt-get install bible-kjv jargon-text dict-devil wordnet-base bsdgames fortunes-min
Every source file is pinned by sha256 (a changed upstream fails loudly). Idempotent: skips work
whose output exists (delete DIR to rebuild). Deterministic: splits by a hash of the prompt."""
import argparse
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import unicodedata
import subprocess
import sys

QUIZ = "/usr/share/games/bsdgames/quiz"
FORTUNES = "/usr/share/games/fortunes"
WORDNET = "/usr/share/wordnet"

# sha256 of every file read (Debian bookworm versions); --no-verify skips the check.
PINS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pins.json")

LICENSES = {
    "bible-kjv": "King James Version text: public domain (Debian package bible-kjv, copyright file /usr/share/doc/bible-kjv/copyright)",
    "jargon-text": "The Jargon File 4.4.7: public domain (/usr/share/doc/jargon-text/copyright)",
    "dict-devil": "Ambrose Bierce, The Devil's Dictionary (1911): public domain (/usr/share/doc/dict-devil/copyright)",
    "bsdgames": "quiz data files from BSD games: BSD licence (/usr/share/doc/bsdgames/copyright)",
    "fortunes-min": "fortune riddles: BSD licence / public domain (/usr/share/doc/fortunes-min/copyright)",
    "wordnet-base": "WordNet 3.0, Princeton University: WordNet licence (permissive, keep the notice; /usr/share/doc/wordnet-base/copyright)",
}

# quiz file -> (question template, answer column, question column, category). Columns per quiz/index.
QUIZ_TASKS = [
    ("africa", "What is the capital of {q}?", 1, 0, "capital"),
    ("america", "What is the capital of {q}?", 1, 0, "capital"),
    ("asia", "What is the capital of {q}?", 1, 0, "capital"),
    ("europe", "What is the capital of {q}?", 1, 0, "capital"),
    ("province", "What is the capital of {q}?", 1, 0, "capital"),
    ("state", "What is the capital of {q}?", 1, 0, "capital"),
    ("state", "What is the state flower of {q}?", 3, 0, "state_flower"),
    ("elements", "Which chemical element has the symbol {q}?", 3, 0, "element_name"),
    ("elements", "What is the chemical symbol of {q}?", 0, 3, "element_symbol"),
    ("elements", "What is the atomic number of {q}?", 1, 3, "atomic_number"),
    ("babies", "What is a baby {q} called?", 0, 1, "baby_animal"),
    ("collectives", "What is a group of {q} called?", 1, 0, "collective"),
    ("sexes", "What is the female counterpart of a {q}?", 1, 0, "female"),
    ("latin", "What does the Latin word '{q}' mean?", 1, 0, "latin"),
    ("greek", "What does the Greek letter or word '{q}' mean?", 1, 0, "greek"),
    ("murders", "Who killed {q}?", 1, 0, "killer"),
    ("pres", "Who succeeded {q} as president?", 3, 0, "successor"),
]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


class Pins:
    def __init__(self, verify, record):
        self.verify, self.record = verify, record
        self.pins = json.load(open(PINS_FILE)) if os.path.exists(PINS_FILE) else {}
        self.used = {}

    def check(self, path):
        d = sha256(path)
        self.used[path] = d
        if self.record:
            self.pins[path] = d
        elif self.verify and self.pins.get(path) != d:
            sys.exit(f"make_data: {path} has sha256 {d}, pinned {self.pins.get(path)}; the Debian package changed. "
                     f"Check the new data, then re-pin with --record-pins")
        return path

    def save(self):
        if self.record:
            json.dump(dict(sorted(self.pins.items())), open(PINS_FILE, "w"), indent=1)


def need(path, pkg):
    if not os.path.exists(path):
        sys.exit(f"make_data: {path} is missing; install the Debian package: apt-get install {pkg}")


def canonical(s):
    """First alternative of the quiz syntax: a|b -> a, {x} -> x (optional text kept), [a|b] -> a."""
    def first(alts):
        depth, cur = 0, ""
        for ch in alts:
            if ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
            if ch == "|" and depth == 0:
                return cur
            cur += ch
        return cur
    s = first(s)
    while True:
        m = re.search(r"[\{\[]([^\{\}\[\]]*)[\}\]]", s)
        if not m:
            break
        s = s[:m.start()] + first(m.group(1)) + s[m.end():]
    return s.replace("\\", "").strip()


# Quiz files spell accented letters as typewriter overstrikes: "'", backspace, "e" (or "e", backspace, "'").
OVERSTRIKE_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", '"': "\u0308", "~": "\u0303", ",": "\u0327"}


def resolve_overstrikes(s):
    """'\be -> é: an accent struck over a letter (either order) becomes the precomposed letter."""
    def compose(m):
        a, b = m.group(1), m.group(2)
        accent, letter = (a, b) if a in OVERSTRIKE_ACCENTS else (b, a)
        if accent not in OVERSTRIKE_ACCENTS:
            return letter
        return unicodedata.normalize("NFC", letter + OVERSTRIKE_ACCENTS[accent])
    return re.sub(r"(.)\x08(.)", compose, s)


def quiz_items(pins):
    items = []
    for fname, template, ans_col, q_col, cat in QUIZ_TASKS:
        path = os.path.join(QUIZ, fname)
        need(path, "bsdgames")
        pins.check(path)
        for line in open(path, encoding="latin-1"):
            line = resolve_overstrikes(line.rstrip("\n"))
            if not line or line.startswith("#"):
                continue
            cols = re.split(r"(?<!\\):", line)
            if len(cols) <= max(ans_col, q_col):
                continue
            q, a = canonical(cols[q_col]), canonical(cols[ans_col])
            if q and a:
                items.append({"category": cat, "source": f"bsdgames:quiz/{fname}", "prompt": template.format(q=q), "answer": a})
    return items


def riddle_items(pins):
    path = os.path.join(FORTUNES, "riddles")
    need(path, "fortunes-min")
    pins.check(path)
    items = []
    for block in open(path, encoding="utf-8", errors="replace").read().split("\n%\n"):
        # Q: and A: in either order (the "questions for the great answers" put A: first).
        fields = dict((k, " ".join(v.split())) for k, v in re.findall(r"^([QA]):\s*(.*?)(?=^[QA]:|\Z)", block, re.S | re.M))
        q, a = fields.get("Q", ""), fields.get("A", "")
        if q and a:
            items.append({"category": "riddle", "source": "fortunes-min:riddles", "prompt": q, "answer": a})
    return items


def wordnet_items(pins, max_items):
    items = []
    for pos, name in (("noun", "noun"), ("verb", "verb"), ("adj", "adjective"), ("adv", "adverb")):
        index, data = os.path.join(WORDNET, f"index.{pos}"), os.path.join(WORDNET, f"data.{pos}")
        need(data, "wordnet-base")
        pins.check(index)
        pins.check(data)
        glosses = {}
        with open(data, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue
                off = line.split(" ", 1)[0]
                gloss = line.split("|", 1)[1].strip()
                gloss = gloss.split('; "')[0].split(';  "')[0].strip().rstrip(";").strip()
                glosses[off] = gloss
        with open(index, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue
                parts = line.split()
                lemma = parts[0]
                if not re.fullmatch(r"[a-z]{3,}", lemma):
                    continue
                n_synsets = int(parts[2])
                first_sense = parts[-n_synsets]  # offsets are listed most frequent sense first
                g = glosses.get(first_sense)
                if g:
                    items.append({"category": f"define_{name}", "source": f"wordnet-base:{pos}",
                                  "prompt": f"Define '{lemma}'.", "answer": g[0].upper() + g[1:] + ("" if g.endswith(".") else ".")})
    # A deterministic subset: smallest prompt hashes (independent of file order).
    items.sort(key=lambda it: hashlib.sha256(it["prompt"].encode()).hexdigest())
    return items[:max_items]


def split_of(prompt, test_fraction):
    h = int(hashlib.sha256(("split:" + prompt).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


def preference_pairs(items, seed):
    """Rejected = the answer of another item of the same category (different text)."""
    by_cat = {}
    for it in items:
        by_cat.setdefault(it["category"], []).append(it)
    rng = random.Random(seed)
    pairs = []
    for cat in sorted(by_cat):
        group = by_cat[cat]
        answers = sorted({it["answer"] for it in group})
        if len(answers) < 2:
            continue
        for it in group:
            other = it["answer"]
            while other == it["answer"]:
                other = answers[rng.randrange(len(answers))]
            pairs.append({"prompt": [{"role": "user", "content": it["prompt"]}], "chosen": it["answer"],
                          "rejected": other, "category": cat, "source": it["source"]})
    return pairs


def quiz_files(items, out, test_fraction, seed):
    """The bsdgames quiz items alone (short factual answers, no WordNet glosses or riddles):
    sft_quiz_{train,test}.jsonl for a quick SFT, pref_quiz_{train,test}.jsonl for DPO, and `llmtune eval` tasks in tasks/:
      quiz_taught     generation, exact match, on 200 training questions (did SFT teach the facts?)
      quiz_held_out   generation, exact match, on every held-out question (did it generalise?)
      quiz_taught_mc  multiple choice on the same 200 training questions: the gold answer and three
                      answers of other items of the same category (chance = 25%)."""
    quiz = [it for it in items if it["source"].startswith("bsdgames:")]
    parts = {split: [it for it in quiz if split_of(it["prompt"], test_fraction) == split] for split in ("train", "test")}
    def chat(it):
        return {"messages": [{"role": "user", "content": it["prompt"]}, {"role": "assistant", "content": it["answer"]}],
                "category": it["category"], "source": it["source"]}
    for split, part in parts.items():
        with open(os.path.join(out, f"sft_quiz_{split}.jsonl"), "w") as f:
            for it in part:
                f.write(json.dumps(chat(it)) + "\n")
        with open(os.path.join(out, f"pref_quiz_{split}.jsonl"), "w") as f:
            for pair in preference_pairs(part, seed + (split == "test")):
                f.write(json.dumps(pair) + "\n")
    rng = random.Random(seed + 7)
    taught = rng.sample(parts["train"], min(200, len(parts["train"])))
    answers = {}
    for it in quiz:
        answers.setdefault(it["category"], set()).add(it["answer"])
    tasks = os.path.join(out, "tasks")
    os.makedirs(tasks, exist_ok=True)
    gen_yaml = ("# {what}\ntask: {name}\ntype: generate\ndata: {name}.jsonl\nmessages_field: messages\n"
                "scoring: exact_match\nmax_new_tokens: 12\n")
    for name, rows, what in (("quiz_taught", taught, "200 quiz questions from sft_quiz_train.jsonl"),
                             ("quiz_held_out", parts["test"], "every quiz question of sft_quiz_test.jsonl")):
        with open(os.path.join(tasks, name + ".jsonl"), "w") as f:
            for it in rows:
                f.write(json.dumps(chat(it)) + "\n")
        open(os.path.join(tasks, name + ".yaml"), "w").write(gen_yaml.format(name=name, what=what))
    with open(os.path.join(tasks, "quiz_taught_mc.jsonl"), "w") as f:
        for it in taught:
            others = sorted(answers[it["category"]] - {it["answer"]})
            choices = rng.sample(others, min(3, len(others))) + [it["answer"]]
            rng.shuffle(choices)
            f.write(json.dumps({"question": "Question: " + it["prompt"] + "\nAnswer:", "choices": choices,
                                "label": choices.index(it["answer"])}) + "\n")
    open(os.path.join(tasks, "quiz_taught_mc.yaml"), "w").write(
        "# The 200 questions of quiz_taught as multiple choice (gold + 3 answers of the same category)\n"
        "task: quiz_taught_mc\ntype: multiple_choice\ndata: quiz_taught_mc.jsonl\ncontext_field: question\n"
        "choices_field: choices\ngold_field: label\nnum_fewshot: 0\ntarget_delimiter: \" \"\n")
    return {"train": len(parts["train"]), "test": len(parts["test"]), "taught_eval": len(taught)}


def corpus(pins, out, test_fraction):
    """Pretraining text: one paragraph per document, blank-line separated; the last test_fraction of
    each source's documents goes to corpus_test/ (held out for perplexity)."""
    docs = {}
    need("/usr/bin/bible", "bible-kjv")
    need("/usr/lib/bible.data", "bible-kjv-text")
    pins.check("/usr/lib/bible.data")
    text = subprocess.run(["bible", "-f", "Gen1:1-Rev22:21"], capture_output=True, text=True, check=True).stdout
    # Chapters as documents: a verse line starts with "Book C:V"; group by chapter.
    chapters, cur, key = [], [], None
    for line in text.splitlines():
        m = re.match(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$", line)
        if m:
            k = (m.group(1), m.group(2))
            if k != key and cur:
                chapters.append(" ".join(cur))
                cur = []
            key = k
            cur.append(m.group(4).strip())
        elif line.strip() and cur:
            cur.append(line.strip())
    if cur:
        chapters.append(" ".join(cur))
    docs["bible-kjv"] = chapters
    jargon = "/usr/share/doc/jargon-text/jargon.txt.gz"
    need(jargon, "jargon-text")
    pins.check(jargon)
    paras = gzip.open(jargon, "rt", encoding="latin-1").read().split("\n\n")
    docs["jargon-text"] = [" ".join(p.split()) for p in paras if len(p.split()) >= 8]
    devil = "/usr/share/dictd/devil.dict.dz"
    need(devil, "dict-devil")
    pins.check(devil)
    entries = re.split(r"\n(?=[A-Z][A-Z' -]+, [a-z.]+)", gzip.open(devil, "rt", encoding="latin-1").read())
    docs["dict-devil"] = [" ".join(e.split()) for e in entries if len(e.split()) >= 8]
    os.makedirs(os.path.join(out, "corpus"), exist_ok=True)
    os.makedirs(os.path.join(out, "corpus_test"), exist_ok=True)
    counts = {}
    for name, ds in docs.items():
        n_test = max(1, int(len(ds) * test_fraction))
        train, test = ds[:-n_test], ds[-n_test:]
        for sub, part in (("corpus", train), ("corpus_test", test)):
            with open(os.path.join(out, sub, f"{name}.txt"), "w") as f:
                f.write("\n\n".join(part) + "\n")
        counts[name] = {"train_documents": len(train), "test_documents": len(test),
                        "train_bytes": sum(len(d) for d in train)}
    return counts


def last_word_files(out, seed, n_train=1000, n_test=200):
    """A skill that generalises to unseen inputs, so held-out accuracy means something: "Last word
    of: "<a clause of the King James Bible>"" -> its last word (sft_lastword_*.jsonl; pref_lastword_*.jsonl
    pairs it with another word of the clause as the rejected answer). Training clauses come from corpus/,
    held-out clauses from corpus_test/ (chapters the model never trained on). Unlike the quiz, whose
    held-out facts were never taught, a model that learned the skill answers these."""
    rng = random.Random(seed + 11)

    def clauses(path):
        found = []
        for piece in re.split(r"[.,;:?!()]", open(path, encoding="utf-8").read()):
            words = piece.split()
            if 4 <= len(words) <= 9 and all(w.isalpha() for w in words):
                found.append(" ".join(words))
        return sorted(set(found))

    tasks = os.path.join(out, "tasks")
    os.makedirs(tasks, exist_ok=True)
    counts = {}
    for split, src, n in (("train", "corpus", n_train), ("test", "corpus_test", n_test)):
        pool = clauses(os.path.join(out, src, "bible-kjv.txt"))
        rows = [{"messages": [{"role": "user", "content": f'Last word of: "{c}"'},
                              {"role": "assistant", "content": c.split()[-1]}],
                 "category": "last_word", "source": "bible-kjv:" + src} for c in rng.sample(pool, min(n, len(pool)))]
        with open(os.path.join(out, f"sft_lastword_{split}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        # Preference pairs on the same clauses: chosen = the last word, rejected = another word of the clause.
        with open(os.path.join(out, f"pref_lastword_{split}.jsonl"), "w") as f:
            for r in rows:
                words = r["messages"][0]["content"].split('"')[1].split()
                last = words[-1]
                others = [w for w in words[:-1] if w != last]
                f.write(json.dumps({"prompt": r["messages"][:1], "chosen": last, "rejected": rng.choice(others),
                                    "category": "last_word", "source": r["source"]}) + "\n")
        counts[split] = len(rows)
    shutil.copyfile(os.path.join(out, "sft_lastword_test.jsonl"), os.path.join(tasks, "lastword_held_out.jsonl"))
    open(os.path.join(tasks, "lastword_held_out.yaml"), "w").write(
        "# 200 held-out clauses (corpus_test chapters): the last word, exact match\n"
        "task: lastword_held_out\ntype: generate\ndata: lastword_held_out.jsonl\nmessages_field: messages\n"
        "scoring: exact_match\nmax_new_tokens: 8\n")
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("LLMTUNE_DATA", "build/data"))
    ap.add_argument("--max-wordnet", type=int, default=20000)
    ap.add_argument("--test-fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--no-corpus", action="store_true", help="only the SFT/preference files")
    ap.add_argument("--no-verify", action="store_true", help="do not check the sha256 pins")
    ap.add_argument("--record-pins", action="store_true", help="write the current sha256 of every source to pins.json")
    a = ap.parse_args()
    out = a.out
    manifest = os.path.join(out, "LICENSES.json")
    # The output is complete when its manifest was written by this very version of the generator.
    generator = sha256(os.path.abspath(__file__))
    if os.path.exists(manifest) and not a.record_pins:
        try:
            done = json.load(open(manifest)).get("generator_sha256") == generator
        except ValueError:
            done = False
        if done:
            print(f"make_data: {out} is complete (delete it to rebuild)")
            return
        print(f"make_data: {out} was made by another version of make_data.py; rebuilding")
    os.makedirs(out, exist_ok=True)
    pins = Pins(verify=not a.no_verify, record=a.record_pins)
    items = quiz_items(pins) + riddle_items(pins) + wordnet_items(pins, a.max_wordnet)
    # One example per prompt (first wins) so a held-out prompt never appears in training.
    seen, uniq = set(), []
    for it in items:
        if it["prompt"] not in seen:
            seen.add(it["prompt"])
            uniq.append(it)
    stats = {"sft": {}, "pref": {}}
    for split in ("train", "test"):
        part = [it for it in uniq if split_of(it["prompt"], a.test_fraction) == split]
        with open(os.path.join(out, f"sft_{split}.jsonl"), "w") as f:
            for it in part:
                f.write(json.dumps({"messages": [{"role": "user", "content": it["prompt"]},
                                                 {"role": "assistant", "content": it["answer"]}],
                                    "category": it["category"], "source": it["source"]}) + "\n")
        pairs = preference_pairs(part, a.seed + (split == "test"))
        with open(os.path.join(out, f"pref_{split}.jsonl"), "w") as f:
            for p in pairs:
                f.write(json.dumps(p) + "\n")
        stats["sft"][split] = len(part)
        stats["pref"][split] = len(pairs)
    stats["quiz"] = quiz_files(uniq, out, a.test_fraction, a.seed)
    if not a.no_corpus:
        stats["corpus"] = corpus(pins, out, a.test_fraction)
        stats["last_word"] = last_word_files(out, a.seed)
    pins.save()
    json.dump({"generator_sha256": generator, "licenses": LICENSES, "files_sha256": pins.used, "counts": stats,
               "categories": sorted({it["category"] for it in uniq})}, open(manifest, "w"), indent=1)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
