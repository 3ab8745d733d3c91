"""audit.durability = "acknowledged": a crash (kill -9) loses no audit row of an answered request."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.test_daemon_serve import Daemon


def rows(path: Path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {request_id for (request_id,) in db.execute("SELECT request_id FROM audit_logs")}


@pytest.mark.slow
def test_kill_9_after_answers_loses_no_row(isolated_home, fast_model, children):
    daemon = Daemon("--model", fast_model)
    children.started.append(daemon.process)
    daemon.wait_ready(fast_model)

    def ask(n: int) -> str:
        """One answered request of a mix (plain, streamed, refused); its request id."""
        headers = {"x-request-id": f"answered-{n}"}
        with httpx.Client(base_url=daemon.url, timeout=120, headers=headers) as http:
            if n % 3 == 2:
                answer = http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
                assert answer.status_code == 404
            elif n % 3 == 1:
                body = {"model": fast_model, "prompt": f"hello {n}", "max_tokens": 4, "stream": True}
                with http.stream("POST", "/v1/completions", json=body) as stream:
                    text = "".join(stream.iter_text())
                assert stream.status_code == 200 and text.rstrip().endswith("data: [DONE]")
            else:
                body = {"model": fast_model, "messages": [{"role": "user", "content": f"hi {n}"}], "max_tokens": 4}
                answer = http.post("/v1/chat/completions", json=body)
                assert answer.status_code == 200, answer.text
        return headers["x-request-id"]

    with ThreadPoolExecutor(8) as pool:
        answered = set(pool.map(ask, range(30)))
    daemon.process.kill()  # at once, with no shutdown: the rows of every answer must already be on disk
    daemon.process.wait(30)
    assert answered <= rows(isolated_home / "audit.db")
