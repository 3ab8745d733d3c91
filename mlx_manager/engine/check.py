"""Can the engine load this model folder? `python -m mlx_manager.engine.check PATH` prints one JSON line:
`{"kind": "chat" | "text" | "embedding"}`, or `{"error": "..."}` with exit status 1.

`models pull` runs it in a process of its own, so the check's MLX work never runs beside the
daemon's inference thread and its memory is given back when it ends. It loads the way the pool
does, but lazily: the architecture is built and every weight's name and shape checked against
it, and the tokenizer (or the sentence-transformers pooling) is loaded; nothing is computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def check(path: Path) -> str:
    """The model's kind; raises what mlx-lm or mlx-embeddings raise when they cannot load it."""
    from mlx_manager.engine.embedding_model import embeddings_loader, is_embedding_model, pooling_of

    config = json.loads((path / "config.json").read_text())
    if is_embedding_model(path, config):
        load_embedding_model = embeddings_loader()  # the `embeddings` extra, or an error naming it
        pooling_of(path)
        load_embedding_model(str(path), lazy=True)
        return "embedding"
    from mlx_lm import load

    tokenizer = load(str(path), lazy=True)[1]
    return "chat" if tokenizer.has_chat_template else "text"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(json.dumps({"error": "usage: python -m mlx_manager.engine.check PATH"}))
        return 2
    try:
        kind = check(Path(argv[0]))
    except Exception as exc:  # whatever the loaders raise is the answer, said in one line
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(json.dumps({"error": f"{type(exc).__name__}: {message}" if message else type(exc).__name__}))
        return 1
    print(json.dumps({"kind": kind}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
