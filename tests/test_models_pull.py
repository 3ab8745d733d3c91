"""`mlx-manager models pull` as a user runs it: the real CLI in its own process, the real
huggingface_hub client, and a stand-in for the Hugging Face hub on loopback (tests/hub_server.py)
serving the tiny test model in the hub's URL layout. Only the remote side is a stand-in: the hub
cannot be reached from here."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.daemon_server import wait_until
from tests.hub_server import Cut, StandInHub, model_files

pytestmark = pytest.mark.slow

REPO = "org/tiny"
TORCH_ONLY = "org/torch-only"
# What the tiny model's repo holds besides the model: none of it is needed to serve it.
NOT_NEEDED = {"README.md", ".gitattributes", "pytorch_model.bin"}


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_manager.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def hub_env(hub: StandInHub, hf_home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return {
        **env,
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


def events_of(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def weights_of(model: str | Path) -> Path:
    return Path(model) / "model.safetensors"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(fast_model):
    hub = StandInHub()
    hub.add_commit(REPO, model_files(fast_model, {"pytorch_model.bin": b"\0" * 1000}))
    yield hub
    hub.close()


@pytest.fixture
def hf_home(tmp_path, monkeypatch, hub) -> Path:
    """A fresh Hugging Face home, with the environment pointing the CLI at the stand-in hub."""
    home = tmp_path / "hf"
    for name, value in hub_env(hub, home).items():
        if name.startswith("HF_"):
            monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.requests.clear()
    return home


def snapshot(hf_home: Path, repo: str, commit: str) -> Path:
    return hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / commit


def test_pull_reports_progress_as_json_and_fetches_only_what_a_model_needs(hub, hf_home, fast_model):
    done = run_cli("models", "pull", REPO, "--json")
    assert done.returncode == 0, done.stderr
    events = events_of(done.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "plan" and kinds[-2:] == ["check", "done"]
    plan, result = events[0], events[-1]
    commit = hub.repos[REPO].refs["main"]
    wanted = sorted(p.name for p in Path(fast_model).iterdir())
    assert (plan["model"], plan["revision"], plan["commit"]) == (REPO, "main", commit)
    assert [f["name"] for f in plan["files"]] == wanted and not any(f["cached"] for f in plan["files"])
    assert plan["total_bytes"] == sum((Path(fast_model) / n).stat().st_size for n in wanted)
    assert plan["free_bytes"] > plan["total_bytes"] and plan["present_bytes"] == 0
    # Each file starts, progresses and ends; the byte counts add up to the whole.
    assert [e["name"] for e in events if e["event"] == "file"] == wanted
    assert [e["name"] for e in events if e["event"] == "file_done"] == wanted
    progress = [e for e in events if e["event"] == "progress"]
    assert [p["bytes"] for p in progress] == sorted(p["bytes"] for p in progress)
    assert progress[-1]["bytes"] == progress[-1]["total_bytes"] == plan["total_bytes"]
    assert all(p["bytes_per_second"] >= 0 for p in progress)
    weights = [p for p in progress if p["name"] == "model.safetensors"]
    weights_size = (Path(fast_model) / "model.safetensors").stat().st_size
    assert weights[-1]["file_bytes"] == weights[-1]["file_size"] == weights_size
    assert result == {
        "event": "done",
        "model": REPO,
        "commit": commit,
        "path": str(snapshot(hf_home, REPO, commit)),
        "kind": "chat",
        "quantization": "f32",
        "size_bytes": plan["total_bytes"],
        "downloaded_bytes": plan["total_bytes"],
        "seconds": result["seconds"],
    }
    # The files arrived whole, in huggingface_hub's cache layout, and nothing else was fetched.
    folder = snapshot(hf_home, REPO, commit)
    assert sorted(p.name for p in folder.iterdir()) == wanted
    for name in wanted:
        assert (folder / name).is_symlink() and sha256(folder / name) == sha256(Path(fast_model) / name)
    assert (folder.parent.parent / "refs" / "main").read_text() == commit
    fetched = {r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["method"] == "GET" and "/resolve/" in r["path"]}
    assert fetched == set(wanted) and not fetched & NOT_NEEDED

    again = run_cli("models", "pull", REPO, "--json")
    assert again.returncode == 0, again.stderr
    replay = events_of(again.stdout)
    assert all(f["cached"] for f in replay[0]["files"]) and replay[0]["total_bytes"] == 0
    assert replay[-1]["downloaded_bytes"] == 0 and "progress" not in {e["event"] for e in replay}


def test_pull_prints_plain_lines_when_not_on_a_terminal(hub, hf_home, fast_model):
    from mlx_manager.hub.pull import format_bytes
    from mlx_manager.settings import config_path

    config_path().write_text('[models]\nallowed = ["org/other"]\n')
    done = run_cli("models", "pull", REPO)
    assert done.returncode == 0, done.stderr
    commit = hub.repos[REPO].refs["main"]
    files = sorted(Path(fast_model).iterdir())
    total = format_bytes(sum(f.stat().st_size for f in files))
    assert done.stderr.startswith(
        f"Pulling {REPO} at main (commit {commit[:12]}): {len(files)} of {len(files)} files, {total}\n"
    )
    weights = format_bytes((Path(fast_model) / "model.safetensors").stat().st_size)
    assert f"\n  model.safetensors ({weights})\n" in done.stderr and "Checking that the model loads..." in done.stderr
    assert "\x1b[" not in done.stderr  # no bars, no colours
    assert done.stderr.splitlines()[-1] == (
        "Warning: models.allowed does not list org/tiny, so the daemon will refuse it; "
        "add it with `mlx-manager config set models.allowed 'org/other, org/tiny'`."
    )
    assert done.stdout.splitlines() == [
        f"Pulled {REPO} ({total}, chat) into {snapshot(hf_home, REPO, commit)}",
        f"Serve it: mlx-manager serve --model {REPO}",
    ]


def test_a_connection_dropped_mid_file_resumes_where_it_stopped(hub, hf_home, fast_model):
    hub.cuts["model.safetensors"] = Cut(after=200_000)
    done = run_cli("models", "pull", REPO, "--json")
    assert done.returncode == 0, done.stderr
    gets = hub.gets_of("model.safetensors")
    assert [g["range"] for g in gets] == [None, "bytes=200000-"]  # the second asks only for the rest
    commit = hub.repos[REPO].refs["main"]
    assert sha256(snapshot(hf_home, REPO, commit) / "model.safetensors") == sha256(weights_of(fast_model))


def test_a_pull_stopped_with_ctrl_c_goes_on_where_it_stopped(hub, hf_home, fast_model, children):
    release = threading.Event()
    hub.cuts["model.safetensors"] = Cut(after=300_000, hold=release)
    env = hub_env(hub, hf_home)
    process = children.start(
        [sys.executable, "-m", "mlx_manager.cli", "models", "pull", REPO],
        ctrl_c=True,  # Ctrl-C reaches it even when the suite runs in the background (SIGINT ignored)
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        blobs = hf_home / "hub" / "models--org--tiny" / "blobs"

        def partial_size() -> int:
            return sum(p.stat().st_size for p in blobs.glob("*.incomplete")) if blobs.exists() else 0

        # Held by the server 300 kB in; what the client buffers reaches the disk as it goes.
        assert wait_until(lambda: partial_size() >= 290_000, timeout=120)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"Error: interrupted; what arrived so far stays in the cache. "
        f"Run `mlx-manager models pull {REPO}` again to go on from there."
    )
    assert partial_size() == 300_000

    hub.requests.clear()
    done = run_cli("models", "pull", REPO, "--json")
    assert done.returncode == 0, done.stderr
    plan = events_of(done.stdout)[0]
    assert plan["present_bytes"] == 300_000
    started = next(e for e in events_of(done.stdout) if e["event"] == "file" and e["name"] == "model.safetensors")
    assert started["resume_from"] == 300_000
    assert [g["range"] for g in hub.gets_of("model.safetensors")] == ["bytes=300000-"]
    commit = hub.repos[REPO].refs["main"]
    assert sha256(snapshot(hf_home, REPO, commit) / "model.safetensors") == sha256(weights_of(fast_model))
    assert partial_size() == 0


def test_a_revision_pins_the_files_of_that_commit(hub, hf_home, fast_model, tmp_path):
    from tests.models import build_model

    newer = build_model(tmp_path / "newer", "fast", seed=1)
    old_commit = hub.add_commit("org/pinned", model_files(fast_model), refs=("v1",))
    new_commit = hub.add_commit("org/pinned", model_files(newer), refs=("main",))
    assert old_commit != new_commit

    tagged = run_cli("models", "pull", "org/pinned@v1", "--json")
    assert tagged.returncode == 0, tagged.stderr
    done = events_of(tagged.stdout)[-1]
    assert (done["model"], done["commit"]) == ("org/pinned@v1", old_commit)
    folder = Path(done["path"])
    assert sha256(folder / "model.safetensors") == sha256(Path(fast_model) / "model.safetensors")
    assert (folder.parent.parent / "refs" / "v1").read_text() == done["commit"]
    assert not (folder.parent.parent / "refs" / "main").exists()

    by_commit = run_cli("models", "pull", f"org/pinned@{new_commit}", "--json")
    assert by_commit.returncode == 0, by_commit.stderr
    done = events_of(by_commit.stdout)[-1]
    assert (done["model"], done["commit"]) == (f"org/pinned@{new_commit}", new_commit)
    assert sha256(Path(done["path"]) / "model.safetensors") == sha256(newer / "model.safetensors")

    # Both stay side by side, each under the id that serves it.
    listed = run_cli("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(m["id"], m["commit"]) for m in json.loads(listed.stdout)] == [
        (f"org/pinned@{new_commit}", new_commit),
        ("org/pinned@v1", old_commit),
    ]
    # The engine finds each pinned revision in the cache under that id.
    resolved = run_cli_python(
        "from mlx_manager.engine.pool import resolve; import sys; "
        "print(resolve(sys.argv[1])); print(resolve(sys.argv[2]))",
        "org/pinned@v1",
        f"org/pinned@{new_commit}",
    )
    assert resolved.splitlines() == [str(folder), done["path"]]


def run_cli_python(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_repo_that_is_not_an_mlx_model_is_refused_with_what_it_holds(hub, hf_home, fast_model):
    torch_files = {n: c for n, c in model_files(fast_model).items() if n != "model.safetensors"}
    hub.add_commit(TORCH_ONLY, {**torch_files, "pytorch_model.bin": b"\0" * 5000})
    done = run_cli("models", "pull", TORCH_ONLY)
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        f"Error: {TORCH_ONLY} is not an MLX model: it has no model*.safetensors weights; it holds PyTorch .bin weights."
        " Look for an MLX conversion of it (e.g. under https://huggingface.co/mlx-community) or make one with"
        " mlx_lm.convert."
    )
    assert not any("/resolve/" in r["path"] for r in hub.requests)  # refused before a byte was fetched


def test_a_model_mlx_lm_cannot_load_is_refused_after_the_check(hub, hf_home, fast_model):
    files = model_files(fast_model)
    config = json.loads(files["config.json"])
    files["config.json"] = json.dumps({**config, "model_type": "no-such-architecture"}).encode()
    hub.add_commit("org/odd", files)
    done = run_cli("models", "pull", "org/odd", "--json")
    assert done.returncode == 1
    assert events_of(done.stdout)[-1]["event"] == "check"
    error = json.loads(one_line(done.stderr))
    commit = hub.repos["org/odd"].refs["main"]
    assert error["error"].startswith("org/odd downloaded, but it cannot be loaded: ValueError: ")
    assert "no-such-architecture" in error["error"]
    assert error["hint"] == (
        f"It stays in the cache ({snapshot(hf_home, 'org/odd', commit)}); `mlx-manager models rm org/odd` removes it."
    )


NOT_FOUND = (
    "org/missing was not found on {url}. Check the id; a private repo also needs HF_TOKEN set to a token "
    "that may read it."
)


@pytest.mark.parametrize(
    ("model", "setup", "message"),
    [
        ("org/missing", {}, NOT_FOUND),
        ("org/missing", {"HF_TOKEN": "hf_good", "token": "hf_good"}, NOT_FOUND),  # with a token: 404, not 401
        (
            "org/gated",
            {},
            "org/gated is gated: its conditions must be accepted before it can be downloaded. "
            "Accept them at {url}/org/gated and set HF_TOKEN to a token of that account.",
        ),
        (
            REPO,
            {"HF_TOKEN": "hf_wrong", "token": "hf_good"},
            "{url} refused the token (HF_TOKEN or the saved login): it is invalid or expired. "
            "Set HF_TOKEN to a valid token, or unset it for public models.",
        ),
        (f"{REPO}@v9", {}, "org/tiny has no revision 'v9'. Give a branch, a tag or a commit hash that exists."),
        (REPO, {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set, so nothing can be downloaded. Unset it to pull."),
        (
            "not-a-repo-id",
            {},
            "'not-a-repo-id' is not a Hugging Face repo id. Give it as ORG/NAME or "
            "ORG/NAME@REVISION, e.g. mlx-community/Qwen3-0.6B-4bit.",
        ),
    ],
)
def test_hub_refusals_are_one_line_each(hub, hf_home, fast_model, model, setup, message):
    if "org/gated" not in hub.repos:
        hub.add_commit("org/gated", model_files(fast_model), gated=True)
    setup = dict(setup)
    hub.token = setup.pop("token", None)
    try:
        done = run_cli("models", "pull", model, env=hub_env(hub, hf_home, **setup))
    finally:
        hub.token = None
    assert done.returncode == (2 if model == "not-a-repo-id" else 1)
    assert done.stdout == ""
    assert one_line(done.stderr) == "Error: " + message.format(url=hub.url)


def test_an_unreachable_hub_is_one_line(hf_home, hub):
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening: refused
        done = run_cli("models", "pull", REPO, "--json", env={**hub_env(hub, hf_home), "HF_ENDPOINT": url})
    assert done.returncode == 1 and done.stdout == ""
    error = json.loads(one_line(done.stderr))
    assert error["error"].startswith(f"cannot reach the Hugging Face hub at {url} (ConnectError: ")
    assert error["hint"].startswith("Check the network (and HF_ENDPOINT, if set)")


def test_a_model_bigger_than_the_free_disk_is_refused_before_downloading(hub, hf_home, fast_model):
    hub.add_commit("org/huge", model_files(fast_model))
    hub.claimed_sizes["model.safetensors"] = 10**18  # one exabyte: no disk here has that free
    try:
        done = run_cli("models", "pull", "org/huge")
    finally:
        hub.claimed_sizes.clear()
    assert done.returncode == 1
    line = one_line(done.stderr)
    assert line.startswith("Error: org/huge needs 1000.0 PB more disk space and ")
    assert line.endswith(" free. Free some space, or point HF_HOME at a disk with more.")
    assert not any("/resolve/" in r["path"] for r in hub.requests)
