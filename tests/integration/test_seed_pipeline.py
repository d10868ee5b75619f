# ctest-processors: 2  (trains with both cores for minutes; see CMakeLists.txt)
"""The whole seed pipeline on the embedded default model (models/default), each step consuming the
previous step's output, with each stage's measured effect printed and checked:

  pretrain (continued, short, on the Devil's Dictionary)   held-out loss of that text goes down
  -> sft (LoRA, "last word of a clause")                  held-out accuracy goes up
  -> merge
  -> dpo (LoRA, last word vs another word of the clause)   held-out preference accuracy goes up, task kept
  -> merge
  -> quantize (GGUF f16 and q8_0)                          llama.cpp loads both; q8_0 perplexity close to f16
  -> generate                                              llama.cpp's greedy text on the f16 file equals llmtune's

Data comes from scripts/data/make_data.py (Debian packages: bible-kjv, jargon-text, dict-devil,
wordnet-base, bsdgames, fortunes-min; scripts/setup.sh installs them).
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from sft_common import metrics, run, write_recipe  # noqa: E402
from common import FIXTURES, SOURCE  # noqa: E402

BASE = os.environ.get("LLMTUNE_DEFAULT_MODEL") or os.path.join(SOURCE, "models", "default")


def eval_json(args):
    """`llmtune eval ... --output - --json`: the JSON document on the last line."""
    p = run(["eval", *args, "--output", "-", "--json"])
    return json.loads(p.stdout.strip().splitlines()[-1])


def held_out_loss(model, text):
    r = eval_json(["--model", model, "--perplexity-data", text, "--perplexity-max-length", "256"])
    return r["runs"][0]["perplexity"]["mean_nll"]


def main():
    work = os.path.join(FIXTURES, "..", "test-seed-pipeline")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = os.path.join(work, "data")
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "data", "make_data.py"), "--out", data,
                    "--max-wordnet", "100"], check=True, capture_output=True)
    tasks = os.path.join(data, "tasks")
    report = []
    t_start = time.monotonic()

    # 1. Continued pretraining: a short domain adaptation to the Devil's Dictionary.
    devil_train = os.path.join(data, "corpus", "dict-devil.txt")
    devil_test = os.path.join(data, "corpus_test", "dict-devil.txt")
    pre_out = os.path.join(work, "pretrain")
    loss_base = held_out_loss(BASE, devil_test)
    # `--model default` names the same model (models/default, or $LLMTUNE_DEFAULT_MODEL when set).
    assert held_out_loss("default", devil_test) == loss_base
    run(["pretrain", write_recipe(os.path.join(work, "pretrain.yaml"), {
        "base_model": BASE, "pretraining_dataset": [{"path": devil_train, "text_split": "paragraph"}],
        "sequence_len": 256, "micro_batch_size": 8, "max_steps": 24, "learning_rate": 5e-4, "lr_scheduler": "constant",
        "optimizer": "adamw_torch", "output_dir": pre_out, "save_strategy": "no", "logging_steps": 4, "seed": 3,
        "dataset_prepared_path": os.path.join(work, "cache")}), "--no-progress"])
    pretrained = pre_out
    loss_pre = held_out_loss(pretrained, devil_test)
    report.append(("pretrain", "held-out loss (Devil's Dictionary)", loss_base, loss_pre))
    assert loss_pre < loss_base - 0.02, (loss_base, loss_pre)

    # 2. SFT with LoRA on the last-word skill; 3. merge. Held-out clauses come from chapters never trained on.
    sft_out, merged_sft = os.path.join(work, "sft"), os.path.join(work, "merged-sft")
    run(["sft", write_recipe(os.path.join(work, "sft.yaml"), {
        "base_model": pretrained, "datasets": [{"path": os.path.join(data, "sft_lastword_train.jsonl"),
                                                "type": "chat_template"}],
        "chat_template": "tokenizer_default", "sequence_len": 64, "micro_batch_size": 16, "num_epochs": 3,
        "learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05, "optimizer": "adamw_torch",
        "adapter": "lora", "lora_r": 32, "lora_alpha": 32, "lora_target_linear": True, "output_dir": sft_out,
        "logging_steps": 10, "seed": 7, "val_set_size": 0, "save_strategy": "no",
        "dataset_prepared_path": os.path.join(work, "cache")}), "--no-progress"])
    last_word = ["--task", os.path.join(tasks, "lastword_held_out.yaml")]
    r = eval_json(["--model", pretrained, "--adapter", sft_out, *last_word])
    em0, em1 = (x["tasks"]["lastword_held_out"]["metrics"]["exact_match"] for x in r["runs"])
    report.append(("sft", "held-out last-word exact match", em0, em1))
    assert em1 > em0 + 0.15, (em0, em1)
    run(["merge", "--base", pretrained, "--adapter", sft_out, "--out", merged_sft])

    # 4. DPO with LoRA on last-word pairs (rejected = another word of the clause), held-out pairs for eval; 5. merge.
    # rpo_alpha adds the NLL of the chosen answer (RPO), so pushing the rejected word down does not also drag the
    # chosen one down and cost the greedy accuracy SFT gave.
    dpo_out, merged_dpo = os.path.join(work, "dpo"), os.path.join(work, "merged-dpo")
    run(["dpo", write_recipe(os.path.join(work, "dpo.yaml"), {
        "base_model": merged_sft, "rl": "dpo", "rl_beta": 0.1, "rpo_alpha": 1.0, "chat_template": "tokenizer_default",
        "datasets": [{"path": os.path.join(data, "pref_lastword_train.jsonl")}],
        "test_datasets": [{"path": os.path.join(data, "pref_lastword_test.jsonl")}],
        "sequence_len": 64, "micro_batch_size": 16, "max_steps": 40, "learning_rate": 5e-4, "lr_scheduler": "cosine",
        "warmup_ratio": 0.1, "optimizer": "adamw_torch", "adapter": "lora", "lora_r": 16, "lora_alpha": 32,
        "lora_target_linear": True, "output_dir": dpo_out, "logging_steps": 5, "eval_steps": 40,
        "save_strategy": "no", "seed": 7}), "--no-progress"])
    ev = [m for m in metrics(dpo_out) if "eval_rewards/accuracies" in m]
    acc_after = ev[-1]["eval_rewards/accuracies"]
    # Before DPO the policy equals the reference: every implicit reward is 0 and no pair is ranked right.
    report.append(("dpo", "held-out preference accuracy (implicit reward)", 0.0, acc_after))
    assert acc_after > 0.7, ev
    run(["merge", "--base", merged_sft, "--adapter", dpo_out, "--out", merged_dpo])
    r2 = eval_json(["--model", merged_sft, "--model", merged_dpo, *last_word])
    em_sft, em_dpo = (x["tasks"]["lastword_held_out"]["metrics"]["exact_match"] for x in r2["runs"])
    report.append(("dpo", "held-out last-word exact match", em_sft, em_dpo))
    assert em_dpo >= em_sft - 0.05, (em_sft, em_dpo)

    # 6. Quantize to GGUF; 7. generate with llama.cpp and compare with llmtune.
    import gguf_common as G
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(merged_dpo)
    ids = tok.encode(open(os.path.join(data, "corpus_test", "bible-kjv.txt")).read()[:4000])[:256]
    ppl = {}
    for typ in ("f16", "q8_0"):
        gguf = os.path.join(work, f"model-{typ}.gguf")
        G.quantize(os.environ["LLMTUNE_BIN"], merged_dpo, typ, gguf)
        lc = G.LlamaCpp(gguf)
        ppl[typ] = float(__import__("numpy").exp(G.nll(lc.logits(ids), ids)))
        if typ == "f16":
            prompt = tok.apply_chat_template([{"role": "user", "content": 'Last word of: "and God saw the light"'}],
                                             tokenize=False, add_generation_prompt=True)
            mine = json.loads(run(["generate", "--model", merged_dpo, "--greedy", "-n", "8", "--json", "-p", prompt])
                              .stdout.strip().splitlines()[-1])
            theirs = lc.greedy(lc.tokenize(prompt, add_bos=True), len(mine["tokens"]),
                               eos={tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")})
            report.append(("generate", f"greedy: llmtune {mine['text']!r}, llama.cpp on the f16 GGUF: same tokens", "", ""))
            assert mine["tokens"] == theirs and mine["tokens"], (mine, theirs)
        lc.close()
    report.append(("quantize", "llama.cpp perplexity f16 -> q8_0 (KJV held-out)", ppl["f16"], ppl["q8_0"]))
    assert abs(ppl["q8_0"] / ppl["f16"] - 1) < 0.02, ppl

    print(f"seed pipeline on the default model ({time.monotonic() - t_start:.0f} s):")
    for stage, what, a, b in report:
        if a == "":
            print(f"  {stage:9} {what}")
        else:
            print(f"  {stage:9} {what:52} {a:8.3f} -> {b:8.3f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
