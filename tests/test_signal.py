"""Signals of any channel count, length and orientation, on real recordings (aeon's UEA
archive copies): BasicMotions (smartwatch accelerometer + gyroscope, 6 channels, 100 steps)
and JapaneseVowels (12 LPC-cepstrum channels, 7-29 steps)."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from common.config import ConfigError
from pipelines.config import FeatureConfig
from pipelines.featurize import SampleError, get_featurizer

aeon_datasets = pytest.importorskip("aeon.datasets")

#: A corpus config: any channel count up to 12, aeon's (C, L) orientation.
VAR = {"channels": None, "max_channels": 12, "layout": "channels_first"}


def _f(**kw):
    return get_featurizer("signal", FeatureConfig().with_overrides({"signal": {**VAR, **kw}}))


def _npy(a: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=allow_pickle)
    return buf.getvalue()


def _nan_padded(xs: list[np.ndarray]) -> np.ndarray:
    """Unequal-length (C, L_i) recordings as one (N, C, max L) array, NaN at the end: what
    equal-length exports of unequal series (sktime/pandas, ``.ts`` converters) hold."""
    out = np.full((len(xs), xs[0].shape[0], max(x.shape[1] for x in xs)), np.nan)
    for i, x in enumerate(xs):
        out[i, :, : x.shape[1]] = x
    return out


@pytest.fixture(scope="module")
def motions():
    x_tr, y_tr = aeon_datasets.load_basic_motions(split="train")
    x_te, y_te = aeon_datasets.load_basic_motions(split="test")
    return x_tr, y_tr, x_te, y_te  # (40, 6, 100) each


@pytest.fixture(scope="module")
def vowels():
    x_tr, y_tr = aeon_datasets.load_japanese_vowels(split="train")
    x_te, y_te = aeon_datasets.load_japanese_vowels(split="test")
    return x_tr, y_tr, x_te, y_te  # lists of (12, L_i)


# -- real recordings featurize without refusal ----------------------------------------------
def test_basic_motions_six_channels(motions):
    x_tr = motions[0]
    assert x_tr.shape == (40, 6, 100)
    f = _f(layout="auto")
    for x in x_tr:
        out = f.featurize(x)
        assert out.shape == (6, 128) and out.dtype == np.float16
        # (L, C), as pandas/CSV exports hold it, gives the same item under layout=auto.
        assert np.array_equal(f.featurize(x.T.copy()), out)
        assert np.array_equal(f.featurize(_npy(x.T.astype(np.float32)), ".npy"), f.featurize(
            _npy(x.astype(np.float32)), ".npy"))  # fmt: skip
    # The legacy fixed count still refuses, now naming the key to change.
    with pytest.raises(SampleError) as e:
        get_featurizer("signal", FeatureConfig()).featurize(x_tr[0])
    assert e.value.reason == "bad_shape" and "features.signal.channels" in str(e.value)


def test_japanese_vowels_variable_length_and_nan_padding(vowels):
    x_tr = vowels[0]
    lengths = {x.shape[1] for x in x_tr}
    assert min(lengths) < 12 < max(lengths)  # shorter than its channel count: needs layout
    f = _f()
    padded = _nan_padded(x_tr)
    assert np.isnan(padded).any()
    for x, p in zip(x_tr[:60], padded[:60], strict=True):
        out = f.featurize(x)
        assert out.shape == (12, 128)
        # NaN end padding is trimmed: the padded recording gives the same item, from an
        # array, a .npy file and a CSV whose cells are empty (pandas' NaN) or "nan".
        assert np.array_equal(f.featurize(p), out)
        trimmed = p.shape[1] - x.shape[1]
        notes = {"nan_padding_trimmed": 1, "nan_padding_steps": trimmed} if trimmed else {}
        assert f.decode_noted(p)[1] == notes and f.decode_noted(x)[1] == {}  # stats.json
        assert np.array_equal(f.featurize(_npy(p), ".npy"), out)
        rows = ["c" + ",c".join(map(str, range(12)))]
        rows += [",".join("" if np.isnan(v) else repr(float(v)) for v in step) for step in p.T]
        assert np.array_equal(f.featurize("\n".join(rows).encode(), ".csv"), out)


def test_nan_inside_and_other_bad_input_keep_their_reason(vowels):
    f = _f()
    x = np.array(vowels[0][0], dtype=np.float64)  # (12, 20)
    cases = []
    inside = x.copy()
    inside[:, 5] = np.nan  # a whole step inside the recording
    cases.append((inside, "non_finite"))
    ragged = np.concatenate([x, np.full((12, 3), np.nan)], 1)
    ragged[0, -4] = np.nan  # one channel ends a step early: not padding of every channel
    cases.append((ragged, "non_finite"))
    inf_end = x.copy()
    inf_end[:, -1] = np.inf
    cases.append((inf_end, "non_finite"))
    cases.append((np.full((12, 9), np.nan), "empty"))
    cases.append((np.zeros((13, 50)), "too_large"))  # more than max_channels
    cases.append((np.zeros((2, 3, 50)), "bad_shape"))
    cases.append((np.array([[{"x": 1}, None]], dtype=object), "bad_dtype"))
    for arr, reason in cases:
        with pytest.raises(SampleError) as e:
            f.featurize(arr)
        assert e.value.reason == reason, (arr.shape, e.value)
    with pytest.raises(SampleError) as e:  # object .npy: refused from the header, unpickled never
        f.featurize(_npy(np.array([{"x": 1.0}, None], dtype=object), True), ".npy")
    assert e.value.reason == "bad_dtype"
    with pytest.raises(SampleError) as e:  # too many channels refused from the .npy header
        f.featurize(_npy(np.zeros((40, 500), np.float32)), ".npy")
    assert e.value.reason == "too_large"
    with pytest.raises(SampleError) as e:
        _f(max_length=100).featurize(np.zeros((3, 101)))
    assert e.value.reason == "too_large"


# -- orientation ---------------------------------------------------------------------------
def test_layout_rule_and_its_errors(motions):
    x = motions[0][0]  # (6, 100)
    auto = _f(layout="auto")
    assert auto.channels_axis((6, 100)) == 0 and auto.channels_axis((100, 6)) == 1
    # Both axes could be channels (a recording shorter than max_channels): refused, naming
    # the key; an explicit layout takes it.
    with pytest.raises(SampleError) as e:
        auto.featurize(x[:, :10])
    assert e.value.reason == "bad_shape" and "features.signal.layout" in str(e.value)
    assert _f(layout="channels_first").featurize(x[:, :10]).shape == (6, 128)
    assert _f(layout="channels_last").featurize(x[:, :10].T.copy()).shape == (6, 128)
    assert auto.featurize(x[0, :10]).shape == (1, 128)  # 1-D: one channel, however short
    # A fixed count resolves it: the axis equal to `channels` holds the channels.
    fixed = _f(channels=6, layout="auto")
    assert fixed.featurize(x[:, :10]).shape == fixed.featurize(x[:, :10].T.copy()).shape
    # A layout that contradicts the shape: the channel axis is too long / not `channels`.
    with pytest.raises(SampleError) as e:
        _f(layout="channels_last").featurize(x)
    assert e.value.reason == "too_large" and "100 channels" in str(e.value)
    with pytest.raises(SampleError) as e:
        _f(channels=6, max_channels=200, layout="channels_last").featurize(x)
    assert e.value.reason == "bad_shape" and "100 channels, want 6" in str(e.value)
    # CSV rows are time steps, whatever the layout: 3 rows x 6 columns = 6 channels.
    csv = "\n".join(",".join(str(v) for v in step) for step in x[:, :3].T).encode()
    assert _f(layout="channels_first").featurize(csv, ".csv").shape == (6, 128)
    for bad in ({"layout": "rows"}, {"normalize": "zscore"}, {"length_mode": "pad"}):
        with pytest.raises(ConfigError) as e:
            _f(**bad)
        assert next(iter(bad)) in str(e.value)


# -- length --------------------------------------------------------------------------------
def test_length_resample_or_crop(motions):
    x = motions[0][0].astype(np.float64)  # (6, 100)
    res = _f(length=64, normalize="none").decode(x)
    assert res.shape == (6, 64)
    np.testing.assert_allclose(res[:, 0], x[:, 0], rtol=1e-6)  # same span, endpoints kept
    np.testing.assert_allclose(res[:, -1], x[:, -1], rtol=1e-6)
    crop = _f(length=64, length_mode="crop", normalize="none")
    np.testing.assert_allclose(crop.featurize(x).astype(np.float64), x[:, :64], rtol=1e-3)
    short = crop.featurize(x[:, :40])
    assert short.shape == (6, 64)
    np.testing.assert_allclose(short[:, :40].astype(np.float64), x[:, :40], rtol=1e-3)
    assert not short[:, 40:].any()  # zero-padded at the end
    z = _f(length=64, length_mode="crop").featurize(x[:, :40]).astype(np.float64)
    np.testing.assert_allclose(z[:, :40].mean(1), 0, atol=1e-2)  # statistics of real steps


# -- normalization -------------------------------------------------------------------------
def test_three_normalizations_and_dataset_stats_from_train(motions):
    x_tr, _, x_te, _ = motions
    ps = _f().featurize(x_tr[0]).astype(np.float64)
    np.testing.assert_allclose(ps.mean(1), 0, atol=1e-2)
    np.testing.assert_allclose(ps.std(1), 1, atol=2e-2)
    raw = _f(normalize="none", length=100).featurize(x_tr[0]).astype(np.float64)
    np.testing.assert_allclose(raw, x_tr[0], rtol=2e-3, atol=2e-3)  # offset and scale kept
    with pytest.raises(SampleError) as e:
        _f(normalize="none").featurize(x_tr[0] * 1e6)
    assert e.value.reason == "non_finite" and "float16" in str(e.value)

    # dataset: per-channel statistics of the TRAIN items (the prepare hook), then applied.
    fc = FeatureConfig().with_overrides({"signal": {**VAR, "normalize": "dataset"}})
    plain = get_featurizer("signal", fc)
    assert type(plain).is_fitted(fc.signal) and not type(plain).is_fitted(FeatureConfig().signal)
    assert _f().fit([_f().decode(x) for x in x_tr]) is None  # per_sample fits nothing
    decoded = [plain.decode(x) for x in x_tr]
    stats = plain.fit(decoded)
    assert set(stats) == {"stats"} and len(stats["stats"]["mean"]) == 6
    stack = np.stack(decoded).astype(np.float64)  # (40, 6, 128)
    np.testing.assert_allclose(stats["stats"]["mean"], stack.mean((0, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["stats"]["std"], stack.std((0, 2)), rtol=1e-4)
    fitted = get_featurizer("signal", fc.with_overrides({"signal": stats}))
    train = np.stack([fitted.finalize(d) for d in decoded]).astype(np.float64)
    np.testing.assert_allclose(train.mean((0, 2)), 0, atol=1e-2)
    np.testing.assert_allclose(train.std((0, 2)), 1, atol=1e-2)
    test = np.stack([fitted.featurize(x) for x in x_te]).astype(np.float64)
    assert np.abs(test.mean((0, 2))).max() < 1.0  # the test split is scaled by train's stats
    # Within a recording, offsets survive (per-sample would zero every channel mean).
    assert np.abs(test.mean(2)).max() > 0.5
    # Stats round-trip through the config (what data_config.yaml and the export carry).
    again = FeatureConfig.from_config_dict(fitted.config.to_config_dict())
    assert again.signal.stats == fitted.section.stats
    with pytest.raises(ConfigError):
        _f(stats={"mean": [0.0], "std": [0.0]})


def test_dataset_stats_per_channel_index_with_mixed_counts():
    f = _f(normalize="dataset")
    rng = np.random.default_rng(0)
    three = [rng.normal(5.0, 2.0, (3, 128)).astype(np.float32) for _ in range(4)]
    six = [rng.normal(-1.0, 0.5, (6, 128)).astype(np.float32) for _ in range(4)]
    st = f.fit(three + six)["stats"]
    assert len(st["mean"]) == 6
    assert 1.0 < st["mean"][0] < 3.0  # channel 0: both kinds of recording
    assert st["mean"][4] == pytest.approx(-1.0, abs=0.1)  # channel 4: six-channel ones only
    g = _f(normalize="dataset", stats=st)
    out = g.finalize(rng.normal(0, 1, (12, 128)).astype(np.float32))
    assert out.shape == (12, 128)  # channels beyond the fitted ones are left unscaled


def test_dataset_normalization_keeps_what_per_sample_loses(vowels):
    """1-NN on JapaneseVowels' LPC cepstra: their offsets and scales carry the speaker."""
    x_tr, y_tr, x_te, y_te = vowels
    acc = {}
    for norm in ("per_sample", "dataset"):
        f = _f(normalize=norm, length=32)
        decoded = [f.decode(x) for x in x_tr]
        stats = f.fit(decoded)
        if stats:
            f = get_featurizer("signal", f.config.with_overrides({"signal": stats}))
        a = np.stack([f.finalize(d).astype(np.float32).ravel() for d in decoded])
        b = np.stack([f.featurize(x).astype(np.float32).ravel() for x in x_te])
        nearest = ((b[:, None, :] - a[None]) ** 2).sum(-1).argmin(1)
        acc[norm] = float((y_tr[nearest] == y_te).mean())
    assert acc["dataset"] > 0.9 and acc["dataset"] > acc["per_sample"] + 0.2, acc


