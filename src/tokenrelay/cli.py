"""``tokenrelay``: serve the gateway, or ask it something from the terminal."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import click
import orjson

from tokenrelay import __version__
from tokenrelay.chunks import ChunkSummary, StreamError
from tokenrelay.config import CONFIG_ENV

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokenrelay")
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"A TOML settings file (same as ${CONFIG_ENV}).",
)
def main(config: Path | None) -> None:
    """An OpenAI-compatible streaming gateway with an embedded local model."""
    if config is not None:
        # Through the environment, so uvicorn's worker processes read the same file.
        os.environ[CONFIG_ENV] = str(config.resolve())


@main.command()
@click.option("--host", default=None, help="Address to listen on [default: 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port to listen on [default: 8000].")
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes.")
@click.option("--reload", is_flag=True, help="Restart when the code changes (development).")
def serve(host: str | None, port: int | None, workers: int, reload: bool) -> None:
    """Start the HTTP server: the OpenAI API under /v1, the tutorial's /api/ask, docs at /docs."""
    import uvicorn

    from tokenrelay.config import Settings

    settings = Settings()
    uvicorn.run(
        "tokenrelay.app:create_app",
        factory=True,
        host=host or settings.host,
        port=settings.port if port is None else port,
        workers=None if reload else workers,
        reload=reload,
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


@main.command()
@click.argument("prompt")
@click.option("-m", "--model", default=None, help="Model name [default: the first listed].")
@click.option(
    "--url",
    default=None,
    envvar="TOKENRELAY_URL",
    help="A running tokenrelay (e.g. http://127.0.0.1:8000); without it, answer in-process.",
)
def ask(prompt: str, model: str | None, url: str | None) -> None:
    """Ask once and print the answer as it streams, e.g. tokenrelay ask "Hyperf 是什么?"."""
    events = _ask_server(url, prompt, model) if url else _ask_in_process(prompt, model)
    try:
        asyncio.run(_print_stream(events))
    except StreamError as exc:
        raise click.ClickException(str(exc)) from None


async def _print_stream(events: AsyncIterator[bytes]) -> None:
    summary = ChunkSummary()
    async for chunk in events:
        sys.stdout.write(summary.feed(chunk))
        sys.stdout.flush()
    sys.stdout.write("\n")


def _chat_body(prompt: str, model: str) -> bytes:
    return orjson.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}
    )


async def _ask_server(url: str, prompt: str, model: str | None) -> AsyncIterator[bytes]:
    import aiohttp

    async with aiohttp.ClientSession(base_url=url.rstrip("/") + "/") as session:
        if model is None:
            async with session.get("v1/models") as resp:
                model = (await resp.json())["data"][0]["id"]
        async with session.post(
            "v1/chat/completions",
            data=_chat_body(prompt, str(model)),
            headers={"Content-Type": "application/json"},
        ) as resp:
            if resp.status != 200:
                raise StreamError((await resp.json()).get("error", {}))
            async for line in resp.content:
                yield line


async def _ask_in_process(prompt: str, model: str | None) -> AsyncIterator[bytes]:
    from tokenrelay.config import Settings
    from tokenrelay.errors import TokenrelayError
    from tokenrelay.providers.base import ProviderRequest
    from tokenrelay.providers.registry import ProviderRegistry

    registry = ProviderRegistry.from_settings(Settings())
    try:
        model = model or await registry.default_model()
        raw = _chat_body(prompt, model)
        request = ProviderRequest("chat/completions", model, orjson.loads(raw), raw)
        stream = await registry.resolve(model).open_stream(request)
        async for chunk in stream:
            yield chunk
    except TokenrelayError as exc:
        raise StreamError({"message": exc.message}) from None
    finally:
        await registry.aclose()
