"""``tokenrelay``: serve the gateway, ask it something, chat in the terminal, read history."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import orjson

from tokenrelay import __version__
from tokenrelay.chunks import ChunkSummary, StreamError
from tokenrelay.config import CONFIG_ENV

if TYPE_CHECKING:
    from tokenrelay.config import Settings
    from tokenrelay.relay.chat import ChatService
    from tokenrelay.relay.gateway import Gateway

__all__ = ["main"]

_MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess mode: see ``tokenrelay.metrics``."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokenrelay")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"A TOML settings file (same as ${CONFIG_ENV}).",
)
def main(config: Path | None) -> None:
    """An OpenAI-compatible streaming gateway with an embedded local model."""
    # prometheus-client decides once, when imported, from the environment, whether to keep its
    # metrics in files: only `serve --workers N` asks it to, in a directory of its own.
    for name in (_MULTIPROCESS_ENV, _MULTIPROCESS_ENV.lower()):
        os.environ.pop(name, None)
    if config is not None:
        # Through the environment, so uvicorn's worker processes read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes; more than one needs Redis (TOKENRELAY_REDIS_URL).",
)
@click.option("--reload", is_flag=True, help="Restart when the code changes (development).")
@click.option(
    "--insecure-no-auth",
    is_flag=True,
    help="Listen on a non-loopback address with no keys defined (anyone may spend your tokens).",
)
def serve(
    host: str | None, port: int | None, workers: int, reload: bool, insecure_no_auth: bool
) -> None:
    """Start the HTTP server: the OpenAI API under /v1, the tutorial's /api/ask, docs at /docs."""
    import uvicorn

    from tokenrelay.config import Settings
    from tokenrelay.logs import log_config
    from tokenrelay.server import uvicorn_options

    if host is not None:
        # Through the environment, so each worker's app knows the name it is bound to (the
        # request guards answer to it).
        os.environ["TOKENRELAY_HOST"] = host
    if insecure_no_auth:
        os.environ["TOKENRELAY_INSECURE_NO_AUTH"] = "true"
    settings = Settings()
    _refuse_open_to_all(settings)
    if workers > 1 and not reload and settings.redis_url is None:
        # Each worker would keep its own streams, leases and cancels: a resume, a Stop or a
        # second question landing on another worker would not find the answer.
        raise click.ClickException(
            f"--workers {workers} needs TOKENRELAY_REDIS_URL: without Redis each worker keeps "
            "its own streams and shared state, so streams could not be resumed or stopped "
            "across workers."
        )
    if settings.local.enabled and settings.local.load == "eager":
        from tokenrelay.errors import TokenrelayError
        from tokenrelay.providers.local import check_model

        try:
            check_model(settings.local)
        except TokenrelayError as exc:
            raise click.ClickException(exc.message) from None
    with _metrics_dir(workers if not reload else 1):
        uvicorn.run(
            "tokenrelay.app:create_app",
            factory=True,
            host=settings.host,
            port=settings.port if port is None else port,
            workers=None if reload else workers,
            reload=reload,
            log_level=settings.log_level,
            log_config=log_config(settings),
            timeout_graceful_shutdown=5,
            # Measured in bench/: per-response headers nobody needs cost CPU on every request.
            server_header=False,
            date_header=False,
            **uvicorn_options(settings),
        )


def _refuse_open_to_all(settings: Settings) -> None:
    """Off loopback, a server with no keys would let anyone who reaches it spend tokens."""
    from tokenrelay.access.keys import is_loopback

    if is_loopback(settings.host) or settings.insecure_no_auth or settings.admin_key is not None:
        return
    from tokenrelay.cli_admin import usable_keys

    if asyncio.run(usable_keys(settings)) == 0:
        raise click.ClickException(
            f"refusing to listen on {settings.host} with no keys: anyone who reaches it could "
            "use your models; create one (`tokenrelay keys create --name NAME`), set "
            "TOKENRELAY_ADMIN_KEY, or pass --insecure-no-auth."
        )