# -- model: mixed channel counts in one batch -------------------------------------------------
def test_watch_and_twelve_channel_recording_in_one_batch(motions, vowels):
    from jobs.exports import model_sizes
    from models import OmniConfig, build_model
    from models.data import collate
    from models.encoders import build_encoder

    f = _f()
    watch = f.featurize(motions[0][0][:3])  # the 3-axis accelerometer alone
    items = [watch, f.featurize(motions[0][1]), f.featurize(vowels[0][0]), watch]
    assert [x.shape[0] for x in items] == [3, 6, 12, 3]
    sizes = model_sizes({"signal": f})
    assert sizes["encoders"]["signal"] == {"channels": 12, "length": 128}
    cfg = OmniConfig.from_name("tiny", modalities=["signal"], num_classes=4, **sizes)
    batch = collate([{"signal": x, "label": i} for i, x in enumerate(items)], ["signal"])
    assert batch["signal"].shape == (4, 12, 128)
    assert batch["signal_mask"].sum(1).tolist() == [3, 6, 12, 3]
    torch.manual_seed(0)
    enc = build_encoder("signal", cfg).eval()
    tokens, mask = enc(batch)
    n = 128 // enc.patch
    assert mask.shape == (4, 12 * n) and mask.sum(1).tolist() == [3 * n, 6 * n, 12 * n, 3 * n]
    # A row's tokens do not depend on the padding other rows forced on it.
    alone, _ = enc(collate([{"signal": watch}], ["signal"]))
    torch.testing.assert_close(tokens[0, : 3 * n], alone[0], rtol=1e-4, atol=1e-4)
    # Masked modelling on the mixed batch reaches every encoder parameter.
    enc.train()
    out = enc.encode(batch, mask_ratio=0.5)
    assert not (out.masked & ~out.mask).any()  # padded channels are never chosen
    (out.tokens[out.mask].pow(2).mean() + tokens[mask].pow(2).mean()).backward()
    assert not [k for k, p in enc.named_parameters() if p.grad is None]
    # The whole model (packed trunk, pooling, heads) takes the batch.
    torch.manual_seed(0)
    model = build_model(cfg)
    res = model(batch)
    assert res.logits.shape == (4, 4) and torch.isfinite(res.embeds["signal"]).all()
    res.logits.logsumexp(-1).mean().backward()
    missing = [k for k, p in model.named_parameters() if k.startswith("encoders.signal.")
               and p.grad is None]  # fmt: skip
    assert missing == ["encoders.signal.mask_token"], missing  # no masking in this pass


