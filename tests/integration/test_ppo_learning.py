# ctest-processors: 2  (trains with both cores; see CMakeLists.txt)
"""`llmtune ppo` learns from a verifiable reward, with PPO and with GRPO (rl: grpo), on the demo model.

Task ("rate"): the user says "Rate: w1 w2 w3" (random words of the demo vocabulary); the answer is
"yes" when the last word is in the first half of the word list, else "no". The SFT starting point is
a short full SFT on the right answers (60 steps): it has the format and part of the rule (greedy
held-out reward 0.594, sampled at temperature 1 0.58-0.66), as an InstructGPT-style SFT model
would. PPO and GRPO with LoRA on top of it (reference = the SFT model, adapter off) and the built-in
exact_match reward against each record's `answer` must raise the held-out mean reward (greedy,
prompts never seen in training, measured by llmtune before and after training) to at least 0.85,
by at least 0.2, while the KL to the reference stays bounded; the mean rollout reward of the last
quarter of updates must beat the first quarter's. Also checks the metrics every RL step logs.

Why not from an SFT on random answers (the starting policy knows nothing of the rule): measured,
240 updates of either method then only flip the greedy answer between "yes" and "no" for every
prompt, and the rollout reward stays at chance (0.40-0.50); sparse binary rewards alone do not
teach this 26-word lookup to the random demo model within a test's budget (see the README)."""
import json
import os
import random
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from sft_common import FIXTURES, WORDS, demo_model, metrics, run, write_jsonl, write_recipe  # noqa: E402

GOOD = set(WORDS[: len(WORDS) // 2])
KL_BOUND = 10.0  # nats per sequence (responses are ~2-3 tokens)
STEPS = {"ppo": 120, "grpo": 80}


def rate_rows(n, seed, exclude=()):
    rng = random.Random(seed)
    rows, seen = [], set(exclude)
    while len(rows) < n:
        q = "Rate: " + " ".join(rng.choice(WORDS) for _ in range(3))
        if q in seen:
            continue
        seen.add(q)
        rows.append((q, "yes" if q.split()[-1] in GOOD else "no"))
    return rows, seen


def main():
    base = demo_model()
    work = os.path.join(FIXTURES, "..", "test-ppo-learning")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    sft_rows, seen = rate_rows(1500, seed=1)
    rl_rows, seen = rate_rows(600, seed=2, exclude=seen)
    held_rows, _ = rate_rows(64, seed=3, exclude=seen)
    write_jsonl(os.path.join(work, "sft.jsonl"),
                [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in sft_rows])
    for name, rows in (("prompts.jsonl", rl_rows), ("held.jsonl", held_rows)):
        write_jsonl(os.path.join(work, name), [{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in rows])

    # ---- SFT starting point: the format and part of the rule -------------------------------------------
    sft_out = os.path.join(work, "sft")
    t0 = time.time()
    run(["sft", write_recipe(os.path.join(work, "sft.yaml"), {
        "base_model": base, "datasets": [{"path": os.path.join(work, "sft.jsonl"), "type": "chat_template"}],
        "chat_template": "tokenizer_default", "sequence_len": 32, "micro_batch_size": 16, "max_steps": 60,
        "learning_rate": 2e-3, "lr_scheduler": "constant", "optimizer": "adamw_torch", "output_dir": sft_out,
        "logging_steps": 10, "seed": 7, "val_set_size": 0, "save_strategy": "no",
        "dataset_prepared_path": os.path.join(work, "cache")}), "--no-progress"])
    print(f"sft: {time.time() - t0:.1f}s")

    results = {}
    for rl in ("ppo", "grpo"):
        out = os.path.join(work, rl)
        trl = {"reward_funcs": ["exact_match"], "max_completion_length": 4, "temperature": 1.0,
               "num_ppo_epochs": 2, "num_mini_batches": 2}
        if rl == "ppo":
            trl.update({"kl_coef": 0.05, "vf_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2, "gamma": 1.0,
                        "lam": 0.95, "adaptive_kl": True, "target_kl": 4.0})
        else:
            trl.update({"num_generations": 8, "beta": 0.04})
        recipe = {
            "base_model": sft_out, "rl": rl, "chat_template": "tokenizer_default",
            "datasets": [{"path": os.path.join(work, "prompts.jsonl")}],
            "test_datasets": [{"path": os.path.join(work, "held.jsonl")}],
            "sequence_len": 32, "micro_batch_size": 32 if rl == "ppo" else 8, "max_steps": STEPS[rl],
            "learning_rate": 1e-3, "lr_scheduler": "constant", "optimizer": "adamw_torch", "adapter": "lora",
            "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_linear": True, "output_dir": out, "logging_steps": 4,
            "eval_steps": 20, "seed": 11, "save_strategy": "no", "trl": trl,
        }
        t0 = time.time()
        p = run(["ppo", write_recipe(os.path.join(work, f"{rl}.yaml"), recipe), "--no-progress"])
        summary = json.load(open(os.path.join(out, "rl_summary.json")))
        lines = metrics(out)
        train = [l for l in lines if "reward" in l and "loss" in l]
        assert train, lines
        need = ["reward", "kl", "entropy", "clipfrac", "approx_kl"] + (["value_loss"] if rl == "ppo" else [])
        for k in need:
            assert all(k in l for l in train), (k, train[0])
        max_kl = max(abs(l["kl"]) for l in train)
        before, after = summary["held_out_reward_before"], summary["held_out_reward_after"]
        q = max(1, len(train) // 4)
        first_q = sum(l["reward"] for l in train[:q]) / q
        last_q = sum(l["reward"] for l in train[-q:]) / q
        results[rl] = (before, after, max_kl, first_q, last_q)
        evals = [round(l["eval_reward"], 3) for l in lines if "eval_reward" in l]
        print(f"{rl}: {time.time() - t0:.1f}s; held-out reward {before:.3f} -> {after:.3f} (evaluations {evals}); "
              f"rollout reward first quarter {first_q:.3f}, last quarter {last_q:.3f}; max KL {max_kl:.3f}")
        for f in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "recipe.resolved.yaml"):
            assert os.path.isfile(os.path.join(out, f)), f
        if rl == "ppo":
            assert os.path.isfile(os.path.join(out, "value_head.safetensors"))
    for rl, (before, after, max_kl, first_q, last_q) in results.items():
        assert after >= before + 0.2 and after >= 0.85, \
            f"{rl}: held-out reward {before:.3f} -> {after:.3f} did not rise by 0.2 to at least 0.85"
        assert last_q > first_q, f"{rl}: rollout reward did not rise ({first_q:.3f} -> {last_q:.3f})"
        assert max_kl < KL_BOUND, f"{rl}: KL to the reference {max_kl:.3f} >= {KL_BOUND}"
    shutil.rmtree(work, ignore_errors=True)
    print("ok")


if __name__ == "__main__":
    main()
