"""Featurizer contract tests, parametrized over the registry (INTERFACES §1-2)."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from common.modalities import get_modality
from pipelines.config import FeatureConfig
from pipelines.featurize import FEATURIZERS, SampleError, get_featurizer
from pipelines.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, load_tokenizer, train_tokenizer

CFG = FeatureConfig()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tok")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = [f"the digit {w}" for w in words] * 20 + [f"a handwritten {w}" for w in words] * 20
    texts += [f"item {i}" for i in range(10)] * 5
    train_tokenizer(texts, d, vocab_size=300)
    return d


def _png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, "PNG")
    return b.getvalue()


def _wav(x: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    b = io.BytesIO()
    sf.write(b, x, rate, format=fmt, subtype=subtype)
    return b.getvalue()


def _mp4(tmp: Path, frames: int = 12, size: str = "64x48") -> bytes:
    p = tmp / "v.mp4"
    subprocess.run(
        ["ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
         f"testsrc=size={size}:rate=10", "-frames:v", str(frames), "-pix_fmt", "yuv420p", str(p)],
        check=True,
    )  # fmt: skip
    return p.read_bytes()


def _ply(points: np.ndarray) -> bytes:
    head = (
        "ply\nformat ascii 1.0\n"
        f"element vertex {len(points)}\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n"
    )
    body = "\n".join(" ".join(f"{v:.6f}" for v in p) for p in points)
    return (head + body + "\n").encode()


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    b = io.BytesIO()
    np.save(b, arr, allow_pickle=allow_pickle)
    return b.getvalue()


def _featurizer(modality: str, tokenizer_dir: Path):
    kw = {"tokenizer_dir": tokenizer_dir} if FEATURIZERS[modality].tokenized else {}
    return get_featurizer(modality, CFG, **kw)


def test_registry_covers_the_table():
    from common.modalities import MODALITIES

    assert set(FEATURIZERS) == set(MODALITIES)
    with pytest.raises(KeyError, match="registered"):
        get_featurizer("smell")


def test_register_refuses_an_undeclared_modality():
    from pipelines.featurize import Featurizer, register

    with pytest.raises(ValueError, match="not a declared modality"):
        register("smell")(type("Smell", (Featurizer,), {}))


def _run_fresh(code: str) -> None:
    """Runs ``code`` in a fresh interpreter at the repo root (nothing imported yet)."""
    import sys

    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_warm_up_loads_the_lazy_heavy_libraries():
    """Serving replicas call warm_up() at start so their first request does not import
    open3d (~0.4 s) or decord; checked in a fresh interpreter."""
    code = (
        "import sys\n"
        "from pipelines.featurize import get_featurizer\n"
        "for m, lib in (('pointcloud', 'open3d'), ('video', 'decord')):\n"
        "    f = get_featurizer(m)\n"
        "    assert lib not in sys.modules, lib\n"
        "    f.warm_up()\n"
        "    assert lib in sys.modules, lib\n"
    )
    _run_fresh(code)


def test_open3d_imported_without_its_web_visualizer():
    """The point-cloud featurizer imports open3d without dash/plotly (half its import
    time in every worker); open3d works, and open3d.visualization still imports later."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from pipelines.featurize.pointcloud import import_open3d\n"
        "o3d = import_open3d()\n"
        "assert 'dash' not in sys.modules and 'plotly' not in sys.modules\n"
        "assert 'open3d.visualization' not in sys.modules\n"
        "pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.random.rand(50, 3)))\n"
        "assert len(pcd.farthest_point_down_sample(8).points) == 8\n"
        "assert import_open3d() is o3d\n"
        "import open3d.visualization as vis\n"
        "assert o3d.visualization is vis and hasattr(vis, 'draw_plotly')\n"
    )
    _run_fresh(code)


