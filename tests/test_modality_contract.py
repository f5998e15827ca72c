"""The modality contract, parametrized over the modality table (timm's ``test_models`` style).

Every declared modality is checked with the example input its own featurizer ships: no
per-modality table lives in the tests. A throwaway modality defined in a test-only module
(``tests/depth_plugin.py``) goes through the same checks and a training step, which proves
that a new modality needs no edit of a shared file.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import depth_plugin
import numpy as np
import pytest
import torch

from common.modalities import MODALITIES, get_modality
from jobs.exports import model_sizes
from models import OmniConfig
from models.data import collate
from models.encoders import ENCODERS, build_encoder
from pipelines.config import FeatureConfig
from pipelines.featurize import FEATURIZERS, get_featurizer
from pipelines.schema import pack_tensors, read_shard, unpack_column, write_shard
from pipelines.tokenizer import train_tokenizer
from serve.config import Limits
from serve.modalities import SPECS, get_spec

ROOT = Path(__file__).resolve().parents[1]
DECLARED = list(MODALITIES)  # collected before any test adds a throwaway record
LABELS = range(4)


def _featurizer(m: str, assets: Path):
    """``m``'s featurizer as a prepared corpus would have it: its tokenizer trained and its
    statistics fitted on the featurizer's own examples."""
    cls = FEATURIZERS[m]
    fc = FeatureConfig()
    rng = np.random.default_rng(0)
    plain = get_featurizer(m, fc)
    decoded = [plain.decode(*plain.example(rng, label=y)) for y in range(10)]
    if cls.tokenized and not (assets / "tokenizer").exists():
        train_tokenizer([str(x) for x in decoded], assets / "tokenizer", vocab_size=300)
    fitted = plain.fit(decoded)
    if fitted:
        fc = fc.with_overrides({m: fitted})
    return get_featurizer(m, fc, assets_dir=assets)


def _items(f, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f.featurize(*f.example(rng, label=y % 10)) for y in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("assets")


# -- the checks (shared by the declared modalities and the throwaway one) ---------------------
def check_featurizer(m: str, f) -> None:
    rec = get_modality(m)
    rng = np.random.default_rng(1)
    raw, suffix = f.example(rng, label=3)
    x = f.featurize(raw, suffix)
    assert x.dtype == rec.np_dtype, (m, x.dtype)
    assert x.ndim == rec.rank, (m, x.shape)
    assert np.isfinite(x.astype(np.float64)).all(), m
    declared, bound = f.output_shape(), f.max_output_shape()
    assert len(declared) == len(bound) == rec.rank
    for j, (got, want, top) in enumerate(zip(x.shape, declared, bound, strict=True)):
        assert got <= top, (m, j, x.shape, bound)
        if want is not None:
            assert got == want, (m, j, x.shape, declared)
        else:
            assert j == rec.var_axis or not rec.masked, (m, j)
    if isinstance(raw, bytes):  # the featurizer recognizes its own files by their bytes
        assert type(f).sniff(raw) in (*type(f).suffixes, None), m
        assert np.array_equal(f.featurize(raw, None), x), m
    # Examples of different concepts differ (a model can learn from them).
    assert not np.array_equal(f.featurize(*f.example(rng, label=4)), x), m


def check_shards(m: str, f, tmp_path: Path) -> None:
    items = [*_items(f, 3), None]
    data, shape = pack_tensors(m, items)
    back = unpack_column(m, data, shape)
    assert back[-1] is None
    for a, b in zip(items[:-1], back[:-1], strict=True):
        assert b.dtype == get_modality(m).np_dtype and np.array_equal(a, b), m
    rows = [{"id": f"r{i}", "label": str(i), m: x} for i, x in enumerate(items)]
    write_shard(tmp_path / m / "part-0.parquet", rows, [m])
    cols = read_shard(tmp_path / m / "part-0.parquet", [m])
    assert cols["id"] == [r["id"] for r in rows]
    assert cols[m][-1] is None
    assert all(np.array_equal(a, b) for a, b in zip(items[:-1], cols[m][:-1], strict=True))


def check_encoder(m: str, f) -> None:
    rec = get_modality(m)
    cfg = OmniConfig.from_name("tiny", modalities=[m], **model_sizes({m: f}))
    torch.manual_seed(0)
    enc = build_encoder(m, cfg)
    batch = collate([{m: x} for x in _items(f, 4)], [m])
    if rec.masked:
        assert f"{m}_mask" in batch
    tokens, mask = enc(batch)
    assert tokens.shape[0] == 4 and tokens.shape[2] == cfg.d_model, (m, tokens.shape)
    assert mask.shape == tokens.shape[:2] and mask.dtype == torch.bool and mask.any(1).all()
    assert torch.isfinite(tokens).all(), m
    out = enc.encode(batch, mask_ratio=0.5)  # masked modelling reaches the [MASK] token too
    (out.tokens[out.mask].pow(2).mean() + tokens[mask].pow(2).mean()).backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None]
    assert not missing, (m, missing)


