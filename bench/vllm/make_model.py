"""A tiny Qwen3-architecture model, made here: random weights saved with transformers'
save_pretrained (no hub access) and a word-level tokenizer built with `tokenizers`.

    <vllm venv>/bin/python bench/vllm/make_model.py OUT_DIR

Deterministic: the same seed gives the same weights, so a cold start anywhere answers a greedy
prompt the same way. Small enough for a 2-core CPU (about 20 M parameters), large enough that
vLLM's cold start (imports, weight load, CPU KV cache, warm-up) takes its real course.
Prompts are words "w<N>"; the tokenizer maps "w<N>" to id N (0: <unk>, 1: <eos>).
"""

import json
import os
import sys

VOCAB = 4096
CONFIG = dict(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
              rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True,
              # Larger than the usual 0.02: peaked logits, so greedy decoding never hangs on a tie.
              initializer_range=0.1, bos_token_id=1, eos_token_id=1)


def main(out: str) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    os.makedirs(out, exist_ok=True)
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>",
                            model_max_length=2048).save_pretrained(out)

    torch.manual_seed(20)
    config = Qwen3Config(**CONFIG)
    model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"model": out, "parameters": params}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
