"""Which grammar engine constrains decoding: llguidance, xgrammar or outlines-core, measured.

Reproduce (llguidance is in the project's venv; the other two go into a scratch venv that
sees the project's packages, so torch never enters /work/venv):

    python3 -m venv /tmp/gbench-venv
    echo /work/venv/lib/python3.11/site-packages > /tmp/gbench-venv/lib/python3.11/site-packages/zz.pth
    /tmp/gbench-venv/bin/pip install torch==2.13.0          # the CPU wheel on local disk
    /tmp/gbench-venv/bin/pip install xgrammar==0.2.8 outlines-core==0.2.14
    cd /work/wt/grammar && PYTHONPATH=$PWD /tmp/gbench-venv/bin/python benchmarks/grammar_engines.py

An engine that does not import is reported as missing; the rest still run.

Tokenizers: "fast" is the test suite's model (tests/models.py: byte-level BPE, 512 tokens);
"bpe32k" is a byte-level BPE trained here with `tokenizers` on 12 MB of the Python standard
library's sources, 32,000 tokens (no hub tokenizer is reachable offline).

What is measured, per engine and tokenizer:
- tokenizer: building the engine's view of the vocabulary (once per loaded model);
- compile: a typical schema (10 fields, a nested object, enum, pattern, ranges, optional
  fields), cold (a new title each time, so no engine cache helps), median of 5;
- hit: a compile-cache hit as the project does it (dict lookup + a new matcher for one
  sequence from the compiled grammar), median;
- mask: computing the next-token bitmask while walking a valid 100-200-token instance
  (second walk; the first warms the engine's lazy lexer), median, mean and p99;
- apply: turning the int32 bitmask into masked MLX logits (engine-independent), three ways;
- features: each JSON-schema feature the issue lists and some it does not: "enforced"
  (a valid instance passes, one that breaks the feature is refused), "IGNORED" (the
  breaking instance passes: silently not enforced), "REJECTS VALID", or the error text;
- a tokenizer the engine cannot use (WordPiece, as in BERT): what the engine says.

- decoding: the project's module (mlx_manager.engine.constraints) on mlx-lm, tokens/s with
  and without a constraint, 1 sequence (generate_step) and 8 (BatchGenerator), on the fast
  model and on the "bench" model of tests/models.py given the 32k tokenizer; plus the
  processor's own work per call (advance the matcher; compute + apply the mask).

Conclusion: llguidance (1.9.1).

First run, 2026-11-29 on the 2-core x86_64 machine (load average ~5 from other workers):

  engine / tokenizer            | tokenizer | compile    | hit    | mask mean | mask p99
  llguidance 1.9.1 / fast       | 16 ms     | 4.4 ms     | 1.8 us | 24 us     | 95 us
  xgrammar 0.2.8 / fast         | 9 ms      | 25.5 ms    | 7.2 us | 3.5 us    | 21 us
  outlines-core 0.2.14 / fast   | 1315 ms   | 64 ms      | 0.5 us | 4.1 us    | 6.7 us
  llguidance 1.9.1 / bpe32k     | 819 ms    | 1.95 ms    | 1.1 us | 30 us     | 178 us
  xgrammar 0.2.8 / bpe32k       | 788 ms    | 1749 ms    | 4.6 us | 162 us    | 4861 us
  outlines-core 0.2.14 / bpe32k | 1341 ms   | 4074 ms    | 0.5 us | 27 us     | 139 us

  (a second run at load average ~10 was 3-10x slower across the board, in the same order)

Why llguidance:
- Compile: a typical schema in 2-5 ms at 32k tokens (target 50 ms); xgrammar precomputes
  token masks for the grammar (1.7 s here at 32k on 2 cores) and outlines-core builds a
  regex index over the whole vocabulary (4 s, growing with vocabulary and schema).
- A cache hit (deep_copy of the compiled matcher) is 1-2 us (target 1 ms).
- Per token: ~30 us for the mask at 32k, a few us to take in the token; the first tokens of
  a new grammar pay for its lazily built lexer (the p99). xgrammar is faster on the tiny
  vocabulary, slower at 32k here.
- Never silent: it enforces every feature the issue lists, and names what it cannot
  enforce ("Unimplemented keys: [\"uniqueItems\"]"); xgrammar silently ignores
  uniqueItems and `not`, and outlines-core ignores integer ranges and multipleOf and rejects
  valid numbers in a range.
- A tokenizer it cannot use is an error saying so ("can't determine decoder type:
  WordPiece"); xgrammar takes a WordPiece tokenizer silently and then cannot produce the
  JSON, outlines-core takes whatever bytes the caller makes of the vocabulary.
- Lark grammars with embedded JSON schemas (`%json {...}`) and special tokens by id, so a
  tool call can sit inside the model's own markup.
- Dependencies: none, and it is already installed (mlx-vlm, which mlx-embeddings brings,
  requires it). xgrammar requires torch (754 MB) and, on Linux x86_64, triton (1 GB).

Applying the mask on the MLX side: a 256x8 byte table gathered by the bitmask's bytes is the
quickest of the three ways measured at 32k and 152k tokens (110 us vs 220 us for NumPy
unpacking, including an eval), and the module reuses the result while the mask is unchanged.

The decoding table shows what a constrained sequence costs on this machine's tiny models,
where a step takes ~1-10 ms and the machine is shared: there the cost is dominated by the
wait for each step's token before the mask can be computed (the pipeline bubble every
grammar engine has) and by noise. Run at load average ~10 (2026-11-29), the ratios swung
from +61 % to -19 % between rows; the processor's own work per call was 28-47 us to take in
the token and 190-370 us for mask + apply (~100 us in all on a quieter run, of which ~55 us
the mask itself). That work is what carries over to larger models, whose steps are 20-50 ms
(~0.5 % a sequence); the bubble is one token's wait per step, hidden partly because the
processor starts the step's forward pass before computing its mask.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEPARATORS = (", ", ": ")  # json.dumps's defaults: every engine is set to produce exactly these

TYPICAL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["admin", "user", "guest"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "active": {"type": "boolean"},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string"},
                "city": {"type": "string"},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city"],
            "additionalProperties": False,
        },
        "nickname": {"type": ["string", "null"]},
        "created": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "email", "role", "address"],
    "additionalProperties": False,
}
TYPICAL_INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "email": "ada@math.com",
    "tags": ["math", "poetry"],
    "role": "admin",
    "score": 0.93,
    "active": True,
    "address": {"street": "1 St James Square", "city": "London", "zip": "12345"},
    "nickname": None,
    "created": "1843-07-10",
}


def _obj(props: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required or list(props), "additionalProperties": False}


# (feature, schema, valid instance, an instance that breaks only that feature)
FEATURES: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("object, required", _obj({"a": {"type": "integer"}, "b": {"type": "string"}}), {"a": 1, "b": "x"}, {"a": 1}),
    ("optional field", _obj({"a": {"type": "integer"}, "b": {"type": "string"}}, ["a"]), {"a": 1}, {"b": "x"}),
    ("additionalProperties false", _obj({"a": {"type": "integer"}}), {"a": 1}, {"a": 1, "z": 2}),
    ("nested object", _obj({"o": _obj({"p": {"type": "boolean"}})}), {"o": {"p": True}}, {"o": {"p": 3}}),
    ("array items", {"type": "array", "items": {"type": "integer"}}, [1, 2], [1, "x"]),
    (
        "array min/maxItems",
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
        [1],
        [1, 2, 3],
    ),
    ("enum", {"enum": ["red", "green", 3]}, "green", "blue"),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("string pattern", {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, "ABC-12", "abc-12"),
    ("string min/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "abcdef"),
    ("integer min/max", {"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    ("number min/max", {"type": "number", "minimum": 0.5, "maximum": 1.5}, 1.25, 2.5),
    ("exclusiveMinimum", {"type": "integer", "exclusiveMinimum": 0}, 1, 0),
    ("format date-time", {"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "yesterday"),
    ("type union + null", {"type": ["integer", "null"]}, None, "x"),
    ("anyOf", {"anyOf": [{"type": "integer"}, _obj({"k": {"type": "string"}})]}, {"k": "v"}, {"k": 1}),
    (
        "$ref recursive",
        {
            "$defs": {
                "node": _obj(
                    {"v": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}
                )
            },
            "$ref": "#/$defs/node",
        },
        {"v": 1, "next": {"v": 2, "next": None}},
        {"v": 1, "next": {"v": "x", "next": None}},
    ),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 10, 7),
    ("not", {"not": {"type": "string"}}, 1, "s"),
    ("minProperties", {"type": "object", "minProperties": 1}, {"a": 1}, {}),
    (
        "patternProperties",
        {"type": "object", "patternProperties": {"^x": {"type": "integer"}}, "additionalProperties": False},
        {"x1": 1},
        {"x1": "s"},
    ),
]


# -- tokenizers ----------------------------------------------------------------------------------
def fast_tokenizer(work: Path) -> Path:
    from tests.models import build_tokenizer

    folder = work / "fast"
    if not (folder / "tokenizer.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_tokenizer(folder, 512)
    return folder / "tokenizer.json"


def _stdlib_text(limit: int) -> Iterator[str]:
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" in path.parts:
            continue
        text = path.read_text(errors="ignore")
        total += len(text)
        yield text
        if total > limit:
            return


def bpe32k_tokenizer(work: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tests.models import SPECIAL_TOKENS

    path = work / "bpe32k" / "tokenizer.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=32000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_stdlib_text(12_000_000), trainer=trainer)
    tokenizer.save(str(path))
    return path


def wordpiece_tokenizer(work: Path) -> Path:
    """A BERT-style WordPiece tokenizer: no byte-level pieces, "##" continuations."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    path = work / "wordpiece" / "tokenizer.json"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=2000, special_tokens=["[UNK]", "[SEP]", "[CLS]"], show_progress=False
    )
    tokenizer.train_from_iterator(_stdlib_text(1_000_000), trainer=trainer)
    tokenizer.save(str(path))
    return path


