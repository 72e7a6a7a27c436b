"""The ``tokenrelay`` command: ``ask``, ``chat`` and ``history``, run as a user runs them.

Each command is a ``python -m tokenrelay ...`` subprocess with the same clean environment the
servers in ``conftest`` get: no local model, a SQLite file of the test's own, and only the
configuration the test gives. The fake upstream answers ``"word0 word1 ..."``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
import pytest

from conftest import (
    NO_LOCAL_MODEL,
    Relay,
    _clean_env,
    _free_port,
    fake_provider_toml,
    relay_to,
)
from fake_upstream import FakeUpstream, expected_text

_COMMAND_DEADLINE = 60.0
"""Seconds any one command may take; they take about one."""

_CONVERSATION_ID = re.compile(r"\bconv_[A-Za-z0-9]+\b")


def _env(tmp_path: Path, fake: FakeUpstream | None = None) -> dict[str, str]:
    """A clean environment with a database in ``tmp_path`` and, given ``fake``, a config for it."""
    settings = {**NO_LOCAL_MODEL, "TOKENRELAY_DATABASE_URL": _database_url(tmp_path)}
    if fake is not None:
        settings["TOKENRELAY_CONFIG"] = str(_config_file(tmp_path, fake))
    return _clean_env(settings)


def _database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenrelay.db'}"


def _config_file(tmp_path: Path, fake: FakeUpstream) -> Path:
    path = tmp_path / "tokenrelay.toml"
    path.write_text(fake_provider_toml(fake.base_url))
    return path


def _tokenrelay(
    *args: str, env: dict[str, str], cwd: Path, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokenrelay", *args],
        env=env,
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=_COMMAND_DEADLINE,
        check=False,
    )


def _succeeded(result: subprocess.CompletedProcess[str]) -> str:
    """The command's output, once it has exited 0 without a traceback."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def _failed_cleanly(result: subprocess.CompletedProcess[str]) -> str:
    """What a failed command told the user: a one-line reason, never a traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip(), "failed without saying why"
    return result.stderr


# -- --help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "teaches"),
    [
        ((), ("ask", "chat", "history", "serve", "--config")),
        (("serve",), ("--host", "--port", "--workers")),
        (("ask",), ("PROMPT", "--model", "--url")),
        (("chat",), ("--model", "--conversation", "--system", "Ctrl-C", "Ctrl-D")),
        (("history",), ("CONVERSATION_ID", "--limit")),
    ],
)
def test_help_teaches_each_command(
    tmp_path: Path, command: tuple[str, ...], teaches: tuple[str, ...]
) -> None:
    for flag in ("--help", "-h"):
        output = _succeeded(_tokenrelay(*command, flag, env=_env(tmp_path), cwd=tmp_path))

        assert "Usage:" in output
        for word in teaches:
            assert word in output, f"`{' '.join(command)} {flag}` does not mention {word}"


# -- serve ---------------------------------------------------------------------------------------


def test_serve_with_workers_and_no_redis_refuses_to_start(tmp_path: Path) -> None:
    port = str(_free_port())

    result = _tokenrelay(
        "serve", "--workers", "2", "--port", port, env=_env(tmp_path), cwd=tmp_path
    )

    error = _failed_cleanly(result)
    assert len(error.strip().splitlines()) == 1, error
    assert "--workers 2 needs TOKENRELAY_REDIS_URL" in error


# -- ask -----------------------------------------------------------------------------------------


def test_ask_url_prints_the_streamed_answer(
    relay: Relay, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = _tokenrelay(
        "ask", "--url", relay.url, "What is Hyperf?", env=_env(tmp_path), cwd=tmp_path
    )

    assert _succeeded(result) == expected_text(5) + "\n"
    [request] = fake_upstream.chat_requests()
    assert request.json["messages"] == [{"role": "user", "content": "What is Hyperf?"}]
    assert request.json["model"] == "fake-model"  # the first one /v1/models lists
    assert request.json["stream"] is True


def test_ask_url_from_the_environment_with_a_model(
    relay: Relay, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = {**_env(tmp_path), "TOKENRELAY_URL": relay.url}

    result = _tokenrelay("ask", "-m", "fake-other", "Hyperf 是什么?", env=env, cwd=tmp_path)

    assert _succeeded(result) == expected_text(5) + "\n"
    [request] = fake_upstream.chat_requests()
    assert request.json["model"] == "fake-other"
    assert request.json["messages"][0]["content"] == "Hyperf 是什么?"


def test_ask_url_with_an_unknown_model_fails_cleanly(relay: Relay, tmp_path: Path) -> None:
    result = _tokenrelay(
        "ask", "--url", relay.url, "-m", "no-such-model", "hi", env=_env(tmp_path), cwd=tmp_path
    )

    assert "no-such-model" in _failed_cleanly(result)


def test_ask_url_with_nothing_listening_fails_cleanly(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_free_port()}"

    result = _tokenrelay("ask", "--url", url, "hi", env=_env(tmp_path), cwd=tmp_path)

    assert url.removeprefix("http://") in _failed_cleanly(result)


def test_ask_in_process_uses_the_toml_config(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    config = _config_file(tmp_path, fake_upstream)

    result = _tokenrelay(
        "--config", str(config), "ask", "Where is Paris?", env=_env(tmp_path), cwd=tmp_path
    )

    assert _succeeded(result) == expected_text(5) + "\n"
    [request] = fake_upstream.chat_requests()
    assert request.json["messages"] == [{"role": "user", "content": "Where is Paris?"}]
    assert request.json["model"] == "fake-model"


def test_ask_in_process_with_an_unknown_model_fails_cleanly(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = _tokenrelay(
        "ask", "-m", "no-such-model", "hi", env=_env(tmp_path, fake_upstream), cwd=tmp_path
    )

    assert "no-such-model" in _failed_cleanly(result)
    assert fake_upstream.chat_requests() == []


def test_ask_in_process_reports_an_upstream_error(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = {"status": 503}

    result = _tokenrelay("ask", "hi", env=_env(tmp_path, fake_upstream), cwd=tmp_path)

    assert "overloaded" in _failed_cleanly(result)


# -- chat and history ----------------------------------------------------------------------------


def test_chat_saves_the_conversation_and_history_shows_it(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(tmp_path, fake_upstream)

    chatted = _tokenrelay(
        "chat",
        "-s",
        "Be brief.",
        input="first question\nsecond question\n",
        env=env,
        cwd=tmp_path,
    )

    output = _succeeded(chatted)
    assert output.count(expected_text(5)) == 2, output
    [conversation_id] = set(_CONVERSATION_ID.findall(output))
    first, second = fake_upstream.chat_requests()
    assert first.json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
    ]
    assert second.json["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": expected_text(5)},
        {"role": "user", "content": "second question"},
    ]

    listed = _succeeded(_tokenrelay("history", env=env, cwd=tmp_path))
    [line] = listed.splitlines()
    assert line.startswith(conversation_id)
    assert line.endswith("first question")  # named after the first question

    shown = _succeeded(_tokenrelay("history", conversation_id, env=env, cwd=tmp_path))
    turns = [
        ("user", "first question"),
        ("assistant", expected_text(5).strip()),
        ("user", "second question"),
        ("assistant", expected_text(5).strip()),
    ]
    position = 0
    for role, text in turns:
        position = shown.index(f"{role}:\n{text}", position) + 1
    assert "[" not in shown, "a turn is marked as not complete"


def test_chat_continues_a_saved_conversation(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    env = _env(tmp_path, fake_upstream)
    first = _succeeded(_tokenrelay("chat", input="remember 42\n", env=env, cwd=tmp_path))
    [conversation_id] = set(_CONVERSATION_ID.findall(first))
    fake_upstream.defaults = {"tokens": 2}

    again = _tokenrelay(
        "chat", "-c", conversation_id, input="what was it?\n", env=env, cwd=tmp_path
    )

    output = _succeeded(again)
    assert "remember 42" in output  # the earlier turns are shown first
    assert expected_text(2) in output
    assert fake_upstream.chat_requests()[-1].json["messages"] == [
        {"role": "user", "content": "remember 42"},
        {"role": "assistant", "content": expected_text(5)},
        {"role": "user", "content": "what was it?"},
    ]
    listed = _succeeded(_tokenrelay("history", env=env, cwd=tmp_path))
    assert len(listed.splitlines()) == 1


def test_chat_reports_an_upstream_error_and_goes_on(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    fake_upstream.defaults = {"status": 503}
    env = _env(tmp_path, fake_upstream)

    result = _tokenrelay("chat", "-m", "fake-model", input="hello?\n/exit\n", env=env, cwd=tmp_path)

    _succeeded(result)
    assert "overloaded" in result.stderr
    [conversation_id] = set(_CONVERSATION_ID.findall(result.stdout))
    shown = _succeeded(_tokenrelay("history", conversation_id, env=env, cwd=tmp_path))
    assert "user:\nhello?" in shown  # the question is kept even though it was not answered
    assert "assistant [error]" in shown


class _Reader:
    """Collects a process's output in a thread, so a test can wait for text with a deadline."""

    def __init__(self, stream: IO[bytes] | None) -> None:
        assert stream is not None
        self.text = ""
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream.fileno(),), daemon=True)
        self._thread.start()

    def _read(self, fd: int) -> None:
        while data := os.read(fd, 4096):
            with self._changed:
                self.text += data.decode(errors="replace")
                self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: re.search(pattern, self.text), timeout):
                raise TimeoutError(f"{pattern!r} not printed within {timeout} s:\n{self.text}")


