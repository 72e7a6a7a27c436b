"""The model worker: a process of its own that owns one llama.cpp instance and decodes.

Run as ``python -m tokenrelay.providers.local.worker`` by the gateway's pool (``pool.py``), never
imported by the gateway: native inference code can crash (a faulting AMX kernel, a
``GGML_ASSERT``, the OOM killer) and must take only this process with it. It speaks the line
protocol of ``wire.py`` over an inherited Unix socket and decodes one job at a time; a reader
thread listens for ``cancel`` meanwhile, so a job stops within one token. When the gateway goes
away (the socket closes), the worker stops decoding and exits.
"""

from __future__ import annotations

import argparse
import codecs
import ctypes
import os
import queue
import re
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tokenrelay.providers.local import wire
from tokenrelay.providers.local.wire import Sampling

__all__ = ["FAULT_ENV", "StopScanner", "main"]

FAULT_ENV = "TOKENRELAY_TEST_WORKER_FAULT"
"""Fault injection for the crash tests, read only here: ``abort-at-start`` aborts every start;
``segv-with-extra-buffers`` segfaults in the first decode while extra buffer types are on, the
way llama.cpp's AMX kernels do on some virtual machines."""


class JobError(Exception):
    """A job the model refuses; ``kind`` says how the gateway should report it."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class StopScanner:
    """Finds stop sequences in streamed text, holding back only what could begin one."""

    __slots__ = ("_held", "_longest", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = stops
        self._longest = max(len(s) for s in stops)
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return the text safe to send now, and whether a stop sequence was reached."""
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return held[:cut], True
        # Keep the longest tail that is the start of some stop sequence.
        keep = 0
        for k in range(min(len(held), self._longest - 1), 0, -1):
            tail = held[-k:]
            if any(s.startswith(tail) for s in self._stops):
                keep = k
                break
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep], False

    def flush(self, text: str) -> str:
        """At the end: whatever was held back (plus ``text``), minus any stop inside it."""
        out, _ = self.feed(text)
        out += self._held
        self._held = ""
        return out