@pytest.mark.parametrize("modality", sorted(FEATURIZERS))
def test_featurizer_example_shape_dtype_finite(modality, tokenizer_dir):
    """Each featurizer's own example featurizes to its record's dtype and rank, inside
    its declared shapes, deterministically; the file examples are recognized by sniff."""
    f = _featurizer(modality, tokenizer_dir)
    f.warm_up()  # every featurizer has it (a no-op unless it loads something lazily)
    rec = get_modality(modality)
    raw, suffix = f.example(np.random.default_rng(0), label=3)
    if isinstance(raw, bytes):
        assert suffix in f.suffixes and f.sniff(raw) == suffix
        assert not f.accepts_inline(f"sample{suffix}")
    else:
        assert suffix is None and rec.inline and f.accepts_inline(raw)
    out = f.featurize(raw, suffix)
    assert out.dtype == rec.np_dtype == f.dtype
    declared, bound = f.output_shape(), f.max_output_shape()
    assert out.ndim == rec.rank == len(declared) == len(bound)
    for axis, (got, want, most) in enumerate(zip(out.shape, declared, bound, strict=True)):
        assert 1 <= got <= most
        assert want is None or got == want
        if want is None:
            assert axis == rec.var_axis or rec.var_axis is None
    assert np.isfinite(out.astype(np.float64)).all()
    # Deterministic: the same input gives the same features; decode + finalize = featurize.
    np.testing.assert_array_equal(out, f.featurize(raw, suffix))
    np.testing.assert_array_equal(out, f.finalize(f.decode(raw, suffix)))


@pytest.mark.parametrize("modality", sorted(FEATURIZERS))
def test_featurizer_example_depends_on_label(modality, tokenizer_dir):
    """A model can learn the label from the examples (synthetic shards rely on it)."""
    f = _featurizer(modality, tokenizer_dir)
    a = f.featurize(*f.example(np.random.default_rng(0), label=1))
    b = f.featurize(*f.example(np.random.default_rng(0), label=6))
    assert a.shape != b.shape or not np.array_equal(a, b)


@pytest.mark.parametrize("modality", sorted(FEATURIZERS))
def test_featurizer_empty_and_garbage(modality, tokenizer_dir):
    f = _featurizer(modality, tokenizer_dir)
    with pytest.raises(SampleError) as e:
        f.featurize(b"", f.suffixes[0] if f.suffixes else None)
    assert e.value.reason == "empty"
    if FEATURIZERS[modality].decoded_dtype == "str":
        garbage = b"\xff\xfe\xfa invalid utf-8 \xc3\x28"
    else:
        garbage = np.random.default_rng(1).integers(0, 256, 700, dtype=np.uint8).tobytes()
    assert f.sniff(garbage) is None
    with pytest.raises(SampleError) as e:
        f.featurize(garbage, f.suffixes[0] if f.suffixes else None)
    assert e.value.reason in ("decode_error", "truncated", "bad_dtype")


