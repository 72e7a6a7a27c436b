"""The Codex CLI (npm ``@openai/codex``) against tokenrelay: ``codex exec`` with a custom model
provider whose ``wire_api`` is ``responses``, nothing else changed.

The test installs the CLI from the npm registry on first use, into ``.cache/codex`` in the
repository (ignored by git), with a bounded time. Without node and npm, or when the install
fails, the tests are skipped saying why; under CI=true they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest

from conftest import Relay
from fake_upstream import FakeUpstream

CODEX_VERSION = os.environ.get("TOKENRELAY_TEST_CODEX_VERSION", "0.171.0")
"""The Codex CLI version the tests run; pinned so that a new release cannot change them
unnoticed (set the variable to ``latest`` to try the newest)."""

_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "codex"
_INSTALL_TIMEOUT = 240.0
_RUN_TIMEOUT = 120.0
_IN_CI = os.environ.get("CI", "").lower() == "true"

MODEL = "fake-model"

# One test may pay for the install (a ~100 MB download the first time), then one or two runs.
pytestmark = pytest.mark.timeout(_INSTALL_TIMEOUT + 2 * _RUN_TIMEOUT + 60)


def _unavailable(reason: str) -> NoReturn:
    if _IN_CI:
        pytest.fail(f"{reason}; CI must run the Codex CLI tests", pytrace=False)
    pytest.skip(reason)


def _installed_version(binary: Path) -> str | None:
    if not binary.exists():
        return None
    try:
        done = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().rpartition(" ")[2] or None


@pytest.fixture(scope="session")
def codex() -> Path:
    """The ``codex`` command, installed from the npm registry unless already there."""
    binary = _CACHE / "node_modules" / ".bin" / "codex"
    installed = _installed_version(binary)
    if installed is not None and CODEX_VERSION in (installed, "latest"):
        return binary
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        _unavailable("node and npm are needed to install the Codex CLI")
    _CACHE.mkdir(parents=True, exist_ok=True)
    command = [npm, "install", "--no-audit", "--no-fund", "--no-save", "--prefix", str(_CACHE)]
    try:
        done = subprocess.run(
            [*command, f"@openai/codex@{CODEX_VERSION}"],
            capture_output=True,
            text=True,
            timeout=_INSTALL_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _unavailable(f"installing @openai/codex took over {_INSTALL_TIMEOUT:.0f} s")
    if done.returncode != 0 or _installed_version(binary) is None:
        _unavailable(f"npm could not install @openai/codex@{CODEX_VERSION}:\n{done.stderr[-2000:]}")
    return binary


def _config(relay: Relay) -> str:
    """What a user writes into ``$CODEX_HOME/config.toml`` to use tokenrelay (see README)."""
    return f"""\
model = "{MODEL}"
model_provider = "tokenrelay"
web_search = "disabled"
approval_policy = "never"
sandbox_mode = "read-only"
check_for_update_on_startup = false

[model_providers.tokenrelay]
name = "tokenrelay"
base_url = "{relay.v1}"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0

# Nothing leaves the machine but the requests to tokenrelay.
[analytics]
enabled = false

[feedback]
enabled = false
"""


def _codex_exec(codex: Path, relay: Relay, tmp_path: Path, prompt: str) -> list[dict[str, Any]]:
    """Run ``codex exec --json`` in an empty directory; its JSON lines, once it succeeded."""
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(_config(relay))
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("OPENAI_", "CODEX_", "TOKENRELAY_"))
    }
    env.update(CODEX_HOME=str(home), HOME=str(tmp_path))
    done = subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "--json", prompt],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def _completed(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [
        event["item"]
        for event in events
        if event["type"] == "item.completed" and event["item"]["type"] == kind
    ]


def test_codex_exec_answers_through_tokenrelay(
    codex: Path, relay: Relay, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = {"text": "Hello from the other side of tokenrelay."}

    events = _codex_exec(codex, relay, tmp_path, "Say hello.")

    messages = _completed(events, "agent_message")
    assert [m["text"] for m in messages] == ["Hello from the other side of tokenrelay."], events
    assert events[-1]["type"] == "turn.completed"
    assert events[-1]["usage"]["output_tokens"] == 7
    [upstream] = fake_upstream.chat_requests()
    assert upstream.stream
    assert "Say hello." in json.dumps(upstream.json["messages"][-1])
    assert '"POST /v1/responses HTTP/1.1" 200' in relay.log_text()


def test_codex_exec_runs_the_command_the_model_asked_for(
    codex: Path, relay: Relay, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = {
        "tool_call_then_text": True,
        "tool_arguments": json.dumps({"cmd": "echo tokenrelay-was-here"}),
        "text": "The command printed its line.",
    }

    events = _codex_exec(codex, relay, tmp_path, "Run echo.")

    first, second = fake_upstream.chat_requests()
    assert first.json["tools"][0]["function"]["name"] == "exec_command", (
        "the fake calls the first tool; Codex no longer lists its shell tool first"
    )
    [command] = _completed(events, "command_execution")
    assert command["exit_code"] == 0, command
    assert "tokenrelay-was-here" in command["aggregated_output"]
    assert [m["text"] for m in _completed(events, "agent_message")] == [
        "The command printed its line."
    ]
    # The command's output went back to the model as the tool's result.
    results = [m for m in second.json["messages"] if m["role"] == "tool"]
    assert len(results) == 1
    assert "tokenrelay-was-here" in json.dumps(results[0]["content"])
