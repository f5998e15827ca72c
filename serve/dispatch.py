"""Sending inputs to the modality deployments: one call per modality, retries, deadlines.

Each input goes only to the deployment of its modality (a text request never touches the
image replicas). Encoding is idempotent, so a call caught on a replica that died (killed,
OOM, node lost) is retried on another one instead of failing the client — unless the call
carried a file for a decoder: the file may be what killed the replica (decoders run in a
sacrificial child, but a file must never get the chance to take down a second replica), so
that call is answered 503 without a retry.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from serve.errors import ApiError, raise_if_error
from serve.modalities import RawInput

#: Extra attempts of an encoder call whose replica died mid-request.
REPLICA_RETRIES = 2


async def gather(coros: list[Awaitable[Any]]) -> list[Any]:
    """Runs coroutines concurrently; the first error wins, the rest are cancelled."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


async def deadline(coro: Awaitable[Any], seconds: float) -> Any:
    """``coro`` bounded by ``seconds``.

    Raises:
        ApiError: 503 ``timeout`` when it takes longer.
    """
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError:
        raise ApiError(503, f"request exceeded {seconds} s", "timeout") from None


class Encoders:
    """The modality deployments of the app, called through their handles.

    Args:
        handles: ``{modality: DeploymentHandle}`` of the served modality deployments.
    """

    def __init__(self, handles: dict[str, Any]):
        self.handles = dict(handles)
        self.replica_retries = 0
        self.replica_deaths = 0  # calls that found their replica dead

    def __contains__(self, modality: str) -> bool:
        return modality in self.handles

    def __iter__(self):
        return iter(self.handles)

    async def embed(self, item: RawInput, want_features: bool = False) -> dict[str, Any]:
        """One input -> ``{"embed", "units"[, "features"]}`` (see ``ModalityEncoder.embed``)."""
        return (await self.embed_many([item], want_features))[0]

    async def embed_many(
        self, items: list[RawInput], want_features: bool = False
    ) -> list[dict[str, Any]]:
        """Embeds items of ONE modality with one call to its deployment.

        Raises:
            ApiError: The first item's error (4xx), or 503 when overloaded/unavailable.
        """
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        m = items[0].modality
        for attempt in range(REPLICA_RETRIES + 1):
            try:
                outs = await self.handles[m].embed_many.remote(items, want_features)
                return [raise_if_error(o) for o in outs]
            except BackPressureError:
                raise ApiError(
                    503, f"{m} replicas are overloaded, retry later", "overloaded"
                ) from None
            except DeploymentUnavailableError:
                raise ApiError(503, f"{m} deployment unavailable", "unavailable") from None
            except (RayActorError, ActorUnavailableError) as e:
                self.replica_deaths += 1
                if attempt == REPLICA_RETRIES or any(it.kind == "bytes" for it in items):
                    raise ApiError(
                        503,
                        f"{m} replica lost ({type(e).__name__}); the request is not retried",
                        "replica_unavailable",
                    ) from None
                self.replica_retries += 1
                await asyncio.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    async def embed_all(
        self, items: list[RawInput], want_features: bool = False
    ) -> list[dict[str, Any]]:
        """Embeds items of any modalities: one call per modality, concurrently; results
        in the order of ``items``."""
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.modality, []).append(i)
        outs = await gather(
            [self.embed_many([items[i] for i in idx], want_features) for idx in groups.values()]
        )
        result: list[dict[str, Any]] = [{}] * len(items)
        for idx, out in zip(groups.values(), outs, strict=True):
            for i, o in zip(idx, out, strict=True):
                result[i] = o
        return result

    async def features(self, items: list[RawInput]) -> dict[str, dict[str, Any]]:
        """Token features of one sample's inputs (one per modality), for the fusion head."""
        outs = await self.embed_all(items, want_features=True)
        return {it.modality: o["features"] for it, o in zip(items, outs, strict=True)}
