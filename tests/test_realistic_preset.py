"""The realistic preset (configs/data/realistic.yaml + configs/train/realistic.yaml).

Both YAMLs load; a real photo (scikit-learn's sample JPEG) featurizes to 224x224x3; the model
config the training driver derives from the preset's prepared data builds for every named
size with sane token counts, and one forward at tiny width runs on the CPU on items the
preset's own featurizers produced.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from common.config import save_yaml
from common.modalities import modality_names

ROOT = Path(__file__).resolve().parents[1]
DATA_YAML = ROOT / "configs/data/realistic.yaml"
TRAIN_YAML = ROOT / "configs/train/realistic.yaml"
# Tokens per item the trunk may see per modality (a 224-px image with the demo's 4-px
# patches would be 3,136; video with 16-px tubelets 1,568).
MAX_TOKENS = 512


def _photo_jpeg() -> bytes:
    """A real photo as JPEG bytes (scikit-learn ships two; scikit-image's astronaut if present)."""
    import sklearn.datasets

    path = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    return path.read_bytes()


@pytest.fixture(scope="module")
def preset():
    from jobs.training.config import load_train_config
    from pipelines.config import load_data_config

    return load_data_config(DATA_YAML), load_train_config(str(TRAIN_YAML))


def test_both_yamls_load_with_the_documented_sizes(preset):
    dc, tc = preset
    f = dc.features
    assert f.image.size == 224
    assert f.text.max_len == 77
    assert f.audio.sample_rate == 16000
    assert f.audio.max_frames * f.audio.hop_ms / 1000 == pytest.approx(10.0)
    assert (f.video.num_frames, f.video.size) == (16, 224)
    assert 1024 <= f.pointcloud.num_points <= 8192
    assert tc.model in ("small", "base")
    # Sizes come from the data: the train config fixes only token-forming choices.
    for m, section in tc.model_overrides.get("encoders", {}).items():
        assert not {"size", "frames", "points", "channels", "length", "bins", "max_frames"} & set(
            section
        ), f"{m}: input sizes belong to the data config"


def test_a_real_photo_featurizes_to_224(preset):
    from PIL import Image

    from pipelines.featurize import get_featurizer

    dc, _ = preset
    f = get_featurizer("image", dc.features)
    raw = _photo_jpeg()
    assert Image.open(io.BytesIO(raw)).size == (640, 427)  # landscape, not square
    arr = f.featurize(raw, suffix=".jpg")
    assert arr.shape == (224, 224, 3) and arr.dtype == np.uint8
    assert arr.std() > 10  # a photo, not a blank


def _model_config(tc, shards_dir: Path, size: str, modalities: list[str]):
    """What the training driver resolves (runner.model_config_from_data), at ``size``."""
    from jobs.training.runner import model_config_from_data

    info = SimpleNamespace(label_names=["a", "b", "c"])
    return model_config_from_data(replace(tc, model=size), str(shards_dir), info, modalities)


@pytest.fixture(scope="module")
def shards_dir(preset, tmp_path_factory):
    """A prepared-data dir holding the preset's ``data_config.yaml`` and a small tokenizer."""
    from pipelines.tokenizer import train_tokenizer

    dc, _ = preset
    d = tmp_path_factory.mktemp("realistic_shards")
    save_yaml(dc, d / "data_config.yaml")
    texts = [f"a photo of a {w} number {i}" for i in range(50) for w in ("cat", "dog", "ship")]
    train_tokenizer(texts, d / "tokenizer", vocab_size=dc.features.text.vocab_size)
    return d


@pytest.mark.parametrize("size", ["small", "base"])
def test_named_sizes_fit_the_preset(preset, shards_dir, size):
    _, tc = preset
    mods = [m for m in modality_names() if m != "tabular"]
    cfg = _model_config(tc, shards_dir, size, mods)
    img = cfg.encoder_section("image")
    assert (img.size, img.size // img.patch) == (224, 14)
    vid = cfg.encoder_section("video")
    assert (vid.frames // vid.tubelet) * (vid.size // vid.patch) ** 2 <= MAX_TOKENS
    aud = cfg.encoder_section("audio")
    assert aud.max_patches <= MAX_TOKENS
    sig = cfg.encoder_section("signal")
    assert sig.length // sig.patch <= MAX_TOKENS  # per channel (C * that in all)
    assert cfg.max_text_len == 77


def test_tiny_model_from_the_preset_runs_a_forward_on_cpu(preset, shards_dir):
    import torch

    from models import build_model
    from models.data import collate
    from pipelines.featurize import build_featurizers

    dc, tc = preset
    mods = [m for m in modality_names() if m not in ("text", "tabular")]
    cfg = _model_config(tc, shards_dir, "tiny", ["text", *mods])
    feats = build_featurizers(dc.features, mods)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(2):
        s = {"label": "abc"[i], "text": np.array([1, 40 + i, 50, 2], np.int32)}
        for m in mods:
            raw, suffix = feats[m].example(rng, i)
            s[m] = feats[m].featurize(raw, suffix=suffix)
        samples.append(s)
    samples[0]["image"] = feats["image"].featurize(_photo_jpeg(), suffix=".jpg")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    batch = collate(samples, modalities=["text", *mods], label_names=["a", "b", "c"])
    with torch.no_grad():
        out = model(batch)
    assert out.logits.shape == (2, 3)
    for m in mods:
        tokens = out.features[m].tokens
        assert tokens.shape[0] == 2 and 0 < tokens.shape[1] <= MAX_TOKENS, (m, tokens.shape)
        assert torch.isfinite(out.embeds[m]).all()
