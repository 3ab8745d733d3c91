"""POST /v1/embeddings with a real embedding model (all-MiniLM-L6-v2), through the official client."""

from __future__ import annotations

import asyncio
import json
import math
import time

import httpx
import numpy as np
import openai
import pytest

from mlx_manager.daemon.app import create_app
from mlx_manager.engine.config import EngineConfig
from mlx_manager.engine.embedding_model import Pooling, _pool, pooling_of
from mlx_manager.engine.errors import ModelLoadFailed
from mlx_manager.runtime import admin_token
from mlx_manager.settings import config_path
from tests.daemon_server import LiveServer, RecordingEngine, assert_problem, settings_with, wait_until
from tests.embedding_model import reference
from tests.test_daemon_audit import row_for

REF = reference()
CAT, KITTEN, STOCK = REF["texts"][:3]


@pytest.fixture(scope="module")
def server(tmp_path_factory, minilm_model, fast_model):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLX_MANAGER_HOME", str(tmp_path_factory.mktemp("home")))
        engine = RecordingEngine(EngineConfig(preload=[minilm_model, fast_model], max_loaded=2))
        with LiveServer(create_app(settings_with(), engine=engine)) as live:
            assert wait_until(lambda: len(engine.status().loaded) == 2, timeout=120)
            yield live


def cosine(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_vectors_match_sentence_transformers(server, minilm_model, encoding_format):
    # The client asks for base64 unless told otherwise, and decodes it itself.
    options = {"encoding_format": encoding_format} if encoding_format == "float" else {}
    result = server.openai().embeddings.create(model=minilm_model, input=REF["texts"], **options)
    assert result.model == minilm_model and result.object == "list"
    assert [item.index for item in result.data] == list(range(len(REF["texts"])))
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(REF["prompt_tokens"])
    for item, expected in zip(result.data, REF["vectors"], strict=True):
        assert len(item.embedding) == 384
        assert math.isclose(np.linalg.norm(item.embedding), 1.0, abs_tol=1e-4)  # normalised, as the model says
        assert cosine(item.embedding, expected) > 0.99


def test_meaning_is_ranked_sensibly(server, minilm_model):
    result = server.openai().embeddings.create(model=minilm_model, input=[CAT, KITTEN, STOCK])
    cat, kitten, stock = (item.embedding for item in result.data)
    assert cosine(cat, kitten) > cosine(cat, stock) + 0.3


def test_one_string_and_token_id_inputs(server, minilm_model):
    client = server.openai()
    one = client.embeddings.create(model=minilm_model, input=CAT)
    assert len(one.data) == 1 and one.usage.prompt_tokens == REF["prompt_tokens"][0]
    ids = client.embeddings.create(model=minilm_model, input=REF["token_ids"][0])  # one input as token ids
    many = client.embeddings.create(model=minilm_model, input=REF["token_ids"][:3])
    assert cosine(ids.data[0].embedding, one.data[0].embedding) > 0.9999
    assert ids.usage.prompt_tokens == REF["prompt_tokens"][0]
    assert len(many.data) == 3 and many.usage.prompt_tokens == sum(REF["prompt_tokens"][:3])
    assert cosine(many.data[2].embedding, REF["vectors"][2]) > 0.99


def test_dimensions_cut_and_renormalise(server, minilm_model):
    full = np.array(server.openai().embeddings.create(model=minilm_model, input=CAT).data[0].embedding)
    cut = server.openai().embeddings.create(model=minilm_model, input=CAT, dimensions=64, encoding_format="float")
    vector = np.array(cut.data[0].embedding)
    assert vector.shape == (64,) and math.isclose(np.linalg.norm(vector), 1.0, abs_tol=1e-4)
    assert cosine(vector, full[:64]) > 0.9999
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().embeddings.create(model=minilm_model, input=CAT, dimensions=385)
    assert_problem(caught.value.response, 400, "invalid_request")
    assert "384" in caught.value.message


def test_input_over_the_limit_is_refused_or_truncated_on_request(server, minilm_model):
    long_text = "word " * 600
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().embeddings.create(model=minilm_model, input=[CAT, long_text])
    assert_problem(caught.value.response, 400, "invalid_request")
    assert "input 1 has 602 tokens" in caught.value.message and "at most 256" in caught.value.message
    cut = server.openai().embeddings.create(model=minilm_model, input=[long_text], extra_body={"truncate": True})
    assert cut.usage.prompt_tokens == 256 and len(cut.data[0].embedding) == 384


def test_wrong_kind_of_model_is_a_400_both_ways(server, minilm_model, fast_model):
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().embeddings.create(model=fast_model, input=CAT)
    assert_problem(caught.value.response, 400, "wrong_model_kind")
    assert "not an embedding model" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().chat.completions.create(model=minilm_model, messages=[{"role": "user", "content": "hi"}])
    assert_problem(caught.value.response, 400, "wrong_model_kind")
    assert "/v1/embeddings" in caught.value.message
    # The model still answers, and so does the text model.
    assert server.openai().embeddings.create(model=minilm_model, input=CAT).data
    assert server.openai().completions.create(model=fast_model, prompt="hi", max_tokens=2).choices


@pytest.mark.parametrize(
    "body, where",
    [
        ({"input": []}, "input must not be empty"),
        ({"input": ""}, "input 0 is empty"),
        ({"input": ["ok", ""]}, "input 1 is empty"),
        ({"input": [[]]}, "input 0 is empty"),
        ({"input": ["x"] * 2049}, "at most 2048"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": [[-1]]}, "input"),
        ({"input": 42}, "input"),
    ],
)
def test_invalid_bodies_are_422_problems(server, minilm_model, body, where):
    with server.http() as http:
        response = http.post("/v1/embeddings", json={"model": minilm_model, **body})
    document = assert_problem(response, 422, "validation_error")
    assert where in document["detail"]


def test_token_ids_outside_the_vocabulary_are_a_400(server, minilm_model):
    with pytest.raises(openai.BadRequestError) as caught:
        server.openai().embeddings.create(model=minilm_model, input=[[101, 30522, 102]])
    assert "between 0 and 30521" in caught.value.message


def test_unknown_model_is_a_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.openai().embeddings.create(model="no/such-embedder", input=CAT)
    assert_problem(caught.value.response, 404, "model_not_found")


def test_concurrent_requests_are_batched_correctly(server, minilm_model):
    texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "stocks", "rain", "tea"] * 6)]
    alone = [server.openai().embeddings.create(model=minilm_model, input=t).data[0].embedding for t in texts[:4]]

    async def together():
        client = server.async_openai()
        return await asyncio.gather(*(client.embeddings.create(model=minilm_model, input=[t]) for t in texts))

    results = asyncio.run(together())
    assert [len(r.data) for r in results] == [1] * len(texts)
    for vector, result in zip(alone, results[:4], strict=True):
        assert cosine(vector, result.data[0].embedding) > 0.9999
    assert server.engine.status().active_jobs == 0