def check_spec(m: str, f) -> None:
    spec = get_spec(m)
    raw, suffix = f.example(np.random.default_rng(2), label=5)
    value = base64.b64encode(raw).decode() if isinstance(raw, bytes) else raw
    item = spec.parse(value, Limits(), f"input.{m}")
    assert np.array_equal(spec.featurize(f, item), f.featurize(raw, suffix)), m
    assert spec.cost(f.featurize(raw, suffix)) >= 1


# -- the declared modalities ----------------------------------------------------------------
def test_every_registry_equals_the_table():
    assert list(FEATURIZERS) and set(FEATURIZERS) == set(DECLARED)
    assert set(ENCODERS) == set(DECLARED)
    assert set(SPECS) == set(DECLARED)


@pytest.mark.parametrize("m", DECLARED)
def test_featurizer_example_has_the_declared_dtype_rank_and_shape(m, assets):
    check_featurizer(m, _featurizer(m, assets))


@pytest.mark.parametrize("m", DECLARED)
def test_shards_round_trip(m, assets, tmp_path):
    check_shards(m, _featurizer(m, assets), tmp_path)


@pytest.mark.parametrize("m", DECLARED)
def test_collate_and_encoder_give_tokens_mask_and_every_gradient(m, assets):
    check_encoder(m, _featurizer(m, assets))


@pytest.mark.parametrize("m", DECLARED)
def test_serve_spec_parses_to_what_the_pipeline_featurizes(m, assets):
    check_spec(m, _featurizer(m, assets))


def test_registries_refuse_an_undeclared_name():
    from models.encoders import register_encoder
    from pipelines.featurize import register
    from serve.modalities import register_spec

    for deco in (register, register_encoder, register_spec):
        with pytest.raises(ValueError, match="not a declared modality"):
            deco("no_such_modality")(type("X", (), {}))


def test_importing_models_loads_neither_ray_nor_pipelines():
    code = (
        "import sys, models, models.encoders, models.model, models.objectives, models.zeroshot\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'pipelines', 'serve', 'jobs'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_pipelines_do_not_import_models():
    code = (
        "import sys, pipelines, pipelines.featurize, pipelines.prepare, pipelines.schema\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('models', 'serve', 'jobs'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# -- a modality that exists only in a test module ---------------------------------------------
@pytest.fixture
def depth():
    depth_plugin.register()
    try:
        yield depth_plugin.NAME
    finally:
        depth_plugin.unregister()


def test_a_throwaway_modality_passes_the_contract_without_shared_edits(depth, assets, tmp_path):
    assert set(FEATURIZERS) == set(ENCODERS) == set(SPECS) == set(MODALITIES) >= {depth}
    f = _featurizer(depth, assets)
    check_featurizer(depth, f)
    check_shards(depth, f, tmp_path)
    check_encoder(depth, f)
    check_spec(depth, f)


def test_a_throwaway_modality_trains_with_another_one(depth, tmp_path):
    """Synthetic shards from the featurizers' examples -> the training driver's model config
    -> the align stage's objective: loss finite, every branch's input layer updated."""
    import pyarrow.parquet as pq

    from jobs.training.config import load_train_config
    from jobs.training.data import inspect_shards, table_to_samples
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import model_config_from_data
    from jobs.training.stage import StageObjective
    from jobs.training.synthetic import write_synthetic_shards

    other = next(m for m in DECLARED if not get_modality(m).inline)
    shards = write_synthetic_shards(str(tmp_path / "shards"), n=40, modalities=[other, depth])
    info = inspect_shards(shards)
    assert set(info.modalities) == {other, depth}
    tc = load_train_config(str(ROOT / "configs/train/tiny.yaml"), [f"data.shards_dir={shards}"])
    cfg = model_config_from_data(tc, shards, info, info.modalities)
    assert cfg.encoder_section(depth).size == depth_plugin.DepthFeaturizer.Config().size
    torch.manual_seed(0)
    model = build_stage_model(cfg.to_dict())
    obj = StageObjective(
        "align",
        tc.stage("align"),
        modalities=info.modalities,
        label_names=info.label_names,
        pairs=[[other, depth]],
    )
    obj.freeze_unused(model)
    train = pq.read_table(str(Path(shards) / "train"))
    samples = table_to_samples(train, info.modalities)[:16]
    before = {
        m: [p.detach().clone() for p in model.encoders[m].stem_parameters()]
        for m in info.modalities
    }
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step in range(2):  # the masked modality rotates: each of the two is masked once
        opt.zero_grad()
        terms, _ = obj(model, obj.collate(samples, info.label_names), step=step)
        assert torch.isfinite(terms["loss"])
        assert f"nce_{other}_{depth}" in terms, (step, sorted(terms))  # InfoNCE every step
        terms["loss"].backward()
        opt.step()
    for m, old in before.items():
        new = model.encoders[m].stem_parameters()
        assert any(not torch.equal(a, b) for a, b in zip(old, new, strict=True)), m
