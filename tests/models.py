"""Build tiny, real MLX language models offline: the tests' and the benchmarks' models.

A model folder holds a Llama-type `config.json`, random weights saved as safetensors from
`mlx_lm.models.llama.Model`, and a byte-level BPE tokenizer trained with `tokenizers` on
Python's own standard-library sources, with a chat template in `tokenizer_config.json`.
mlx-lm loads such a folder like any model from the hub. Its end-of-sequence token is never
generated (`_never_ends`): a request runs to its `max_tokens`, sampled or greedy.

    python -m tests.models /tmp/model bench     # build one by hand
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOS = 0  # "<|end|>", the first special token
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int


SIZES = {
    # Most tests: a few ms per token.
    "fast": ModelSize(
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=512,
    ),
    # Benchmarks: a few million parameters.
    "bench": ModelSize(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=768,
        num_attention_heads=8,
        vocab_size=1024,
    ),
    # Timeout and cancellation tests: hundreds of ms per request.
    "slow": ModelSize(
        hidden_size=768,
        num_hidden_layers=12,
        intermediate_size=2048,
        num_attention_heads=12,
        vocab_size=1024,
    ),
}


def _training_text() -> list[str]:
    """Text that ships with every Python: a few standard-library modules' sources."""
    import argparse
    import inspect
    import json as json_module
    import textwrap

    return [inspect.getsource(m) for m in (argparse, json_module.decoder, textwrap)]


def build_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_text(), trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|end|>",
                "bos_token": None,
                "pad_token": "<|end|>",
                "model_max_length": 4096,
                "clean_up_tokenization_spaces": False,
                "chat_template": CHAT_TEMPLATE,
            },
            indent=2,
        )
    )
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|end|>", "pad_token": "<|end|>"}))


def _never_ends(weights: dict, layers: int, eos: int) -> None:
    """Make end-of-sequence unreachable, sampled or not, so a request runs to its `max_tokens`.

    A random model's end-of-sequence logit is an ordinary one: sampled at temperature 1 (the
    OpenAI default), it came up about once in a thousand tokens, and a test that counts tokens
    failed at random. Here residual dimension 0 carries a constant: every token's embedding has
    the same positive value there and no layer writes to it (the attention and MLP output rows 0
    are zero), so after the final norm it is always positive, and the output head's
    end-of-sequence row reads only it, negated and scaled far below every other logit.
    (Scripted models, tests/scripted_model.py, end where their script says.)"""
    import mlx.core as mx

    embed = weights["model.embed_tokens.weight"]
    constant = mx.full(embed[:, :1].shape, embed.shape[1] ** -0.5)  # the other entries' own scale
    weights["model.embed_tokens.weight"] = mx.concatenate([constant, embed[:, 1:]], axis=1)
    for layer in range(layers):
        for name in (f"model.layers.{layer}.self_attn.o_proj.weight", f"model.layers.{layer}.mlp.down_proj.weight"):
            w = weights[name]
            weights[name] = mx.concatenate([mx.zeros_like(w[:1]), w[1:]], axis=0)
    head = weights["lm_head.weight"]
    row = mx.zeros_like(head[:1]).at[0, 0].add(-4000.0)
    weights["lm_head.weight"] = mx.concatenate([head[:eos], row, head[eos + 1 :]], axis=0)


def build_model(
    folder: Path | str, size: str = "fast", *, seed: int = 0, chat_template: bool = True, context: int = 131072
) -> Path:
    """Write a complete model folder and return its path. Takes about a second for `fast`.

    `context` is the context length it declares (`max_position_embeddings`, which the server holds
    prompt + max_tokens to); the weights do not depend on it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    spec = SIZES[size]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer(folder, spec.vocab_size)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_attention_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": spec.vocab_size,
        "max_position_embeddings": context,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "eos_token_id": EOS,
        "torch_dtype": "float32",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # A separate, scaled output head makes greedy decoding wander over the vocabulary
    # (a tied head of random weights repeats the last token forever).
    weights = dict(tree_flatten(model.parameters()))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 8.0
    _never_ends(weights, spec.num_hidden_layers, eos=EOS)
    mx.save_safetensors(str(folder / "model.safetensors"), weights, metadata={"format": "mlx"})
    if not chat_template:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        del tokenizer_config["chat_template"]
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


if __name__ == "__main__":
    print(build_model(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "fast"))