def _die_by_signal(signum: int) -> None:
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _open_model(path: Path, *, threads: int, context_size: int, extra_buffers: bool) -> Any:
    """Load the GGUF; ``extra_buffers=False`` turns off llama.cpp's extra buffer types.

    Those (weight repacking, AMX tiles) are where llama.cpp picks CPU-specific kernels; on some
    virtual machines the AMX ones fault although the kernel grants AMX. llama-cpp-python has no
    argument for ``use_extra_bufts``, so the default model parameters it starts from are wrapped.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not extra_buffers:
        defaults = low.llama_model_default_params

        def without_extra_buffers() -> Any:
            params = defaults()
            if hasattr(params, "use_extra_bufts"):
                params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_buffers
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context_size,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


class _Worker:
    """One loaded model and the decode loop."""

    def __init__(self, llama: Any, send: Any) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self._llama_cpp = llama_cpp
        self._llama = llama
        self._send = send
        self._n_ctx: int = llama.n_ctx()
        self._n_vocab: int = llama.n_vocab()
        self._vocab = llama_cpp.llama_model_get_vocab(llama.model)
        self._piece_buf = ctypes.create_string_buffer(64)
        self._pieces: dict[int, bytes] = {}
        self.chat_template: str | None = llama.metadata.get("tokenizer.chat_template") or None
        self._formatter: Any = None
        if self.chat_template:
            self._formatter = Jinja2ChatFormatter(
                template=self.chat_template,
                eos_token=self._special_text(llama.token_eos()),
                bos_token=self._special_text(llama.token_bos()),
            )

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        return bytes(self._llama.detokenize([token], special=True)).decode("utf-8", "replace")

    def probe(self) -> None:
        """A short decode: the first use of the matrix kernels, where a bad CPU path faults."""
        prompt = self._llama.tokenize(b"Hello", True, False)
        for n, _ in enumerate(self._llama.generate(prompt, temp=0.0)):
            if n >= 1:
                break
        self._llama.reset()

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        if not text:
            return []
        tokens: list[int] = self._llama.tokenize(text.encode("utf-8"), False, special)
        return tokens

    def _chat_tokens(self, messages: list[dict[str, Any]]) -> list[int]:
        """The chat template's markers as special tokens, the messages' text never.

        Each message's content is replaced by a random marker before rendering; the rendered
        prompt is then tokenized piece by piece: the template's own text with special tokens
        parsed, each content as plain text. So a message containing ``<|im_start|>system``
        stays text and cannot forge a turn.
        """
        nonce = secrets.token_hex(8)
        contents: dict[str, str] = {}
        marked = []
        for i, message in enumerate(messages):
            marker = f"\ue000{nonce}{i}\ue001"
            contents[marker] = str(message.get("content") or "")
            marked.append({**message, "content": marker})
        try:
            rendered: str = self._formatter(messages=marked).prompt
        except Exception as exc:
            # Templates reject bad conversations with `raise_exception("...")`, whose
            # text is written for the caller (e.g. "roles must alternate").
            raise JobError(
                f"The model's chat template rejected these messages: {exc}", param="messages"
            ) from None
        tokens: list[int] = []
        pos = 0
        for match in re.finditer(f"\ue000{nonce}\\d+\ue001", rendered):
            tokens += self._tokenize(rendered[pos : match.start()], special=True)
            tokens += self._tokenize(contents[match.group()], special=False)
            pos = match.end()
        tokens += self._tokenize(rendered[pos:], special=True)
        return tokens

    def _prompt_tokens(self, job: dict[str, Any]) -> list[int]:
        llama = self._llama
        messages = job.get("messages")
        prompt = job.get("prompt")
        if messages is not None:
            if self._formatter is None:  # the gateway checks first; kept as a guard
                raise JobError("The model has no chat template.", param="messages")
            tokens = self._chat_tokens(messages)
        elif isinstance(prompt, str):
            # A raw prompt is the whole of what the model reads, written by one caller, who may
            # write a template's markers on purpose (as llama.cpp's server reads them too).
            tokens = llama.tokenize(prompt.encode("utf-8"), True, True)
            if not tokens and llama.token_bos() >= 0:
                tokens = [llama.token_bos()]
        else:
            tokens = list(prompt or ())
            if any(not 0 <= t < self._n_vocab for t in tokens):
                raise JobError(
                    f"Token ids in `prompt` must lie in [0, {self._n_vocab}).", param="prompt"
                )
        if not tokens:
            raise JobError("The prompt is empty.", param="prompt")
        if len(tokens) >= self._n_ctx:
            raise JobError(
                f"This model's maximum context length is {self._n_ctx} tokens, "
                f"but the prompt has {len(tokens)} tokens.",
                param="messages" if messages is not None else "prompt",
                code="context_length_exceeded",
            )
        return tokens

    def _piece(self, token: int) -> bytes:
        buf = self._piece_buf
        to_piece = self._llama_cpp.llama_token_to_piece
        n = to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:  # the piece is longer than the buffer: -n is the size needed
            buf = ctypes.create_string_buffer(-n)
            n = to_piece(self._vocab, token, buf, len(buf), 0, False)
        piece = buf.raw[:n]
        self._pieces[token] = piece
        return piece

    def run(self, job: dict[str, Any], cancelled: threading.Event) -> dict[str, Any]:
        """Decode one job, sending its text; return its terminal message."""
        job_id = job["id"]
        try:
            prompt = self._prompt_tokens(job)
        except JobError as exc:
            return {
                "id": job_id,
                "error": {"message": exc.message, "param": exc.param, "code": exc.code},
            }
        send = self._send
        n_prompt = len(prompt)
        send({"id": job_id, "started": n_prompt})
        s = wire.sampling_from(job["sampling"])
        room = self._n_ctx - n_prompt
        limit = room if s.max_tokens is None else min(s.max_tokens, room)
        finish_reason, produced = self._decode(job_id, prompt, s, limit, cancelled)
        if finish_reason is None:
            return {"id": job_id, "cancelled": True}
        return {"id": job_id, "done": [finish_reason, n_prompt, produced]}

    def _decode(
        self,
        job_id: int,
        prompt: list[int],
        s: Sampling,
        limit: int,
        cancelled: threading.Event,
    ) -> tuple[str | None, int]:
        llama, llama_cpp = self._llama, self._llama_cpp
        llama.set_seed(llama_cpp.LLAMA_DEFAULT_SEED if s.seed is None else s.seed)
        tokens: Iterator[int] = llama.generate(
            prompt,
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        # The hot loop: one forward pass per iteration, inside `next(tokens)`; the rest is
        # kept to a dict lookup, an incremental UTF-8 decode and one socket write per token.
        decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        stops = StopScanner(s.stop) if s.stop else None
        pieces, vocab, is_eog = self._pieces, self._vocab, llama_cpp.llama_vocab_is_eog
        send = self._send
        finish_reason = "length"
        stop_sequence_found = False
        produced = 0
        try:
            for token in tokens:
                if is_eog(vocab, token):
                    finish_reason = "stop"
                    break
                produced += 1
                piece = pieces.get(token)
                text = decode(self._piece(token) if piece is None else piece)
                if stops is not None:
                    text, hit = stops.feed(text)
                    if hit:
                        if text:
                            send({"id": job_id, "text": text})
                        finish_reason, stop_sequence_found = "stop", True
                        break
                if text:
                    send({"id": job_id, "text": text})
                if produced >= limit or cancelled.is_set():
                    break
        finally:
            tokens.close()  # type: ignore[attr-defined]  # a generator
        if cancelled.is_set():
            return None, produced
        if not stop_sequence_found:  # send what was held back: a partial character or stop
            tail = decode(b"", True)
            if stops is not None:
                tail = stops.flush(tail)
            if tail:
                send({"id": job_id, "text": tail})
        return finish_reason, produced


class _Inbox(threading.Thread):
    """Reads the gateway's messages: jobs go to the decode loop, cancels take effect at once."""

    def __init__(self, reader: Any) -> None:
        super().__init__(name="tokenrelay-worker-inbox", daemon=True)
        self._reader = reader
        self.jobs: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._current: tuple[int, threading.Event] | None = None
        self._cancelled: set[int] = set()

    def take(self, job: dict[str, Any]) -> threading.Event:
        """Mark ``job`` as the one decoding; its event is set by a ``cancel`` for it."""
        event = threading.Event()
        with self._lock:
            if job["id"] in self._cancelled:  # cancelled before it started
                self._cancelled.discard(job["id"])
                event.set()
            self._current = (job["id"], event)
        return event

    def run(self) -> None:
        try:
            for line in self._reader:
                message = wire.decode(line)
                if message.get("op") == "run":
                    self.jobs.put(message)
                elif message.get("op") == "cancel":
                    with self._lock:
                        if self._current is not None and self._current[0] == message["id"]:
                            self._current[1].set()
                        else:
                            self._cancelled.add(message["id"])
        finally:
            # The gateway is gone: stop what is decoding and let the main loop end.
            with self._lock:
                if self._current is not None:
                    self._current[1].set()
            self.jobs.put(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="tokenrelay's model worker (started by it)")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--context-size", type=int, required=True)
    parser.add_argument("--extra-buffers", choices=("on", "off"), required=True)
    parser.add_argument("--probe", action="store_true")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    writer = sock.makefile("wb", buffering=0)

    def send(message: dict[str, Any]) -> None:
        writer.write(wire.encode(message))

    fault = os.environ.get(FAULT_ENV, "")
    if fault == "abort-at-start":
        _die_by_signal(signal.SIGABRT)
    extra_buffers = args.extra_buffers == "on"
    try:
        llama = _open_model(
            args.model,
            threads=args.threads,
            context_size=args.context_size,
            extra_buffers=extra_buffers,
        )
    except (ValueError, RuntimeError, OSError):
        send(
            {
                "fatal": f"The local model file {args.model} could not be loaded by llama.cpp "
                "(corrupt, truncated, or an unsupported architecture)."
            }
        )
        return 1
    worker = _Worker(llama, send)
    if fault == "segv-with-extra-buffers" and extra_buffers:
        _die_by_signal(signal.SIGSEGV)
    if args.probe:
        worker.probe()
    send({"ready": {"chat_template": worker.chat_template is not None}})
    inbox = _Inbox(sock.makefile("rb"))
    inbox.start()
    while (job := inbox.jobs.get()) is not None:
        cancelled = inbox.take(job)
        try:
            last = worker.run(job, cancelled)
        except Exception as exc:  # a bug, not the model's refusal: report it, keep serving
            print(f"tokenrelay worker: job failed: {exc!r}", file=sys.stderr)
            last = {
                "id": job["id"],
                "error": {
                    "message": "The local model failed while generating; see the server log.",
                    "internal": True,
                },
            }
        try:
            send(last)
        except OSError:
            break
    llama.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