@contextlib.contextmanager
def _metrics_dir(workers: int) -> Iterator[None]:
    """With several workers, a directory of our own where prometheus-client keeps each worker's
    metrics for any of them to add up (``tokenrelay.metrics``), removed at the end. One process
    keeps its metrics in memory."""
    if workers <= 1:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="tokenrelay-metrics-") as directory:
        os.environ[_MULTIPROCESS_ENV] = directory  # read by the workers uvicorn starts
        try:
            yield
        finally:
            os.environ.pop(_MULTIPROCESS_ENV, None)


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", default=None, help="Model name [default: the first listed].")
@click.option(
    "--url",
    default=None,
    envvar="TOKENRELAY_URL",
    help="A running tokenrelay (e.g. http://127.0.0.1:8000); without it, answer in-process.",
)
@click.option(
    "--api-key",
    default=None,
    envvar="TOKENRELAY_API_KEY",
    help="A gateway key for --url, when the server requires one (best from the environment).",
)
@click.option("--max-tokens", type=click.IntRange(min=1), help="Stop the answer after N tokens.")
def ask(
    prompt: str, model: str | None, url: str | None, api_key: str | None, max_tokens: int | None
) -> None:
    """Ask once and print the answer as it streams, e.g. tokenrelay ask "Hyperf 是什么?"."""
    import aiohttp

    body = {"messages": [{"role": "user", "content": prompt}], "stream": True}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    events = _ask_server(url, body, model, api_key) if url else _ask_in_process(body, model)
    try:
        _run(_print_stream(events))
    except (aiohttp.ClientError, TimeoutError):
        raise click.ClickException(f"Could not reach tokenrelay at {url}.") from None


