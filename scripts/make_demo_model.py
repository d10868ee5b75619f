#!/usr/bin/env python3
"""Makes the small demo checkpoint the quickstart runs on, until llmtune trains its own default
model: a byte-level BPE tokenizer trained with `tokenizers` on public-domain-style text written
here, and a randomly initialised Llama-shaped model saved by `transformers` (seeded, so the
same files every time). Usage: make_demo_model.py --out DIR"""
import argparse
import json
import os
import random

CORPUS_SEED_LINES = [
    "In the beginning was the word, and the word was a token.",
    "A tokenizer splits text into pieces; a model predicts the next piece.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? Paris.",
    "Fine-tuning adapts a pretrained model to a task with a little data.",
    "Numbers like 12345 and 3.14159 are split into digits and groups.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = args.out
    stamp = os.path.join(out, ".demo-v1")
    if os.path.exists(stamp):
        print(f"demo model: {out} already made")
        return
    os.makedirs(out, exist_ok=True)

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    words = " ".join(CORPUS_SEED_LINES).split()
    corpus = CORPUS_SEED_LINES + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(out)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=344,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    with open(os.path.join(out, "corpus.txt"), "w") as f:
        f.write("\n".join(corpus[:200]) + "\n")
    open(stamp, "w").write(json.dumps({"version": 1}))
    print(f"demo model: wrote {out}")


if __name__ == "__main__":
    main()
