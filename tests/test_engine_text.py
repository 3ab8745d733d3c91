"""Text out of tokens: multi-byte characters arrive whole, stop strings never leak; models from the HF cache."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from mlx_manager.engine.textstream import TextStream

SAMPLE = "naïve café — 日本語のテキスト 🎉🚀 done"


@pytest.fixture(scope="module")
def tokenizer(fast_model):
    from mlx_lm.tokenizer_utils import load

    return load(Path(fast_model))


def _stream(tokenizer, text, stop=()):
    tokens = tokenizer.encode(text)
    stream = TextStream(tokenizer.detokenizer, list(stop))
    deltas = []
    for token in tokens:
        deltas.append(stream.add(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


def test_multibyte_characters_are_never_split(tokenizer):
    tokens = tokenizer.encode(SAMPLE)
    assert len(tokens) > len(SAMPLE.encode()) / 4  # byte-level pieces: characters span tokens
    deltas, _ = _stream(tokenizer, SAMPLE)
    assert "".join(deltas) == SAMPLE
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_is_cut_and_never_sent_even_across_tokens(tokenizer):
    deltas, stream = _stream(tokenizer, SAMPLE, stop=["テキスト"])
    assert stream.stopped
    assert "".join(deltas) == SAMPLE[: SAMPLE.index("テキスト")]
    assert not any("テ" in d for d in deltas)


def test_overlapping_and_repetitive_stop_strings_match_where_they_first_end(tokenizer):
    # A stop string whose start repeats inside it (a naive scan restarts at the wrong place).
    deltas, stream = _stream(tokenizer, "aab aaab done", stop=["aaab", "zz"])
    assert stream.stopped and "".join(deltas) == "aab "
    # Of two stop strings, the one completed first wins, even if the other started earlier.
    deltas, stream = _stream(tokenizer, "xabcd", stop=["abcd", "bc"])
    assert stream.stopped and "".join(deltas) == "xa"


def test_partial_stop_is_released_when_it_turns_out_not_to_be_one(tokenizer):
    deltas, stream = _stream(tokenizer, "café caff coffee", stop=["cafx"])
    assert not stream.stopped
    assert "".join(deltas) == "café caff coffee"


def test_a_model_in_the_hugging_face_cache_loads_offline(fast_model, tmp_path, monkeypatch):
    from mlx_manager.engine.config import EngineConfig
    from mlx_manager.engine.engine import Engine
    from mlx_manager.engine.types import Finished, GenerationRequest, SamplingParams

    cache = tmp_path / "hub"
    snapshot = cache / "models--tiny-org--tiny-llama" / "snapshots" / "0123456789abcdef"
    shutil.copytree(fast_model, snapshot)
    (cache / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (cache / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0123456789abcdef")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))

    async def main():
        engine = Engine(EngineConfig())
        engine.start()
        try:
            job = engine.submit(
                GenerationRequest(
                    model="tiny-org/tiny-llama", prompt="hi", max_tokens=3, sampling=SamplingParams(temperature=0)
                )
            )
            events = [e async for e in job]
            assert events[-1] == Finished("length", events[0].prompt_tokens, 3)
            assert engine.status().loaded == ["tiny-org/tiny-llama"]
        finally:
            engine.stop()

    asyncio.run(main())