def _hf(path: Path, eos: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=eos)


# -- engines -----------------------------------------------------------------------------------
class Engine:
    """One grammar engine behind the few calls a decoder makes."""

    name = ""
    version = ""
    vocab = 0
    tokenizer_note = ""  # what the engine does with a tokenizer it cannot use, if not an error

    def prepare(self, path: Path, eos: str) -> None:
        raise NotImplementedError

    def compile(self, schema: dict[str, Any]) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, m: Any, mask: np.ndarray) -> None:
        raise NotImplementedError

    def consume(self, m: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, m: Any) -> bool:
        raise NotImplementedError


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self) -> None:
        import llguidance
        import llguidance.numpy

        self.llg, self.llg_numpy = llguidance, llguidance.numpy
        self.version = llguidance.__version__

    def prepare(self, path: Path, eos: str) -> None:
        hf = _hf(path, eos)
        self.tokenizer = self.llg.LLTokenizer(hf.backend_tokenizer.to_str(), eos_token=hf.eos_token_id)
        self.vocab = self.tokenizer.vocab_size

    def compile(self, schema: dict[str, Any]) -> Any:
        options: Any = {"item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1], "whitespace_flexible": False}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=options)
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, mask: np.ndarray) -> None:
        self.llg_numpy.fill_next_token_bitmask(m, mask, 0)

    def consume(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))

    def accepting(self, m: Any) -> bool:
        return bool(m.is_accepting())


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self) -> None:
        import xgrammar

        self.xgr = xgrammar
        from importlib.metadata import version

        self.version = version("xgrammar")

    def prepare(self, path: Path, eos: str) -> None:
        hf = _hf(path, eos)
        self.info = self.xgr.TokenizerInfo.from_huggingface(hf, stop_token_ids=[hf.eos_token_id])
        self.vocab = self.info.vocab_size
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=2, cache_enabled=False)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, mask: np.ndarray) -> None:
        m.fill_next_token_bitmask(mask, 0)

    def consume(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def accepting(self, m: Any) -> bool:
        return bool(m.is_completed()) if hasattr(m, "is_completed") else bool(m.is_terminated())


class OutlinesCore(Engine):
    name = "outlines-core"
    tokenizer_note = "takes a bytes vocabulary: telling a tokenizer it cannot use is left to the caller"

    def __init__(self) -> None:
        from importlib.metadata import version

        import outlines_core

        self.oc = outlines_core
        self.version = version("outlines-core")

    def prepare(self, path: Path, eos: str) -> None:
        # outlines-core takes the vocabulary as bytes: turning a tokenizer into that is the
        # caller's job (outlines, the library, does it in Python). Byte-level BPE here.
        from mlx_lm.tokenizer_utils import _byte_decoder
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        decoder = _byte_decoder()
        self.eos = tokenizer.token_to_id(eos)
        specials = {t.content for t in tokenizer.get_added_tokens_decoder().values()}
        table: dict[bytes, list[int]] = {}
        for piece, token_id in tokenizer.get_vocab().items():
            if piece in specials:
                continue
            if any(ch not in decoder for ch in piece):
                raise ValueError(f"token {piece!r} is not byte-level BPE; outlines-core needs its bytes")
            table.setdefault(bytes(decoder[ch] for ch in piece), []).append(token_id)
        self.vocabulary = self.oc.Vocabulary(self.eos, table)
        self.vocab = tokenizer.get_vocab_size()

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.oc.Guide(compiled)

    def fill(self, m: Any, mask: np.ndarray) -> None:
        m.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)

    def consume(self, m: Any, token: int) -> bool:
        try:
            m.advance(token, return_tokens=False)
        except Exception:
            return False
        return True

    def accepting(self, m: Any) -> bool:
        return bool(m.is_finished())