@pytest.fixture
def chat_process(fake_upstream: FakeUpstream, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "chat", "-m", "fake-model"],
        env=_env(tmp_path, fake_upstream),
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_ctrl_c_stops_the_reply_and_keeps_the_chat_going(
    chat_process: subprocess.Popen[bytes], fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    assert chat_process.stdin is not None
    fake_upstream.defaults = {"tokens": 400, "delay": 0.05}
    output = _Reader(chat_process.stdout)
    output.wait_for(r"conv_\w+")

    chat_process.stdin.write(b"tell me a long story\n")
    chat_process.stdin.flush()
    output.wait_for(r"word1 ")
    chat_process.send_signal(signal.SIGINT)
    output.wait_for(r"\[stopped\]")
    chat_process.stdin.close()  # Ctrl-D
    assert chat_process.wait(_COMMAND_DEADLINE) == 0, output.text

    [record] = fake_upstream.chat_requests()
    assert record.wait_for_outcome(5) == "abandoned"
    [conversation_id] = set(_CONVERSATION_ID.findall(output.text))
    shown = _succeeded(_tokenrelay("history", conversation_id, env=_env(tmp_path), cwd=tmp_path))
    assert "assistant [stopped]:\nword0 word1 " in shown


def test_history_of_an_empty_database_says_how_to_start(tmp_path: Path) -> None:
    output = _succeeded(_tokenrelay("history", env=_env(tmp_path), cwd=tmp_path))

    assert "tokenrelay chat" in output


def test_history_lists_newest_first_and_obeys_limit(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    env = _env(tmp_path, fake_upstream)
    for question in ("oldest", "middle", "newest"):
        _succeeded(_tokenrelay("chat", input=f"{question}\n", env=env, cwd=tmp_path))

    listed = _succeeded(_tokenrelay("history", env=env, cwd=tmp_path)).splitlines()
    limited = _succeeded(_tokenrelay("history", "-n", "2", env=env, cwd=tmp_path)).splitlines()

    assert [line.rsplit("  ", 1)[-1] for line in listed] == ["newest", "middle", "oldest"]
    assert limited == listed[:2]


def test_history_of_an_unknown_conversation_fails_cleanly(tmp_path: Path) -> None:
    result = _tokenrelay("history", "conv_doesNotExist0000", env=_env(tmp_path), cwd=tmp_path)

    assert "conv_doesNotExist0000" in _failed_cleanly(result)


def test_chat_continuing_an_unknown_conversation_fails_cleanly(
    fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    result = _tokenrelay(
        "chat",
        "-c",
        "conv_doesNotExist0000",
        input="",
        env=_env(tmp_path, fake_upstream),
        cwd=tmp_path,
    )

    assert "conv_doesNotExist0000" in _failed_cleanly(result)


def test_history_reads_what_the_server_saved(fake_upstream: FakeUpstream, tmp_path: Path) -> None:
    with relay_to(fake_upstream, tmp_path) as relay:
        created = httpx.post(f"{relay.url}/api/conversations", json={"title": "From the web"})
        conversation_id = created.json()["id"]
        with httpx.stream(
            "POST",
            f"{relay.url}/api/conversations/{conversation_id}/messages",
            json={"content": "saved by the server"},
        ) as response:
            response.read()

        # The server keeps its database at tmp_path / "tokenrelay.db", as _env does.
        listed = _succeeded(_tokenrelay("history", env=_env(tmp_path), cwd=tmp_path))
        shown = _succeeded(
            _tokenrelay("history", conversation_id, env=_env(tmp_path), cwd=tmp_path)
        )

    assert conversation_id in listed
    assert "From the web" in listed
    assert "user:\nsaved by the server" in shown
    assert f"assistant:\n{expected_text(5).strip()}" in shown
