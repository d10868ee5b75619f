"""The two-step pipeline end to end at toy scale on the demo model: LoRA SFT (the quickstart's chat task)
-> merge -> DPO with recipes/ci-tiny-dpo.yaml (lr 1e-5, beta 0.1, cosine, warmup ratio 0.1, filters)
-> merge -> generate. LoRA stands in for QLoRA (adapter: qlora needs the quantization module; the
TinyLlama recipes say how to switch). Checks each step's outputs, that the DPO adapter loads on the
merged SFT model, and that the final model generates.
"""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "parity"))
from common import FIXTURES, SOURCE, demo_model, run  # noqa: E402


def main():
    base = demo_model()
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "fixtures", "align_tasks.py"), "--out", FIXTURES],
                   check=True, capture_output=True)
    work = os.path.join(FIXTURES, "..", "test-dpo-pipeline")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    subprocess.run([sys.executable, os.path.join(SOURCE, "scripts", "make_demo_data.py"), "--out", work,
                    "--train", "200", "--held-out", "4"], check=True, capture_output=True)
    sft_out, merged_sft = os.path.join(work, "sft"), os.path.join(work, "merged-sft")
    dpo_out, merged_dpo = os.path.join(work, "dpo"), os.path.join(work, "merged-dpo")
    run(["sft", os.path.join(SOURCE, "recipes", "quickstart.yaml"), "--no-progress", "--set", f"base_model={base}",
         "--set", f"datasets.0.path={os.path.join(work, 'train.jsonl')}", "--set", f"output_dir={sft_out}",
         "--set", "max_steps=10", "--set", f"dataset_prepared_path={work}/cache"])
    assert os.path.exists(os.path.join(sft_out, "adapter_model.safetensors"))
    run(["merge", "--base", base, "--adapter", sft_out, "--out", merged_sft])
    p = run(["dpo", os.path.join(SOURCE, "recipes", "ci-tiny-dpo.yaml"), "--no-progress",
             "--set", f"base_model={merged_sft}",
             "--set", f"datasets.0.path={os.path.join(FIXTURES, 'align', 'dpo_train.jsonl')}",
             "--set", f"output_dir={dpo_out}"])
    log = p.stdout + p.stderr
    assert "removed 24 record(s)" in log, log
    import yaml
    resolved = yaml.safe_load(open(os.path.join(dpo_out, "recipe.resolved.yaml")))
    for key, want in [("learning_rate", 1e-5), ("rl_beta", 0.1), ("lr_scheduler", "cosine"), ("warmup_ratio", 0.1),
                      ("rl", "dpo"), ("adapter", "lora")]:
        assert resolved[key] == want or (isinstance(want, float) and abs(float(resolved[key]) - want) < 1e-12), \
            (key, resolved[key])
    lines = [json.loads(l) for l in open(os.path.join(dpo_out, "metrics.jsonl")) if l.strip()]
    steps = [l for l in lines if "rewards/margins" in l]
    assert steps and steps[-1]["step"] == 10, lines
    assert json.load(open(os.path.join(dpo_out, "reference_check.json")))["unchanged"]
    cfg = json.load(open(os.path.join(dpo_out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8, cfg
    run(["merge", "--base", merged_sft, "--adapter", dpo_out, "--out", merged_dpo])
    g = run(["generate", "--model", merged_dpo, "--chat", "-p", "Last word: fox dog data", "-n", "8", "--json"])
    out = json.loads(g.stdout.strip().splitlines()[-1])
    assert out["tokens"], out
    print("pipeline ok: sft -> merge -> dpo -> merge -> generate:", repr(out["text"]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
