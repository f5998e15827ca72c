"""Shared pytest fixtures: one isolated local Ray per test session, markers, tiny data.

Tests start Ray **only** through the ``ray_local`` fixture: it launches a private
local instance (own temp dir, 2 CPUs, no dashboard) so that another Ray on the
machine cannot interfere ("Found multiple active Ray instances"), and shuts it
down at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# Keep Ray quiet and light in tests.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is a setup error elsewhere
        has_cuda = False
    if not has_cuda:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """An isolated local Ray instance shared by the whole test session."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # Short path: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray_t_", dir="/tmp")
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1_000_000_000,
        _temp_dir=temp_dir,
        log_to_driver=True,
        configure_logging=False,
    )
    try:
        yield ctx
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small OmniDigits corpus (all six modalities) built once per session."""
    from pipelines.demo_corpus import build_corpus

    out = tmp_path_factory.mktemp("omnidigits_tiny")
    build_corpus(out, n=60, seed=0, workers=2)
    return out
