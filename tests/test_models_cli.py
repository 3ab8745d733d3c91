"""`mlx-manager models list | rm | ps | load | unload` as a user sees them without a daemon: the
Hugging Face cache (laid out here as huggingface_hub lays it out: blobs, snapshot links, refs),
configured model folders, the printed lines and exit codes. The daemon's side is in
test_models_daemon.py; pulling in test_models_pull.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.hub.pull import format_bytes
from mlx_manager.settings import config_path
from tests.test_cli_basics import HEAVY, _modules_after

runner = CliRunner()


def models(*args: str, **kwargs):
    return runner.invoke(app, ["models", *args], **kwargs)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return cache


def cache_model(cache: Path, repo: str, folder: Path | str, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put a model folder in the cache as huggingface_hub does: each file a blob named by its
    checksum, linked from snapshots/<commit>/, and refs/<branch or tag> naming the commit."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    for file in sorted(Path(folder).iterdir()):
        content = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (storage / "refs").mkdir(exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snapshot


def variant(source: str, target: Path, *, config: dict | None = None, extra: dict[str, str] | None = None) -> Path:
    """A copy of a model folder with its config changed and files added."""
    shutil.copytree(source, target)
    if config:
        path = target / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    for name, text in (extra or {}).items():
        (target / name).write_text(text)
    return target


def size_of(folder: Path | str) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir())


COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


def test_list_shows_the_cache_and_the_configured_folders(hf_cache, tmp_path, fast_model, no_template_model):
    cache_model(hf_cache, "org/chat", fast_model, COMMIT_A)
    quantized = variant(fast_model, tmp_path / "q", config={"quantization": {"bits": 4, "group_size": 64}})
    cache_model(hf_cache, "org/quant", quantized, COMMIT_A, refs=("v2",))
    (hf_cache / "models--org--tokenizer-only" / "snapshots" / COMMIT_B).mkdir(parents=True)  # not a model: not listed
    folders = tmp_path / "models"
    folders.mkdir()
    plain = variant(no_template_model, folders / "plain")
    embedder = variant(fast_model, folders / "embedder", extra={"modules.json": "[]"})
    (folders / "notes").mkdir()  # a folder that is no model
    config_path().write_text(f'[models]\nfolders = ["{folders}"]\nallowed = ["org/chat", "{plain}"]\n')

    listed = models("list", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    assert [(r["id"], r["kind"], r["quantization"], r["allowed"], r["source"]) for r in rows] == [
        ("org/chat", "chat", "f32", True, "hf-cache"),
        ("org/quant@v2", "chat", "4-bit", False, "hf-cache"),
        (str(embedder), "embedding", "f32", False, "folder"),
        (str(plain), "text", "f32", True, "folder"),
    ]
    assert [r["size_bytes"] for r in rows] == [
        size_of(fast_model),
        size_of(quantized),
        size_of(embedder),
        size_of(plain),
    ]
    assert rows[0]["commit"] == COMMIT_A and rows[0]["path"] == str(
        hf_cache / "models--org--chat" / "snapshots" / COMMIT_A
    )
    assert all(r["last_used"] is None for r in rows)

    table = models("list").stdout.splitlines()
    assert table[0].split() == ["ID", "KIND", "SIZE", "QUANT", "ALLOWED", "LAST", "USED"]
    assert table[1].split() == ["org/chat", "chat", *format_bytes(size_of(fast_model)).split(), "f32", "yes", "never"]
    assert table[2].split()[-3:] == ["4-bit", "no", "never"]


def test_list_finds_the_last_use_under_an_alias(hf_cache, tmp_path, fast_model, isolated_home):
    """The audit log names a model by its alias in models.aliases (daemon/model_names.py)."""
    from tests.audit_rows import ago, fill, record

    cache_model(hf_cache, "org/chat", fast_model, COMMIT_A)
    folders = tmp_path / "models"
    plain = variant(fast_model, folders / "plain")
    config_path().write_text(f'[models]\nfolders = ["{folders}"]\naliases = {{ chat = "org/chat", p = "{plain}" }}\n')
    fill(
        isolated_home / "audit.db",
        [record(model="chat", timestamp=ago(hours=3)), record(model="p", timestamp=ago(days=2))],
    )
    rows = {r["id"]: r["last_used"] for r in json.loads(models("list", "--json").stdout)}
    assert set(rows) == {"org/chat", str(plain)} and all(rows.values()), rows
    assert rows["org/chat"] > rows[str(plain)]


def test_list_with_nothing_here_says_how_to_get_a_model(hf_cache):
    listed = models("list")
    assert listed.exit_code == 0
    assert listed.stdout == (
        "No models here yet. Get one with `mlx-manager models pull mlx-community/Qwen3-0.6B-4bit`.\n"
    )
    assert models("list", "--json").stdout == "[]\n"


def test_rm_asks_first_and_deletes_the_repo(hf_cache, fast_model):
    snapshot = cache_model(hf_cache, "org/chat", fast_model, COMMIT_A)
    size = format_bytes(size_of(fast_model))
    kept = models("rm", "org/chat", input="n\n")
    assert kept.exit_code == 1
    assert kept.stdout == f"Delete org/chat, {size}, from {hf_cache / 'models--org--chat'}? [y/N]: n\n"
    assert kept.stderr == "Error: nothing deleted.\n" and snapshot.exists()

    removed = models("rm", "org/chat", input="y\n")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout.endswith(f"Deleted org/chat ({size} freed)\n")
    assert not (hf_cache / "models--org--chat").exists()


def test_rm_of_one_revision_keeps_the_others_and_their_shared_files(hf_cache, fast_model, tmp_path):
    newer = variant(fast_model, tmp_path / "newer", config={"rope_theta": 20000.0})
    cache_model(hf_cache, "org/chat", fast_model, COMMIT_A, refs=("v1",))
    main = cache_model(hf_cache, "org/chat", newer, COMMIT_B, refs=("main",))
    removed = models("rm", "org/chat@v1", "--yes", "--json")
    assert removed.exit_code == 0, removed.output
    answer = json.loads(removed.stdout)
    assert answer["deleted"] == "org/chat@v1" and answer["commits"] == [COMMIT_A] and answer["unloaded"] == []
    assert not (hf_cache / "models--org--chat" / "snapshots" / COMMIT_A).exists()
    assert all((main / f.name).read_bytes() == f.read_bytes() for f in newer.iterdir())  # shared blobs kept
    assert [r["id"] for r in json.loads(models("list", "--json").stdout)] == ["org/chat"]


def test_rm_clears_what_an_interrupted_pull_left(hf_cache):
    storage = hf_cache / "models--org--half"
    (storage / "snapshots").mkdir(parents=True)
    (storage / "blobs").mkdir()
    (storage / "blobs" / f"{'c' * 64}.incomplete").write_bytes(b"\0" * 1000)
    removed = models("rm", "org/half", "--yes")
    assert removed.exit_code == 0, removed.output
    assert removed.stdout == "Deleted org/half (1.0 kB freed)\n" and not storage.exists()


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        (
            "org/none",
            1,
            "Error: org/none is not in the Hugging Face cache ({cache}). `mlx-manager models list` shows what is.",
        ),
        ("org/chat@v9", 1, "Error: org/chat has no cached revision 'v9'. `mlx-manager models list` shows what is."),
        (
            "./a-folder",
            2,
            "Error: './a-folder' is not a Hugging Face repo id. "
            "Give it as ORG/NAME or ORG/NAME@REVISION, e.g. mlx-community/Qwen3-0.6B-4bit.",
        ),
    ],
)
def test_rm_refusals(hf_cache, fast_model, model, code, message):
    cache_model(hf_cache, "org/chat", fast_model, COMMIT_A)
    refused = models("rm", model, "--yes")
    assert refused.exit_code == code
    assert refused.stderr == message.format(cache=hf_cache) + "\n"


@pytest.mark.parametrize("command", [["ps"], ["load", "org/chat"], ["unload", "org/chat"]])
def test_daemon_commands_without_a_daemon(command):
    done = models(*command)
    assert done.exit_code == 1
    assert done.stderr == "Error: no daemon is running. Start one with `mlx-manager start`.\n"
    as_json = models(*command, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stderr) == {
        "error": "no daemon is running.",
        "hint": "Start one with `mlx-manager start`.",
    }


def test_models_help_and_list_stay_light(hf_cache, fast_model):
    cache_model(hf_cache, "org/chat", fast_model, COMMIT_A)
    for argv in (("models", "--help"), ("models", "list")):
        code, out, modules = _modules_after(*argv)
        assert code == 0, out
        assert not modules & set(HEAVY), f"{' '.join(argv)} imported {sorted(modules & set(HEAVY))}"
    assert "org/chat" in _modules_after("models", "list")[1]


def test_repo_ids_complete_from_the_hugging_face_cache(tmp_path):
    from tests.test_cli_help import complete

    cache = tmp_path / "hub"
    (cache / "models--org-b--cached-model").mkdir(parents=True)
    env = {"HF_HUB_CACHE": str(cache)}
    assert complete("mlx-manager models rm org-b", env) == ["org-b/cached-model"]
    assert complete("mlx-manager models load ", env) == ["org-b/cached-model"]
    assert complete("mlx-manager models unload org", env) == ["org-b/cached-model"]