def _run(work: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine; errors meant for users are printed, not traced back."""
    from tokenrelay.errors import TokenrelayError

    try:
        asyncio.run(work)
    except StreamError as exc:
        raise click.ClickException(str(exc)) from None
    except TokenrelayError as exc:
        raise click.ClickException(exc.message) from None


async def _print_stream(events: AsyncIterator[bytes]) -> None:
    summary = ChunkSummary()
    async for chunk in events:
        sys.stdout.write(summary.feed(chunk))
        sys.stdout.flush()
    sys.stdout.write("\n")


async def _ask_server(
    url: str, body: dict[str, Any], model: str | None, api_key: str | None
) -> AsyncIterator[bytes]:
    import aiohttp

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/", headers=headers) as session:
        if model is None:
            async with session.get("v1/models") as resp:
                if resp.status != 200:
                    raise StreamError(await _error_of(resp, url))
                model = (await resp.json())["data"][0]["id"]
        async with session.post(
            "v1/chat/completions",
            data=orjson.dumps({**body, "model": model}),
            headers={"Content-Type": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise StreamError(await _error_of(resp, url))
            async for line in resp.content:
                yield line


async def _error_of(resp: Any, url: str) -> dict[str, Any]:
    """The OpenAI-shaped error a server answered (or what to say when it was not one)."""
    try:
        error: dict[str, Any] = (await resp.json(content_type=None))["error"]
        return error
    except (ValueError, KeyError, TypeError):  # not tokenrelay's JSON (a proxy's page?)
        return {"message": f"{url} answered HTTP {resp.status}."}


async def _ask_in_process(body: dict[str, Any], model: str | None) -> AsyncIterator[bytes]:
    """The answer the way the server makes it: a generation writing a log, read back here."""
    from tokenrelay.access.keys import OPERATOR
    from tokenrelay.config import Settings
    from tokenrelay.errors import TokenrelayError
    from tokenrelay.providers.base import ProviderRequest

    try:
        async with _gateway(Settings()) as gateway:
            model = model or await gateway.registry.default_model()
            body = {**body, "model": model}
            request = ProviderRequest("chat/completions", model, body, orjson.dumps(body))
            admitted = await gateway.admit(OPERATOR, "cli", request)
            generation = await gateway.stream(admitted, grace=0.0)
            try:
                await generation.opened()
                async for _, chunk in await gateway.generations.log.read(generation.stream_id, 0):
                    yield chunk
            finally:
                generation.cancel()
    except TokenrelayError as exc:
        raise StreamError({"message": exc.message}) from None


@contextlib.asynccontextmanager
async def _gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """Calls to models from this process, through the same seam as the server's, with the
    server's event log and shared state (memory, or Redis when configured: a server then sees
    this process's answers too). The terminal's user needs no key and is not accounted."""
    from tokenrelay.providers.registry import ProviderRegistry
    from tokenrelay.relay.gateway import Gateway
    from tokenrelay.relay.generations import Generations
    from tokenrelay.state import create_shared_state
    from tokenrelay.streams import create_event_log

    registry = ProviderRegistry.from_settings(settings)
    log, state = create_event_log(settings), create_shared_state(settings)
    await log.start()
    await state.start()
    generations = Generations(log, state, lease_seconds=settings.lease_seconds)
    await generations.start()
    try:
        yield Gateway(registry, generations)
    finally:
        await generations.aclose()
        await state.aclose()
        await log.aclose()
        await registry.aclose()


@main.command()
@click.option("-m", "--model", default=None, help="Model name [default: the first listed].")
@click.option("-c", "--conversation", "conversation_id", help="Continue this conversation.")
@click.option("-s", "--system", default=None, help="System prompt for a new conversation.")
def chat(model: str | None, conversation_id: str | None, system: str | None) -> None:
    """Talk with a model in the terminal; the conversation is saved (see `tokenrelay history`).

    Replies stream as they are written; Ctrl-C stops a reply, Ctrl-D or /exit leaves.
    """
    _run(_chat(model, conversation_id, system))


async def _chat(model: str | None, conversation_id: str | None, system: str | None) -> None:
    from tokenrelay.errors import TokenrelayError

    async with _chat_service() as service:
        if conversation_id is None:
            conversation_id = (
                await service.store.create_conversation(model=model, system=system)
            ).id
        else:
            detail = await service.store.get_conversation(conversation_id)
            for message in detail.messages:
                click.echo(f"{click.style(str(message.role), bold=True)}: {message.content}")
        click.echo(click.style(f"conversation {conversation_id} · Ctrl-D to leave", dim=True))
        while True:
            try:
                prompt = await _read_line("> ")
            except (EOFError, asyncio.CancelledError):
                click.echo()
                return
            if prompt.strip() in ("/exit", "/quit"):
                return
            if not prompt.strip():
                continue
            try:
                turn = await service.send(conversation_id, prompt, model)
                log = service.generations.log
                entries = await log.read(turn.generation.stream_id, 0)
                await _print_stream(chunk async for _, chunk in entries)
            except (StreamError, TokenrelayError) as exc:
                click.echo(click.style(f"error: {exc}", fg="red"), err=True)
            except asyncio.CancelledError:  # Ctrl-C: asyncio.run cancels us; stop the reply only
                task = asyncio.current_task()
                assert task is not None
                task.uncancel()
                await service.stop(conversation_id)
                click.echo(click.style(" [stopped]", dim=True))


async def _read_line(prompt: str) -> str:
    """``input()`` in a daemon thread, so Ctrl-C or exit never waits for a line to be typed."""
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def settle(value: str | None, error: BaseException | None) -> None:
        if not line.done():
            line.set_exception(error) if error else line.set_result(value or "")

    def read() -> None:
        try:
            loop.call_soon_threadsafe(settle, input(prompt), None)
        except BaseException as exc:  # EOFError on Ctrl-D reaches the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)

    threading.Thread(target=read, daemon=True).start()
    return await line


@main.command()
@click.argument("conversation_id", required=False)
@click.option("-n", "--limit", default=20, show_default=True, help="How many conversations.")
def history(conversation_id: str | None, limit: int) -> None:
    """List saved conversations, newest first, or show one of them whole."""
    _run(_history(conversation_id, limit))


async def _history(conversation_id: str | None, limit: int) -> None:
    async with _chat_service() as service:
        if conversation_id is not None:
            detail = await service.store.get_conversation(conversation_id)
            click.echo(click.style(detail.title or "(untitled)", bold=True))
            for message in detail.messages:
                status = "" if message.status == "complete" else f" [{message.status}]"
                click.echo(
                    f"\n{click.style(str(message.role), bold=True)}{status}:\n{message.content}"
                )
            return
        page = await service.store.list_conversations(limit=limit)
        if not page.conversations:
            click.echo("No conversations yet: start one with `tokenrelay chat`.")
        for conversation in page.conversations:
            when = conversation.updated_at.astimezone().strftime("%Y-%m-%d %H:%M")
            click.echo(f"{conversation.id}  {when}  {conversation.title or '(untitled)'}")


@contextlib.asynccontextmanager
async def _chat_service() -> AsyncIterator[ChatService]:
    """The same store and providers the server uses, in this process."""
    from tokenrelay.config import Settings
    from tokenrelay.relay.chat import ChatService
    from tokenrelay.storage.conversations import ConversationStore
    from tokenrelay.storage.database import Database

    settings = Settings()
    database = Database(settings.database_url)
    # Only migrate: a server may be answering in the same database right now.
    await database.migrate()
    try:
        async with _gateway(settings) as gateway:
            yield ChatService(ConversationStore(database), gateway, grace=settings.stream_grace)
    finally:
        await database.close()


def _register_admin_commands() -> None:
    from tokenrelay.cli_admin import keys, usage

    main.add_command(keys)
    main.add_command(usage)


_register_admin_commands()