ENGINES: list[type[Engine]] = [LLGuidance, XGrammar, OutlinesCore]


# -- measurements --------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


def _walk(engine: Engine, compiled: Any, tokens: list[int]) -> tuple[bool, list[float]]:
    """Feed the tokens, computing the mask before each as a decoder would: (all accepted, mask times)."""
    mask = np.zeros((1, (engine.vocab + 31) // 32), dtype=np.int32)
    m = engine.matcher(compiled)
    times = []
    for token in tokens:
        start = time.perf_counter()
        engine.fill(m, mask)
        times.append(time.perf_counter() - start)
        if not (mask[0, token // 32] >> (token % 32)) & 1 or not engine.consume(m, token):
            return False, times
    return engine.accepting(m), times


def measure_speed(engine: Engine, tokenize: Callable[[str], list[int]]) -> dict[str, str]:
    compile_times = []
    for i in range(5):
        schema = {**TYPICAL_SCHEMA, "title": f"cold {i}"}
        start = time.perf_counter()
        compiled = engine.compile(schema)
        compile_times.append(time.perf_counter() - start)
    cache = {("tokenizer", "hash"): compiled}
    hits = []
    for _ in range(200):
        start = time.perf_counter()
        engine.matcher(cache[("tokenizer", "hash")])
        hits.append(time.perf_counter() - start)
    tokens = tokenize(json.dumps(TYPICAL_INSTANCE))
    _walk(engine, compiled, tokens)  # warm the lazy parts
    ok, masks = _walk(engine, compiled, tokens)
    masks.sort()
    return {
        "compile": _ms(statistics.median(compile_times)),
        "hit": _us(statistics.median(hits)),
        "mask median": _us(statistics.median(masks)),
        "mask mean": _us(statistics.fmean(masks)),
        "mask p99": _us(masks[int(len(masks) * 0.99)]),
        "walk": f"{len(tokens)} tok {'ok' if ok else 'REFUSED'}",
    }


def measure_features(engine: Engine, tokenize: Callable[[str], list[int]]) -> dict[str, str]:
    results = {}
    for feature, schema, valid, invalid in FEATURES:
        try:
            compiled = engine.compile(schema)
        except Exception as exc:  # the point: what each engine says
            results[feature] = "error: " + " ".join(str(exc).split())[:70]
            continue
        valid_ok, _ = _walk(engine, compiled, tokenize(json.dumps(valid)))
        invalid_ok, _ = _walk(engine, compiled, tokenize(json.dumps(invalid)))
        results[feature] = "REJECTS VALID" if not valid_ok else "IGNORED" if invalid_ok else "enforced"
    return results


def measure_unusable(engine_factory: type[Engine], path: Path) -> str:
    engine = engine_factory()
    if engine.tokenizer_note:
        return engine.tokenizer_note
    try:
        engine.prepare(path, "[SEP]")
        compiled = engine.compile({"type": "object", "properties": {"a": {"type": "string"}}})
    except Exception as exc:
        return "error: " + " ".join(str(exc).split())[:90]
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    ok, _ = _walk(engine, compiled, tokenizer.encode('{"a": "x"}').ids)
    return "accepted the tokenizer silently; " + ("walks JSON" if ok else "cannot produce valid JSON")


def measure_apply(vocab: int, batch: int = 1) -> dict[str, str]:
    """The MLX side: int32 bitmask -> masked logits, three ways (median of many)."""
    import mlx.core as mx

    logits = mx.random.normal((batch, vocab))
    mask = np.random.randint(-(2**31), 2**31 - 1, size=(batch, (vocab + 31) // 32), dtype=np.int64).astype(np.int32)
    shifts = mx.arange(32, dtype=mx.uint32)
    lut = mx.array([[0.0 if (b >> i) & 1 else float("-inf") for i in range(8)] for b in range(256)])
    neg_inf = mx.array(float("-inf"))

    def numpy_unpack() -> mx.array:
        bits = np.unpackbits(mask.view(np.uint8), axis=-1, bitorder="little")[:, :vocab]
        return mx.where(mx.array(bits.astype(np.bool_)), logits, neg_inf)

    def mlx_unpack() -> mx.array:
        words = mx.array(mask).view(mx.uint32)
        bits = ((words[:, :, None] >> shifts) & 1).reshape(batch, -1)[:, :vocab]
        return mx.where(bits.astype(mx.bool_), logits, neg_inf)

    def mlx_lut() -> mx.array:  # xgrammar's MLX kernel: a 256x8 table of 0/-inf per byte
        return logits + lut[mx.array(mask).view(mx.uint8)].reshape(batch, -1)[:, :vocab]

    out = {}
    for name, fn in (
        ("numpy unpack + where", numpy_unpack),
        ("mlx shift + where", mlx_unpack),
        ("mlx byte table", mlx_lut),
    ):
        mx.eval(fn())
        times = []
        for _ in range(300):
            start = time.perf_counter()
            mx.eval(fn())
            times.append(time.perf_counter() - start)
        out[name] = _us(statistics.median(times))
    base = []
    for _ in range(300):
        start = time.perf_counter()
        mx.eval(logits * 1.0)
        base.append(time.perf_counter() - start)
    out["(one trivial mlx op)"] = _us(statistics.median(base))
    return out


# -- the project's module, end to end ---------------------------------------------------------------
# A long answer of mixed structure: keys, bounded strings, enums, numbers; 100 items are more
# than the measured tokens, so no sequence ends early.
LONG_SCHEMA: dict[str, Any] = {
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
        "required": ["name", "age", "tags", "score"],
        "additionalProperties": False,
    },
}


def bench32k_model(work: Path) -> Path:
    """The benchmark-size model of tests/models.py with the 32k tokenizer (and 32k output rows)."""
    import shutil

    from tests.models import SIZES, ModelSize, build_model

    folder = work / "bench32k-model"
    if not (folder / "model.safetensors").exists():
        bench = SIZES["bench"]
        SIZES["bench32k"] = ModelSize(
            bench.hidden_size, bench.num_hidden_layers, bench.intermediate_size, bench.num_attention_heads, 32000
        )
        build_model(folder, "bench32k")
        shutil.copy(bpe32k_tokenizer(work), folder / "tokenizer.json")
    return folder


def measure_decoding(model_path: Path, steps: int = 120, rounds: int = 5) -> dict[str, str]:
    """Tokens/s with and without the constraint, 1 sequence (generate_step) and 8 (BatchGenerator).

    Rounds alternate constrained and plain runs; the best of each is kept (the machine is shared).
    """
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import BatchGenerator, generate_step

    from mlx_manager.engine.constraints import compile_constraint, json_schema_spec

    model, tokenizer = load(str(model_path))[:2]
    compiled = compile_constraint(json_schema_spec(LONG_SCHEMA), tokenizer)
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": f"people {i}"}], add_generation_prompt=True))
        for i in range(8)
    ]

    def solo(constrained: bool) -> float:
        processors: list[Any] | None = [compiled.processor()] if constrained else None
        steps_iter = generate_step(mx.array(prompts[0]), model, max_tokens=steps + 1, logits_processors=processors)
        next(steps_iter)  # the prompt
        start = time.perf_counter()
        for _ in steps_iter:
            pass
        return steps / (time.perf_counter() - start)

    def batch(constrained: bool) -> float:
        generator = BatchGenerator(model, completion_batch_size=8, prefill_batch_size=8)  # no stop tokens
        processors: list[Any] = [[compiled.processor()] if constrained else [] for _ in prompts]
        generator.insert(prompts, max_tokens=[steps + 2] * len(prompts), logits_processors=processors)
        try:
            while not generator.next()[1]:  # prefill, up to the first tokens
                pass
            start, tokens = time.perf_counter(), 0
            for _ in range(steps):
                tokens += len(generator.next()[1])
            return tokens / (time.perf_counter() - start)
        finally:
            generator.close()

    timers = _ProcessorTimers()
    best: dict[str, float] = {}
    with timers:
        for _ in range(rounds):
            for name, run in (("1 plain", lambda: solo(False)), ("1 json", lambda: solo(True))):
                best[name] = max(best.get(name, 0.0), run())
            for name, run in (("8 plain", lambda: batch(False)), ("8 json", lambda: batch(True))):
                best[name] = max(best.get(name, 0.0), run())
    return {
        "1 seq plain tok/s": f"{best['1 plain']:.0f}",
        "1 seq json tok/s": f"{best['1 json']:.0f}",
        "1 seq cost": f"{(1 - best['1 json'] / best['1 plain']) * 100:+.1f} %",
        "8 seq plain tok/s": f"{best['8 plain']:.0f}",
        "8 seq json tok/s": f"{best['8 json']:.0f}",
        "8 seq cost": f"{(1 - best['8 json'] / best['8 plain']) * 100:+.1f} %",
        **timers.report(),
    }


class _ProcessorTimers:
    """Time spent in the processor's own work per call (median), apart from waiting for the token.

    That work is what a constrained sequence adds to each step whatever the model's size;
    the tokens/s ratios above also hold the wait, and are only as steady as the machine.
    """

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {"advance": [], "mask": []}

    def __enter__(self) -> None:
        from mlx_manager.engine.constraints_mask import ConstrainedLogits

        self.saved = {
            name: getattr(ConstrainedLogits, f"_{name}" if name == "advance" else "_allowed") for name in self.times
        }
        for name, method in self.saved.items():
            setattr(ConstrainedLogits, method.__name__, self._timed(method, self.times[name]))

    def __exit__(self, *_: object) -> None:
        from mlx_manager.engine.constraints_mask import ConstrainedLogits

        for method in self.saved.values():
            setattr(ConstrainedLogits, method.__name__, method)

    @staticmethod
    def _timed(method: Callable[..., Any], into: list[float]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args)
            finally:
                into.append(time.perf_counter() - start)

        return timed

    def report(self) -> dict[str, str]:
        return {
            "advance (median)": _us(statistics.median(self.times["advance"])),
            "mask + apply (median)": _us(statistics.median(self.times["mask"])),
        }


def decoding_table(work: Path) -> None:
    from tests.models import build_model

    fast = work / "fast-model"
    if not (fast / "model.safetensors").exists():
        build_model(fast, "fast")
    _table(
        "mlx_manager.engine.constraints, decoding (best of 5)",
        {"fast (vocab 512)": measure_decoding(fast), "bench32k (vocab 32000)": measure_decoding(bench32k_model(work))},
    )


def _table(title: str, rows: dict[str, dict[str, str]]) -> None:
    columns = list(dict.fromkeys(k for row in rows.values() for k in row))
    width0 = max(len(title), *(len(r) for r in rows))
    widths = [max(len(c), *(len(row.get(c, "")) for row in rows.values())) for c in columns]
    print()
    print(" | ".join([title.ljust(width0), *(c.ljust(w) for c, w in zip(columns, widths, strict=True))]))
    print("-+-".join(["-" * width0, *("-" * w for w in widths)]))
    for name, row in rows.items():
        print(
            " | ".join([name.ljust(width0), *(row.get(c, "").ljust(w) for c, w in zip(columns, widths, strict=True))])
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mlx-manager-grammar-bench")
    parser.add_argument(
        "--decoding-only", action="store_true", help="only the end-to-end table (llguidance alone is enough)"
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.decoding_only:
        decoding_table(args.work)
        return
    from tokenizers import Tokenizer

    tokenizers = {"fast": (fast_tokenizer(args.work), "<|end|>"), "bpe32k": (bpe32k_tokenizer(args.work), "<|end|>")}
    engines: list[Engine] = []
    for factory in ENGINES:
        try:
            engines.append(factory())
        except ImportError as exc:
            print(f"{factory.name}: not installed ({exc})")
    speed: dict[str, dict[str, str]] = {}
    features: dict[str, dict[str, str]] = {}
    for label, (path, eos) in tokenizers.items():
        hf_tokenizer = Tokenizer.from_file(str(path))

        def tokenize(text: str, tokenizer: Any = hf_tokenizer) -> list[int]:
            return list(tokenizer.encode(text).ids)

        for engine in engines:
            start = time.perf_counter()
            engine.prepare(path, eos)
            prepared = time.perf_counter() - start
            row = {"tokenizer": _ms(prepared), **measure_speed(engine, tokenize)}
            speed[f"{engine.name} {engine.version} / {label}"] = row
            if label == "bpe32k":
                features[engine.name] = measure_features(engine, tokenize)
    _table("engine / tokenizer", speed)
    by_feature = {f: {name: features[name][f] for name in features} for f, *_ in FEATURES}
    _table("JSON-schema feature (bpe32k)", by_feature)
    wordpiece = wordpiece_tokenizer(args.work)
    _table("WordPiece tokenizer", {e.name: {"what happens": measure_unusable(type(e), wordpiece)} for e in engines})
    _table(
        "apply bitmask to MLX logits (batch 1)",
        {f"vocab {v}": measure_apply(v) for v in (512, 32000, 152000)},
    )
    decoding_table(args.work)
    print("\nreproduce: PYTHONPATH=$PWD python benchmarks/grammar_engines.py  (see the docstring for the scratch venv)")


if __name__ == "__main__":
    main()