def test_old_three_channel_models_keep_their_parameters():
    from models import OmniConfig
    from models.encoders import build_encoder

    cfg = OmniConfig.from_name(
        "tiny", modalities=["signal"], signal_channels=3, signal_length=128, signal_patch=16
    )
    enc = build_encoder("signal", cfg)
    shapes = {k: tuple(v.shape) for k, v in enc.state_dict().items() if "blocks" not in k}
    d = cfg.d_model
    assert shapes == {
        "modality_embed": (1, 1, d),
        "mask_token": (1, 1, d),
        "time_pos": (1, 1, 8, d),
        "channel_embed": (1, 3, 1, d),
        "proj.weight": (d, 16),
        "proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    # A batch without signal_mask (an old collate, a fixed count) is every channel.
    x = torch.randn(2, 3, 128)
    tokens, mask = enc({"signal": x})
    assert mask.all() and tokens.shape == (2, 24, d)


# -- serving ---------------------------------------------------------------------------------
def test_serve_takes_any_channel_count_and_null_padding(vowels):
    from serve.config import Limits
    from serve.modalities import get_spec

    spec = get_spec("signal")
    f = _f()
    x = np.asarray(vowels[0][3], dtype=np.float32)  # (12, L)
    want = f.featurize(x)
    padded = x.tolist()
    padded = [row + [None, None] for row in padded]  # JSON null = NaN end padding
    for value in (x.tolist(), padded):
        item = spec.parse(value, Limits(), "input[0].signal")
        got = spec.featurize(f, item)
        np.testing.assert_array_equal(got, want)
        assert spec.cost(got) == 12  # the encoder's tokens grow with the channels
    file_item = spec.parse(base64.b64encode(_npy(x)).decode(), Limits(), "input[0].signal")
    np.testing.assert_array_equal(spec.featurize(f, file_item), want)
    inside = [row[:2] + [None] + row[3:] for row in x.tolist()]
    with pytest.raises(SampleError) as e:
        spec.featurize(f, spec.parse(inside, Limits(), "input[0].signal"))
    assert e.value.reason == "non_finite"


# -- prepare: a real mixed-sensor corpus, dataset statistics from the train split ---------------
def test_prepare_mixed_sensors_with_dataset_normalization(ray_local, motions, vowels, tmp_path):
    import glob
    import json
    from pathlib import Path

    from pipelines.config import load_data_config
    from pipelines.prepare import run_prepare
    from pipelines.schema import read_shard

    root = tmp_path / "corpus"
    (root / "signals").mkdir(parents=True)
    rows, padded = [], _nan_padded(vowels[0][:12])
    for i, x in enumerate(motions[0][:12]):  # 6 channels, half of them as CSV (L, C)
        name = f"signals/motion{i}." + ("csv" if i % 2 else "npy")
        data = (
            "\n".join(",".join(repr(float(v)) for v in step) for step in x.T).encode()
            if i % 2
            else _npy(x.astype(np.float32))
        )
        (root / name).write_bytes(data)
        rows.append({"id": f"m{i:02d}", "signal": name, "label": str(motions[1][i])})
    for i, p in enumerate(padded):  # 12 channels, NaN end padding
        (root / f"signals/vowel{i}.npy").write_bytes(_npy(p))
        rows.append({"id": f"v{i:02d}", "signal": f"signals/vowel{i}.npy", "label": "vowel"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_data_config(
        Path(__file__).parents[1] / "configs" / "data" / "omnidigits.yaml",
        ["execution.progress_bars=false", "features.signal.normalize=dataset",
         "features.signal.layout=channels_first"],
    )  # fmt: skip
    out = tmp_path / "out"
    stats = run_prepare(manifest, out, cfg, verbose=False)
    assert stats["rows_written"]["total"] == len(rows)  # every recording kept
    trimmed = sum(p.shape[1] > x.shape[1] for p, x in zip(padded, vowels[0][:12], strict=True))
    assert stats["cleaned"]["nan_padding_trimmed"] == trimmed > 0
    written = load_data_config(out / "data_config.yaml")
    st = written.features.signal.stats
    assert len(st["mean"]) == 12  # per channel index, fitted on the train split
    f = get_featurizer("signal", written.features)
    shapes = set()
    for path in glob.glob(str(out / "*" / "*.parquet")):
        cols = read_shard(path, ["signal"])
        for rid, x in zip(cols["id"], cols["signal"], strict=True):
            assert x.dtype == np.float16
            shapes.add(x.shape)
            src = next(r["signal"] for r in rows if r["id"] == rid)
            # What serving computes from the raw file equals what prepare wrote.
            np.testing.assert_array_equal(f.featurize((root / src).read_bytes()), x)
    assert shapes == {(6, 128), (12, 128)}


def test_channel_embedding_init_is_configurable():
    """encoders.signal.channel_init sets the channel table's init scale (default 0.02, as
    the demo's models were trained); it must be positive."""
    from models import OmniConfig, build_model
    from models.encoders.signal import SignalEncoder

    torch.manual_seed(0)
    cfg = OmniConfig.from_name("tiny", modalities=["signal"], encoders={"signal": {"channels": 12}})
    assert SignalEncoder(cfg, cfg.encoder_section("signal")).channel_embed.std().item() == (
        pytest.approx(0.02, rel=0.2)
    )
    loud = OmniConfig.from_name(
        "tiny", modalities=["signal"], encoders={"signal": {"channels": 12, "channel_init": 0.5}}
    )
    model = build_model(loud)
    assert model.encoders["signal"].channel_embed.std().item() == pytest.approx(0.5, rel=0.2)
    with pytest.raises(ConfigError, match="channel_init must be > 0"):
        SignalEncoder.Config(channel_init=0.0)
