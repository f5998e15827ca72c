"""Connecting a data job (``jobs.prepare``, ``jobs.embed``) to Ray, the same way each time."""

from __future__ import annotations

import os


def connect_ray(address: str | None, num_cpus: int | None) -> bool:
    """Joins ``address`` (or ``$RAY_ADDRESS``: a cluster, under ``ray job submit``), else
    starts a local Ray with ``num_cpus``; nothing when Ray is already up in this process.

    Returns:
        Whether this call started or joined Ray (the caller then shuts it down).
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    return True
