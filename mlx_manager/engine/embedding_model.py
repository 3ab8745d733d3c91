"""An embedding model on the inference thread: load with mlx-embeddings, tokenize, run, pool.

mlx-embeddings is the `embeddings` extra (`pip install 'mlx-manager[embeddings]'`): it brings
mlx-vlm and mlx-audio, most of a full install's size, so the base install leaves it out and a
request for an embedding model without it is the `extra_not_installed` problem naming the extra.

Pooling follows the model's sentence-transformers files when it has them (`modules.json`,
`1_Pooling/config.json`, `sentence_bert_config.json`): mean, CLS, max or last-token pooling, then
L2 normalisation if the model has a Normalize module — what sentence-transformers itself does.
Without them, mlx-embeddings' own `text_embeds` is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlx_manager.engine.errors import ExtraNotInstalled, InvalidRequest, ModelLoadFailed

# Encoder-only architectures: they cannot generate, whatever files come with them.
ENCODER_TYPES = {"bert", "xlm-roberta", "xlm_roberta", "modernbert"}


def is_embedding_model(path: Path, config: dict) -> bool:
    """A sentence-transformers folder, or an encoder-only architecture."""
    return (path / "modules.json").exists() or config.get("model_type") in ENCODER_TYPES


def embeddings_loader() -> Any:
    """mlx-embeddings' `load`; raises ExtraNotInstalled when the `embeddings` extra is missing."""
    try:
        from mlx_embeddings.utils import load
    except ImportError as exc:  # mlx-embeddings, or one of the packages it imports, is missing
        message = (
            "embedding models need mlx-manager's `embeddings` extra, which is not installed here"
            f" ({exc}): install it with pip install 'mlx-manager[embeddings]' and restart the daemon"
        )
        raise ExtraNotInstalled(message, "embeddings") from None
    return load


@dataclass(frozen=True)
class Pooling:
    mode: str = "text_embeds"  # "mean", "cls", "max", "lasttoken", or mlx-embeddings' own
    normalize: bool = True


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_object(path: Path) -> dict:
    """A JSON file's object, or {} if it is missing, unreadable or not an object."""
    found = _read_json(path)
    return found if isinstance(found, dict) else {}


SUPPORTED_MODULES = (".Transformer", ".Pooling", ".Normalize")


def pooling_of(path: Path) -> Pooling:
    modules = _read_json(path / "modules.json")
    if not isinstance(modules, list):
        return Pooling()
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else repr(module)
        if not kind.endswith(SUPPORTED_MODULES):
            raise ModelLoadFailed(f"its sentence-transformers module {kind!r} is not supported")
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling_dir = next((m.get("path", "") for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling_dir is None:
        return Pooling(normalize=normalize)
    config = _read_object(path / pooling_dir / "config.json")
    mode = config.get("pooling_mode")
    if not mode:
        flags = {
            "cls": "pooling_mode_cls_token",
            "mean": "pooling_mode_mean_tokens",
            "max": "pooling_mode_max_tokens",
            "lasttoken": "pooling_mode_lasttoken",
        }
        mode = next((name for name, key in flags.items() if config.get(key)), "mean")
    return Pooling(mode=mode, normalize=normalize)


FOREIGN_IDS = (
    "they look like another tokenizer's ids (LangChain's OpenAIEmbeddings sends OpenAI's cl100k_base ids by default),"
    " so send the text instead (LangChain: OpenAIEmbeddings(check_embedding_ctx_length=False))"
)


class EmbeddingModel:
    """One loaded embedding model: its tokenizer, its limits, and a batched forward pass."""

    def __init__(self, path: Path, config: dict) -> None:
        self.model, wrapper = embeddings_loader()(str(path))
        self.tokenizer = getattr(wrapper, "_tokenizer", wrapper)
        self.pooling = pooling_of(path)
        st_config = _read_object(path / "sentence_bert_config.json")
        limits = [st_config.get("max_seq_length"), config.get("max_position_embeddings")]
        limits.append(getattr(self.tokenizer, "model_max_length", None))
        self.max_tokens = min(n for n in limits if isinstance(n, int) and 0 < n < 1_000_000)
        vocab = config.get("vocab_size")
        self.vocab_size: int = vocab if isinstance(vocab, int) else len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.tokens_per_second: float | None = None  # padded tokens, measured by EmbeddingQueue
        self.dimensions = int(self.embed([self.tokenize(["dimension probe"], truncate=True)[0]]).shape[1])

    def tokenize(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]
        return [self._fit(list(ids), i, truncate) for i, ids in enumerate(encoded)]

    def check_ids(self, inputs: list[list[int]], truncate: bool) -> list[list[int]]:
        """Token id inputs, if they are this model's: ids past its vocabulary, or ids that do not
        come back the same when decoded and encoded again, are most likely another tokenizer's
        (LangChain's OpenAIEmbeddings sends OpenAI's cl100k_base ids by default), whose vectors
        would be silently wrong."""
        for i, ids in enumerate(inputs):
            if any(not 0 <= t < self.vocab_size for t in ids):
                problem = f"token ids must be between 0 and {self.vocab_size - 1}"
            elif not self._own_ids(ids):
                problem = "these token ids are not what this model's tokenizer makes"
            else:
                continue
            raise InvalidRequest(f"input {i}: {problem}; {FOREIGN_IDS}", param="input")
        return [self._fit(list(ids), i, truncate) for i, ids in enumerate(inputs)]

    def _own_ids(self, ids: list[int]) -> bool:
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        core = [t for t in ids if t not in special]
        if not core:
            return True
        again = self.tokenizer(self.tokenizer.decode(core), add_special_tokens=False)["input_ids"]
        return list(again) == core

    def _fit(self, ids: list[int], index: int, truncate: bool) -> list[int]:
        if len(ids) <= self.max_tokens:
            return ids
        if not truncate:
            raise InvalidRequest(
                f"input {index} has {len(ids)} tokens; this model takes at most {self.max_tokens}"
                ' (send "truncate": true to cut longer inputs to the limit)'
            )
        # Keep the final special token (e.g. [SEP]) when the tokenizer added one.
        last = ids[-1]
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        return ids[: self.max_tokens - 1] + [last] if last in special else ids[: self.max_tokens]

    def embed(self, sequences: list[list[int]]) -> Any:
        """Vectors (numpy float32, one row per sequence) for token sequences, in one forward pass."""
        import mlx.core as mx
        import numpy as np

        width = max(len(s) for s in sequences)
        ids = np.full((len(sequences), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(sequences), width), dtype=np.int32)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        mask_mx = mx.array(mask)
        output = self.model(mx.array(ids), attention_mask=mask_mx)
        hidden = getattr(output, "last_hidden_state", None)
        mode = self.pooling.mode
        if mode == "text_embeds" or hidden is None:
            vectors = output.text_embeds
        else:
            vectors = _pool(hidden, mask_mx, mode)
            if self.pooling.normalize:
                vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return np.array(vectors.astype(mx.float32))


def _pool(hidden: Any, mask: Any, mode: str) -> Any:
    import mlx.core as mx

    hidden = hidden.astype(mx.float32)
    weights = mask[..., None].astype(mx.float32)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "lasttoken":
        last = mask.sum(axis=1) - 1
        return mx.take_along_axis(hidden, last[:, None, None].astype(mx.int32), axis=1)[:, 0]
    if mode == "max":
        return mx.where(weights > 0, hidden, -1e9).max(axis=1)
    return (hidden * weights).sum(axis=1) / mx.maximum(weights.sum(axis=1), 1e-9)
