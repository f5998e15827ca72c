"""Generation heads (models/generation.py) and the featurizers' writers.

* every head's flow-matching loss falls on the tiny corpus (heads trained on cached
  conditions of an untrained export: the test is about the heads, not the encoders);
* seeded sampling is reproducible and independent of what a sample is batched with;
* writers round-trip: PNG/WAV/PLY/NPY/CSV written, featurized again, close to the item;
* bad configs and bad items are refused with clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ConfigError
from models import OmniConfig, build_model
from models.generation import SPACES, GenerationConfig

TARGETS = ("image", "audio", "signal", "pointcloud")


@pytest.fixture(scope="module")
def corpus_rows(tiny_corpus, tmp_path_factory):
    """Featurized rows of the tiny corpus and the export whose featurizers made them."""
    from serve.devtools import featurize_manifest_rows, make_untrained_export

    manifest = Path(tiny_corpus) / "manifest.jsonl"
    texts = [json.loads(x).get("text") or "" for x in manifest.read_text().splitlines()]
    export = make_untrained_export(
        tmp_path_factory.mktemp("gen") / "export",
        texts=[t for t in texts if t] + ["zero", "one"],
        generation={"targets": list(TARGETS), "hidden": 96, "blocks": 2, "point_hidden": 48},
    )
    return featurize_manifest_rows(manifest, export), export


def _model(export: Path):
    from jobs.exports import load_export

    return load_export(export)


def test_each_head_loss_falls_on_tiny_corpus(corpus_rows):
    from models.data import collate
    from models.generation import flow_terms
    from models.objectives import flow_matching_loss

    rows, export = corpus_rows
    ex = _model(export)
    model = ex.model
    torch.manual_seed(0)
    batch = collate(rows[:24], modalities=model.modalities)
    with torch.no_grad():
        feats = model.encode_many(batch, model._active(batch, None))
    conds = {m: (f.embed, f.present) for m, f in feats.items()}
    model.generators.train()
    opt = torch.optim.Adam(model.generators.parameters(), lr=3e-3)
    hist: dict[str, list[float]] = {t: [] for t in TARGETS}
    for _ in range(30):
        outs = flow_terms(dict(model.generators.items()), batch, conds, detach=True, repeats=1)
        losses = {t: flow_matching_loss(fo) for t, fo in outs.items()}
        assert set(losses) == set(TARGETS)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        for t, v in losses.items():
            hist[t].append(float(v.detach()))
    for t, h in hist.items():
        first, last = np.mean(h[:5]), np.mean(h[-5:])
        assert np.isfinite(h).all(), t
        assert last < 0.9 * first, (t, first, last)


def test_stage_parts_and_model_forward_give_generation_terms():
    from models.data import collate, synthetic_samples

    cfg = OmniConfig.from_name(
        "tiny",
        modalities=["text", "image", "pointcloud"],
        generation={"targets": ["image", "pointcloud"], "hidden": 32, "blocks": 1},
    )
    model = build_model(cfg)
    batch = collate(synthetic_samples(cfg, 4, seed=1), modalities=cfg.modalities)
    out = model(batch, parts=("generate",))
    assert set(out.flow) == {"image", "pointcloud"}
    # Image: conditions from text and pointcloud, repeats 2 -> 4 rows * 2 sources * 2.
    assert out.flow["image"].pred.shape == (16, 32, 32, 3)
    assert model(batch, parts=("recon",)).flow == {}

    from jobs.training.config import StageSection
    from jobs.training.stage import StageObjective

    pre = StageObjective("pretrain", StageSection(), modalities=cfg.modalities, label_names=[])
    assert "generators" in pre.unused_modules()
    align = StageObjective("align", StageSection(), modalities=cfg.modalities, label_names=[])
    assert "generate" in align.forward_parts() and "generators" not in align.unused_modules()
    off = StageObjective(
        "align",
        StageSection(loss_weights={"generate": 0.0}),
        modalities=cfg.modalities,
        label_names=[],
    )
    assert "generators" in off.unused_modules()


def test_seeded_sampling_is_reproducible(corpus_rows):
    _, export = corpus_rows
    model = _model(export).model
    g = torch.Generator().manual_seed(3)
    cond = torch.nn.functional.normalize(
        torch.randn(3, model.config.embed_dim, generator=g), dim=-1
    )
    for t in TARGETS:
        a = model.generate(t, cond, [5, 6, 7], steps=4)
        b = model.generate(t, cond, [5, 6, 7], steps=4)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
        assert not np.array_equal(a[0].astype(np.float32), a[1].astype(np.float32)), t
        # A sample does not depend on what it was batched with.
        alone = model.generate(t, cond[1:2], [6], steps=4)[0]
        np.testing.assert_allclose(
            alone.astype(np.float32), a[1].astype(np.float32), atol=2e-2 if t != "image" else 1
        )
        from common.modalities import get_modality

        assert a[0].dtype == get_modality(t).np_dtype, (t, a[0].dtype)


def _chamfer(a: np.ndarray, b: np.ndarray) -> float:
    d = np.sqrt(((a[:, None, :3] - b[None, :, :3]) ** 2).sum(-1))
    return float(d.min(1).mean() + d.min(0).mean()) / 2


@pytest.mark.parametrize("target", TARGETS)
def test_writers_round_trip_through_featurizers(corpus_rows, target):
    """Generated items and real corpus items, written to files and featurized again."""
    rows, export = corpus_rows
    ex = _model(export)
    f = ex.featurizers[target]
    real = next(r[target] for r in rows if target in r)
    cond = torch.nn.functional.normalize(torch.ones(1, ex.model.config.embed_dim), dim=-1)
    generated = ex.model.generate(target, cond, [0], steps=2)[0]
    for item in (real, generated):
        for fmt in f.write_formats:
            w = f.write(item, fmt)
            assert w.data and w.mime and w.suffix.lstrip(".") == fmt
            back = f.featurize(w.data, suffix=f.sniff(w.data) or w.suffix).astype(np.float32)
            x = item.astype(np.float32)
            if target == "image":
                np.testing.assert_array_equal(back, x)
            elif target == "signal":
                # The featurizer z-normalizes each recording: compare normalized forms.
                z = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)
                zb = (back - back.mean(1, keepdims=True)) / (back.std(1, keepdims=True) + 1e-8)
                assert np.abs(z - zb).max() < 0.02
            elif target == "pointcloud":
                c = x[:, :3] - x[:, :3].mean(0)
                c = c / np.linalg.norm(c, axis=1).max()
                assert _chamfer(c, back) < 0.05
            else:  # audio: Griffin-Lim phase, same frames, close log-mels
                assert back.shape == x.shape
                corr = np.corrcoef(back.ravel(), x.ravel())[0, 1]
                assert corr > 0.7, corr


def test_writers_refuse_bad_items():
    from pipelines.config import FeatureConfig
    from pipelines.featurize import SampleError, get_featurizer
    from pipelines.featurize.base import has_writer, write_item

    fc = FeatureConfig()
    with pytest.raises(SampleError, match="bad_shape"):
        get_featurizer("image", fc).write(np.zeros((4, 4), np.uint8))
    with pytest.raises(SampleError, match="unsupported_format"):
        get_featurizer("image", fc).write(np.zeros((4, 4, 3), np.uint8), "jpeg")
    with pytest.raises(SampleError, match="non_finite"):
        get_featurizer("signal", fc).write(np.full((2, 8), np.nan, np.float32))
    with pytest.raises(SampleError, match="bad_shape"):
        get_featurizer("audio", fc).write(np.zeros((10, 3), np.float32))
    with pytest.raises(SampleError, match="bad_shape"):
        get_featurizer("pointcloud", fc).write(np.zeros((10, 2), np.float32))
    assert not has_writer(type("NoWriter", (), {})())
    with pytest.raises(SampleError, match="unsupported_format"):
        write_item(type("NoWriter", (), {"modality": "x"})(), np.zeros(3))


def test_generation_config_is_validated():
    with pytest.raises(ConfigError, match="no generation space"):
        OmniConfig.from_name("tiny", generation={"targets": ["text"]})
    with pytest.raises(ConfigError, match="not in modalities"):
        OmniConfig.from_name("tiny", modalities=["text"], generation={"targets": ["image"]})
    with pytest.raises(ConfigError):
        OmniConfig.from_name("tiny", generation={"targets": ["image"], "bogus": 1})
    with pytest.raises(ConfigError, match="solver"):
        OmniConfig.from_name("tiny", generation={"targets": ["image"], "solver": "rk9"})
    cfg = OmniConfig.from_name("tiny", generation={"targets": ["image"]})
    assert GenerationConfig.from_model(cfg).targets == ["image"]
    assert set(TARGETS) <= set(SPACES)
    # An export without the section (older exports) builds no heads.
    assert len(build_model(OmniConfig.from_name("tiny", modalities=["text"])).generators) == 0


def test_fit_generation_adds_heads_to_an_export_and_evaluation_runs(
    corpus_rows, tiny_corpus, tmp_path
):
    """``jobs.fit_generation`` on an export without heads: cached embeddings, falling loss,
    a new export that loads with its heads; then the generation evaluation runs on it."""
    from jobs.evaluation.data import load_split
    from jobs.evaluation.generation import GenerationEvalConfig, evaluate_generation
    from jobs.exports import load_export
    from jobs.fit_generation import main as fit_main
    from serve.devtools import make_untrained_export, write_gallery_split

    rows, export = corpus_rows
    manifest = Path(tiny_corpus) / "manifest.jsonl"
    texts = [json.loads(x).get("text") or "" for x in manifest.read_text().splitlines()]
    # The same tokenizer as the rows' export (same texts), without generation heads.
    bare = make_untrained_export(
        tmp_path / "bare", texts=[t for t in texts if t] + ["zero", "one"], generation={}
    )
    assert len(load_export(bare).model.generators) == 0
    shards = tmp_path / "shards"
    write_gallery_split(rows, shards / "train")
    write_gallery_split(rows, shards / "test")
    out = tmp_path / "with_heads"
    args = ["--export", str(bare), "--shards", str(shards), "--out", str(out)]
    assert fit_main([*args, "--steps", "20", "--batch", "32", "--hidden", "48"]) == 0
    ex = load_export(out)
    assert set(ex.model.generators) == set(TARGETS)
    assert ex.config.generation["hidden"] == 48
    res = evaluate_generation(
        ex.model,
        load_split(str(shards), "test"),
        load_split(str(shards), "train"),
        GenerationEvalConfig(max_prompts=6, seeds=2, steps=2),
        tmp_path / "reports",
    )
    for key in ("text->image", "audio->image", "image->audio", "text->signal", "text->pointcloud"):
        d = res["directions"][key]
        assert 0.0 <= d["recognized"] <= 1.0 and d["prompts"] > 0, (key, d)
        assert d["diversity"] is not None and d["diversity"] > 0, (key, d)
        assert "classifier_accuracy" in d and isinstance(d["meaningful"], bool)
    assert len(res["grids"]) == len(res["directions"])
    assert all(Path(p).is_file() for p in res["grids"])
    # Untrained encoders and 20 steps: recognition means nothing here; the figures'
    # plumbing is what this test checks (the demo's numbers are in benchmarks/results).


def test_generation_code_names_no_modality():
    """Each modality's generation facts live with its encoder (``register_space`` there);
    the shared generation code is modality-agnostic."""
    import importlib

    from common.modalities import modality_names
    from models.encoders import ENCODERS

    for name in (
        "models.generation",
        "models.objectives.generation",
        "serve.generation",
        "jobs.evaluation.generation",
        "jobs.training.generation",
        "jobs.fit_generation",
    ):
        src = Path(importlib.import_module(name).__file__).read_text()
        named = [m for m in modality_names() if f'"{m}"' in src or f"'{m}'" in src]
        assert not named, (name, named)
    for m, space in SPACES.items():
        assert space.modality == m
        assert space.__module__ == ENCODERS[m].__module__, (m, space.__module__)


def test_probe_features_shapes_and_hog_properties():
    """Each target's classifier features: HOG of an image (invariant to contrast, not to
    the digit), audio frames as a (bins, frames) sequence for the CNN; bad shapes refused."""
    from models.encoders.image import hog_features

    cfg = OmniConfig.from_name("tiny", generation={"targets": list(TARGETS)})
    gen = GenerationConfig.from_model(cfg)
    rng = np.random.default_rng(0)
    img = (rng.random((2, 32, 32, 3)) * 255).astype(np.uint8)
    f = SPACES["image"].for_model(cfg, gen, "image").probe_features(list(img))
    assert f.shape == (2, 7 * 7 * 4 * 9) and f.dtype == np.float32
    grey = img.astype(np.float32).mean(-1)
    np.testing.assert_allclose(hog_features(grey * 0.5), hog_features(grey), atol=1e-3)
    assert np.abs(hog_features(grey[:1]) - hog_features(grey[1:])).max() > 0.1
    with pytest.raises(ValueError, match="grey"):
        hog_features(img)
    with pytest.raises(ValueError, match="too small"):
        hog_features(grey[:, :6, :6])
    space = SPACES["audio"].for_model(cfg, gen, "audio")
    clips = [rng.normal(size=(n, space.shape[1])).astype(np.float16) for n in (5, space.shape[0])]
    a = space.probe_features(clips)
    assert a.shape == (2, space.shape[1], space.shape[0])
    # Padded with each bin's quietest value, as the head pads.
    np.testing.assert_allclose(a[0][:, -1], clips[0].astype(np.float32).min(0), atol=1e-6)


def test_sequence_classifier_reads_a_shifted_pattern_and_bad_features_are_refused(
    monkeypatch,
):
    """The sequence probe finds a class pattern wherever it sits in the sequence (a linear
    model on flat features cannot: its position is random); 4-D features are refused."""
    from jobs.evaluation import generation as ge
    from jobs.evaluation.data import SplitData

    rng = np.random.default_rng(0)
    protos = rng.normal(size=(4, 6, 8)).astype(np.float32)

    def make(n):
        y = rng.integers(0, 4, n)
        x = rng.normal(scale=0.5, size=(n, 6, 48)).astype(np.float32)
        for i, c in enumerate(y):
            p = rng.integers(0, 40)
            x[i, :, p : p + 8] += 2 * protos[c]
        return x, np.asarray([str(c) for c in y])

    xtr, ytr = make(400)
    xte, yte = make(100)
    cnn = ge.SequenceCNN(width=32, epochs=15).fit(xtr, ytr)
    assert (cnn.predict(xte) == yte).mean() >= 0.9
    assert cnn.transform(xte).shape == (100, 6 * 48)

    split = SplitData(ids=["a", "b", "c"], labels=["0", "1", "0"])
    split.tensors["image"] = [np.zeros((32, 32, 3), np.uint8)] * 3
    monkeypatch.setattr(ge, "classifier_features", lambda t, items, cfg: np.zeros((3, 2, 2, 2)))
    with pytest.raises(ValueError, match=r"\(N, D\) or \(N, C, L\)"):
        ge.fit_classifier("image", split, split, None, 10)


#: docs/GENERATION.md's recipe: heads fitted after training, not inside the stages.
FIT_RECIPE = [
    "model_overrides.generation.scale_condition=true",
    "generation_fit.steps=1200",
    "align.loss_weights.generate=0",
    "finetune.loss_weights.generate=0",
]


def test_generation_fit_section_and_fit_in_place(corpus_rows, tmp_path):
    """``generation_fit`` after training: the export's heads are refit in place on its
    frozen encoders (encoder weights untouched, heads changed, loss falls); bad settings
    are refused."""
    import shutil

    from safetensors.torch import load_file

    from jobs.training.config import GenerationFitSection, load_train_config
    from jobs.training.runner import fit_heads_on_export
    from serve.devtools import write_gallery_split

    assert load_train_config(None).generation_fit.steps == 0  # off unless asked
    # The fitted-heads recipe of docs/GENERATION.md, as overrides of the demo config.
    demo = load_train_config("configs/train/demo_small.yaml", FIT_RECIPE)
    assert (
        demo.generation_fit.steps == 1200 and demo.model_overrides["generation"]["scale_condition"]
    )
    assert demo.align.loss_weights.get("generate") == 0.0
    for bad in ({"steps": -1}, {"batch": 0}, {"lr": 0.0}, {"max_rows": 0}):
        with pytest.raises(ValueError, match="generation_fit"):
            GenerationFitSection(**bad)
    rows, export = corpus_rows
    ex = tmp_path / "export"
    shutil.copytree(export, ex)
    write_gallery_split(rows, tmp_path / "shards" / "train")
    before = load_file(str(ex / "model.safetensors"))
    res = fit_heads_on_export(
        str(ex), str(tmp_path / "shards"), GenerationFitSection(steps=40, batch=32, lr=3e-3)
    )
    after = load_file(str(ex / "model.safetensors"))
    assert set(before) == set(after)
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("generators."), k  # encoders frozen, heads trained
    for t in TARGETS:
        first, last = res["loss"][t]
        assert last < first, (t, res["loss"])
    assert res["steps"] == 40 and res["wall_s"] > 0


def test_scale_condition_multiplies_the_condition_by_sqrt_e():
    """``generation.scale_condition``: the velocity net reads ``sqrt(E) * cond``; off (the
    default, as in exports made before it) it reads the unit-norm condition as is."""
    base = {"targets": ["image"], "hidden": 32, "blocks": 1}
    on = build_model(OmniConfig.from_name("tiny", generation={**base, "scale_condition": True}))
    off = build_model(OmniConfig.from_name("tiny", generation=base))
    e = on.config.embed_dim
    assert on.generators["image"].net.cond_gain == pytest.approx(e**0.5)
    assert off.generators["image"].net.cond_gain == 1.0
    off.generators.load_state_dict(on.generators.state_dict())  # same parameters
    net_on, net_off = on.generators["image"].net, off.generators["image"].net
    torch.nn.init.normal_(net_on.out.weight)
    net_off.out.weight.data.copy_(net_on.out.weight.data)
    x = torch.randn(2, 32 * 32 * 3)
    t = torch.tensor([0.3, 0.7])
    c = torch.nn.functional.normalize(torch.randn(2, e), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(net_on(x, t, c), net_off(x, t, c * e**0.5))
        assert not torch.allclose(net_on(x, t, c), net_off(x, t, c))
