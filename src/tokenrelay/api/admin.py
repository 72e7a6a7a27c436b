"""``/api/keys`` and ``/api/usage``: key management and usage over HTTP, for the admin.

The identity guard (``api/auth.py``) lets only the admin key through here (or the local user of
a server that needs no key). What these answer is what ``tokenrelay keys`` and ``tokenrelay
usage`` print: the same functions, the same query.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse, Response

from tokenrelay.access.keys import Authenticator, create_key
from tokenrelay.access.usage import UsageLedger, usage_summary
from tokenrelay.api.relay import body_doc, read_body
from tokenrelay.storage.keys import KeyStore

__all__ = ["BODY_MODELS", "router"]

router = APIRouter(prefix="/api", tags=["Admin"])


class NewKey(BaseModel):
    """A key to create; the response holds its secret, shown this once."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    rpm: int | None = Field(default=None, ge=1, le=10**9, description="Requests per minute.")
    tpm: int | None = Field(default=None, ge=1, le=10**12, description="Tokens per minute.")
    tokens_per_day: int | None = Field(default=None, ge=1, le=10**13)
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=1000, description="Model names this key may use; all if none."
    )
    expires_at: AwareDatetime | None = None


def _keys(request: Request) -> KeyStore:
    store: KeyStore = request.app.state.keys
    return store


def _authenticator(request: Request) -> Authenticator:
    authenticator: Authenticator = request.app.state.authenticator
    return authenticator


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    """Every key, revoked ones included; never a secret."""
    return {"object": "list", "data": [k.public() for k in await _keys(request).list()]}


@router.post("/keys", status_code=201, response_class=Response, openapi_extra=body_doc(NewKey))
async def create(request: Request) -> Response:
    """Create a key; `key` in the answer is its secret, which is never shown again."""
    new, _, _ = await read_body(request, NewKey)
    record, secret = await create_key(_keys(request), **new.model_dump())
    _authenticator(request).forget()
    return JSONResponse({**record.public(), "key": secret}, status_code=201)


@router.delete("/keys/{name}")
async def revoke(request: Request, name: str) -> dict[str, Any]:
    """Revoke a key: it is refused at once by this process, within seconds by the others."""
    record = await _keys(request).revoke(name)
    _authenticator(request).forget()
    return record.public()


@router.get("/usage")
async def usage(
    request: Request,
    since: Annotated[
        str | None, Query(max_length=40, description="ISO time, or 24h, 7d...")
    ] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    key: Annotated[str | None, Query(max_length=100, description="One key's name.")] = None,
    bucket: Annotated[str, Query(max_length=10)] = "hour",
) -> dict[str, Any]:
    """Requests, tokens, errors and time to first token: totals, by key, by model, over time."""
    ledger: UsageLedger | None = request.app.state.ledger
    if ledger is not None:
        await ledger.flush()  # this process's latest rows too
    return await usage_summary(
        request.app.state.usage, _keys(request), since=since, until=until, key=key, bucket=bucket
    )


BODY_MODELS: list[type[BaseModel]] = [NewKey]