def test_feature_config_sections_overrides_and_yaml_shape(tmp_path):
    from common.config import ConfigError, to_dict

    fc = FeatureConfig.from_config_dict({"image": {"size": 64}})
    assert fc.image.size == fc.section("image").size == 64
    assert isinstance(fc.image, FEATURIZERS["image"].Config)
    limited = fc.with_overrides({"image": {"max_pixels": 1000}})
    assert limited.image.max_pixels == 1000 and limited.image.size == 64
    assert fc.image.max_pixels != 1000  # the original is untouched
    d = to_dict(fc)
    assert set(d) == set(FEATURIZERS) | {"max_file_bytes"} and d["image"]["size"] == 64
    assert FeatureConfig.from_config_dict(d) == fc
    for bad in ({"smell": {}}, {"image": {"sise": 3}}, {"audio": {"features": "x"}}):
        with pytest.raises(ConfigError):
            FeatureConfig.from_config_dict(bad)
    with pytest.raises(ConfigError):
        fc.with_overrides({"image": {"size": "big"}})
    from pipelines.config import load_feature_config

    with pytest.raises(ConfigError, match="not found"):
        load_feature_config(tmp_path / "missing.yaml")
    (tmp_path / "d.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="features"):
        load_feature_config(tmp_path / "d.yaml")


def test_text_model_args_come_from_tokenizer_and_section(tokenizer_dir):
    f = get_featurizer("text", CFG, tokenizer_dir=tokenizer_dir)
    assert f.model_args() == {
        "vocab_size": load_tokenizer(tokenizer_dir).get_vocab_size(),
        "max_text_len": CFG.text.max_len,
    }


def test_image_truncated_and_bomb():
    f = get_featurizer("image", CFG)
    good = _png((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    with pytest.raises(SampleError) as e:
        f.from_bytes(good[: len(good) // 2], ".png")
    assert e.value.reason == "truncated"

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    # 100k x 100k grey PNG header with a tiny IDAT: only the header is ever parsed.
    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )
    with pytest.raises(SampleError) as e:
        f.from_bytes(bomb, ".png")
    assert e.value.reason == "too_large"


def test_image_aspect_center_crop_and_arrays():
    f = get_featurizer("image", CFG)
    # Left half black, right half white, 2:1 aspect: the centre crop keeps both halves.
    a = np.zeros((50, 100, 3), np.uint8)
    a[:, 50:] = 255
    out = f.from_array(a)
    assert out.shape == (32, 32, 3)
    assert out[:, :10].max() < 30 and out[:, -10:].min() > 225
    assert f.from_array(np.ones((40, 40), np.float32)).min() == 255  # grey float in [0, 1]
    with pytest.raises(SampleError) as e:
        f.from_array(np.full((8, 8, 3), np.nan, np.float32))
    assert e.value.reason == "non_finite"


def test_audio_resample_mono_and_limits():
    cfg = FeatureConfig()
    f = get_featurizer("audio", cfg)
    t = np.arange(44100) / 44100
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    mono = f.from_bytes(_wav(tone, 44100), ".wav")
    stereo = f.from_bytes(_wav(np.stack([tone, tone], 1), 44100), ".wav")
    assert mono.shape == stereo.shape == (98, 40)  # 1 s at 16 kHz, 25 ms / 10 ms
    np.testing.assert_allclose(mono.astype(np.float32), stereo.astype(np.float32), atol=1e-2)
    long = f.from_array(np.zeros(16000 * 5, np.float32) + 0.01, sample_rate=16000)
    assert long.shape == (128, 40)  # centre-cropped to max_frames
    cfg.audio.features = "mfcc"
    assert get_featurizer("audio", cfg).from_bytes(_wav(tone, 44100), ".wav").shape == (98, 20)
    good = _wav(tone, 44100)
    with pytest.raises(SampleError) as e:
        f.from_bytes(good[: len(good) // 3], ".wav")
    assert e.value.reason == "truncated"
    with pytest.raises(SampleError) as e:
        f.from_bytes(_wav(np.array([0.1, np.nan, 0.2] * 200, np.float32), 16000, "FLOAT"), ".wav")
    assert e.value.reason == "non_finite"
    cfg2 = FeatureConfig()
    cfg2.audio.max_seconds = 0.5
    with pytest.raises(SampleError) as e:
        get_featurizer("audio", cfg2).from_bytes(good, ".wav")
    assert e.value.reason == "too_large"


def test_video_truncated_frames_and_arrays(tmp_path):
    f = get_featurizer("video", CFG)
    data = _mp4(tmp_path, frames=30)
    with pytest.raises(SampleError) as e:
        f.from_bytes(data[: len(data) // 2], ".mp4")
    assert e.value.reason == "truncated"
    frames = np.zeros((20, 40, 40, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(20)[:, None, None] * 10  # frame index in red
    out = f.from_array(frames)
    assert out.shape == (8, 32, 32, 3)
    # Uniform sampling: segment centres of 20 frames in 8 segments.
    np.testing.assert_array_equal(out[:, 0, 0, 0] // 10, [1, 3, 6, 8, 11, 13, 16, 18])
    cfg = FeatureConfig()
    cfg.video.max_frames = 10
    with pytest.raises(SampleError) as e:
        get_featurizer("video", cfg).from_bytes(data, ".mp4")
    assert e.value.reason == "too_large"
    # A track header claiming 60000x60000 frames is refused before decoding.
    i = data.index(b"tkhd") - 4
    end = i + struct.unpack(">I", data[i : i + 4])[0]
    bomb = data[: end - 8] + struct.pack(">II", 60000 << 16, 60000 << 16) + data[end:]
    with pytest.raises(SampleError) as e:
        f.from_bytes(bomb, ".mp4")
    assert e.value.reason == "too_large"


def test_pointcloud_normalized_fps_and_nan():
    f = get_featurizer("pointcloud", CFG)
    rng = np.random.default_rng(0)
    pts = rng.standard_normal((2000, 3)) * 5 + 100
    out = f.from_array(pts).astype(np.float32)
    assert out.shape == (256, 3)
    norms = np.linalg.norm(out, axis=1)
    assert norms.max() <= 1.0 + 1e-2 and norms.max() > 0.5
    assert len(np.unique(out, axis=0)) == 256  # FPS picks distinct points
    assert f.from_array(pts[:10]).shape == (256, 3)  # tiled up
    bad = pts.copy()
    bad[5] = np.nan
    with pytest.raises(SampleError) as e:
        f.from_bytes(_ply(bad), ".ply")
    assert e.value.reason == "non_finite"
    cfg = FeatureConfig()
    cfg.pointcloud.normals = True
    out6 = get_featurizer("pointcloud", cfg).from_array(np.concatenate([pts, pts * 0 + 1], 1))
    assert out6.shape == (256, 6) and np.allclose(out6[:, 3:].astype(np.float32), 1.0)


def test_signal_npy_never_unpickles(tmp_path):
    f = get_featurizer("signal", CFG)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = _npy(np.array([Payload(), None], dtype=object), allow_pickle=True)
    with pytest.raises(SampleError) as e:
        f.from_bytes(evil, ".npy")
    assert e.value.reason == "bad_dtype"
    assert not marker.exists()


def test_signal_csv_channels_and_errors():
    f = get_featurizer("signal", CFG)
    rows = "\n".join(f"{i},{i * 2},{i % 2}" for i in range(50))
    out = f.from_bytes(("x,y,pen\n" + rows + "\n").encode(), ".csv")
    assert out.shape == (3, 128)
    np.testing.assert_allclose(out.astype(np.float32).mean(axis=1), 0, atol=1e-2)
    np.testing.assert_allclose(out.astype(np.float32).std(axis=1), 1, atol=2e-2)
    with pytest.raises(SampleError) as e:
        f.from_bytes(("x,y,pen\n" + rows + "\n1,nan,inf\n").encode(), ".csv")
    assert e.value.reason == "non_finite"
    with pytest.raises(SampleError) as e:
        f.from_array(np.zeros((2, 50)))
    assert e.value.reason == "bad_shape"
    with pytest.raises(SampleError) as e:
        f.from_bytes(_npy(np.zeros((3, 20), np.complex64)), ".npy")
    assert e.value.reason == "bad_dtype"
    trunc = _npy(np.zeros((3, 500), np.float32))
    with pytest.raises(SampleError) as e:
        f.from_bytes(trunc[:300], ".npy")
    assert e.value.reason == "truncated"


def test_text_cleaning_and_tokens(tokenizer_dir):
    f = get_featurizer("text", CFG, tokenizer_dir=tokenizer_dir)
    assert f.clean("  the\tdigit\x07  seven\n") == "the digit seven"
    assert f.clean("e\u0301") == "\u00e9"  # NFC
    ids = f.from_text("the  digit\x00 seven")
    assert ids.dtype == np.int32 and ids[0] == BOS_ID and ids[-1] == EOS_ID
    assert f.detokenize(ids) == "the digit seven"
    long = f.from_text("seven " * 200)
    assert len(long) == CFG.text.max_len and long[-1] == EOS_ID
    for bad, reason in [
        ("\x00\x01\x02\x03\x1b[31m", "control_chars"),
        ("   \n\t ", "empty"),
        ("x" * (CFG.text.max_chars + 1), "too_large"),
    ]:
        with pytest.raises(SampleError) as e:
            f.from_text(bad)
        assert e.value.reason == reason
    with pytest.raises(SampleError) as e:
        f.from_bytes(b"caf\xe9 latin-1", ".txt")
    assert e.value.reason == "decode_error"
    assert f.detokenize(f.from_bytes("\ufeffthe digit two".encode(), ".txt")) == "the digit two"


def test_tokenizer_specials_and_roundtrip(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= 300
    # Byte-level: unseen characters still round-trip, never <unk>.
    enc = tok.encode("Zürich 東京 ✓", add_special_tokens=False)
    assert 3 not in enc.ids
    assert tok.decode(enc.ids) == "Zürich 東京 ✓"
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tokenizer_dir / "missing")