def test_requests_are_audited_with_tokens(server, minilm_model):
    raw = server.openai().embeddings.with_raw_response.create(model=minilm_model, input=[CAT, STOCK])
    row = row_for(server, raw.headers["x-request-id"])
    assert row["endpoint"] == "/v1/embeddings" and row["status"] == "success" and row["model"] == minilm_model
    assert row["prompt_tokens"] == raw.parse().usage.prompt_tokens == REF["prompt_tokens"][0] + REF["prompt_tokens"][2]
    assert row["completion_tokens"] == 0


def test_models_lists_the_embedding_model(server, minilm_model):
    assert minilm_model in [m.id for m in server.openai().models.list().data]


def test_timeout_stops_the_work(tmp_path, minilm_model):
    """timeouts.embeddings gives a 504 and the engine drops the rest of the request's batches."""
    engine = RecordingEngine(EngineConfig(preload=[minilm_model]))
    settings = settings_with(timeouts={"embeddings": 1})
    texts = [f"{i} " + "many words in a long input " * 40 for i in range(256)]  # minutes of work here
    with LiveServer(create_app(settings, engine=engine)) as live:
        assert wait_until(lambda: engine.status().loaded, timeout=120)
        started = time.monotonic()
        with live.http(timeout=120) as http:
            body = {"model": minilm_model, "input": texts}
            response = http.post("/v1/embeddings", json=body, headers={"X-Request-ID": "embed-timeout"})
        document = assert_problem(response, 504, "timeout")
        assert document["timeout_seconds"] == 1 and "timeouts.embeddings" in document["detail"]
        assert time.monotonic() - started > 0.9
        # The answer came at the deadline, not after the work, and the engine dropped the rest.
        assert_dropped_unfinished(engine, texts)
        row = row_for(live, "embed-timeout")
        assert row["status"] == "timeout" and row["error_type"] == "timeout" and row["endpoint"] == "/v1/embeddings"
        # And the model serves the next request (given the default deadline: on a busy machine
        # even one short text can take more than a second).
        config_path().write_text("[timeouts]\nembeddings = 120\n")
        with live.http() as http:
            assert http.post("/admin/reload", headers={"Authorization": f"Bearer {admin_token()}"}).status_code == 200
        assert live.openai().embeddings.create(model=minilm_model, input=CAT).data


