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
    # Serve's proxy (started by the serve tests) loads the header shield from this variable.
    from serve.proxy_guard import PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH

    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH)
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


def _probe_outputs(run_dir, stage: str, export_dir, shards: str):
    """Loads an export with ``models`` alone and embeds the probe rows that training saved
    (``run_dir/stage/probe_ids.json``); returns ``(output, expected)`` where ``expected``
    holds what the trained engine computed (``probe.safetensors``)."""
    import json
    from pathlib import Path

    import pyarrow.parquet as pq
    import torch
    import yaml
    from safetensors.torch import load_file

    from jobs.training.data import table_to_samples
    from models import OmniModel
    from models.data import collate

    run_dir, export_dir = Path(run_dir), Path(export_dir)
    probe = json.loads((run_dir / stage / "probe_ids.json").read_text())
    expect = load_file(str(run_dir / stage / "probe.safetensors"))
    table = pq.read_table(str(Path(shards) / "train"))
    by_id = {s["id"]: s for s in table_to_samples(table, probe["modalities"])}
    labels = yaml.safe_load((export_dir / "training.yaml").read_text())["label_names"]
    batch = collate([by_id[i] for i in probe["ids"]], probe["modalities"], labels)
    model = OmniModel.from_pretrained(export_dir)
    with torch.no_grad():
        out = model(batch, modalities=probe["modalities"])
    return out, expect


@pytest.fixture(scope="session")
def probe_outputs():
    """:func:`_probe_outputs`: an export's embeddings of the training probe rows, and the
    trained engine's."""
    return _probe_outputs


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A small OmniDigits corpus (all six modalities) built once per session."""
    from jobs.demo.corpus import build_corpus

    out = tmp_path_factory.mktemp("omnidigits_tiny")
    build_corpus(out, n=60, seed=0, workers=2)
    return out