def test_disconnect_cancels_the_work(minilm_model):
    engine = RecordingEngine(EngineConfig(preload=[minilm_model]))
    texts = [f"{i} " + "many words in a long input " * 40 for i in range(256)]
    with LiveServer(create_app(settings_with(), engine=engine)) as live:
        assert wait_until(lambda: engine.status().loaded, timeout=120)
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting after a second and hangs up
            with live.http(timeout=httpx.Timeout(60, read=1.0)) as http:
                http.post("/v1/embeddings", json={"model": minilm_model, "input": texts})
        assert_dropped_unfinished(engine, texts)


def assert_dropped_unfinished(engine: RecordingEngine, texts: list[str]) -> None:
    """Once the engine is idle again, the request's one job was cancelled before it was done, and
    some of its inputs were never taken into a batch: nothing computed the abandoned inputs."""
    assert wait_until(lambda: engine.status().active_jobs == 0 and engine.status().queue_depth == 0)
    [job] = engine.embedding_jobs
    # A job cancelled while still queued (a busy machine) never started: it computed nothing at all.
    assert job.cancelled and (job.work is None or job.work.cursor < len(texts))


def write_st_folder(folder, modules, pooling=None):
    folder.mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (folder / "1_Pooling").mkdir()
        (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    return folder


ST = "sentence_transformers.models."


@pytest.mark.parametrize(
    "pooling, normalize, expected",
    [
        ({"pooling_mode_cls_token": True}, True, Pooling("cls", True)),
        ({"pooling_mode_mean_tokens": True}, False, Pooling("mean", False)),
        ({"pooling_mode_lasttoken": True}, True, Pooling("lasttoken", True)),
        ({"pooling_mode": "max"}, True, Pooling("max", True)),
    ],
)
def test_pooling_follows_the_sentence_transformers_files(tmp_path, pooling, normalize, expected):
    modules = [{"type": ST + "Transformer", "path": ""}, {"type": ST + "Pooling", "path": "1_Pooling"}]
    if normalize:
        modules.append({"type": ST + "Normalize", "path": "2_Normalize"})
    assert pooling_of(write_st_folder(tmp_path / "m", modules, pooling)) == expected


def test_a_folder_without_sentence_transformers_files_uses_mlx_embeddings_pooling(tmp_path):
    assert pooling_of(tmp_path) == Pooling("text_embeds", True)


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path):
    modules = [{"type": ST + "Transformer", "path": ""}, {"type": ST + "Dense", "path": "2_Dense"}]
    with pytest.raises(ModelLoadFailed, match="Dense"):
        pooling_of(write_st_folder(tmp_path / "m", modules))


def test_pooling_modes_ignore_padding():
    import mlx.core as mx

    hidden = mx.array([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]], [[2.0, 2.0], [0.0, 6.0], [5.0, -1.0]]])
    mask = mx.array([[1, 1, 0], [1, 1, 1]])  # the first row's last position is padding
    assert np.allclose(_pool(hidden, mask, "mean"), [[2.0, 2.0], [7 / 3, 7 / 3]])
    assert _pool(hidden, mask, "cls").tolist() == [[1.0, 0.0], [2.0, 2.0]]
    assert _pool(hidden, mask, "max").tolist() == [[3.0, 4.0], [5.0, 6.0]]
    assert _pool(hidden, mask, "lasttoken").tolist() == [[3.0, 4.0], [5.0, -1.0]]
