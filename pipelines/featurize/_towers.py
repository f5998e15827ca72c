"""Featurizers of pretrained towers: the tower's own processor is the featurizer.

Selected per modality by ``features.<m>.tower`` (a local Hugging Face directory or a hub
id) in the data config; prepare, training, evaluation and serving then all build the same
processor from the same files (an export carries them under ``towers/<m>/``). Each class
extends the modality's own featurizer, so decoding, limits and quarantine reasons are the
same; what changes is the featurized form, which follows the tower:

* text: the tower tokenizer's ids (its ``[CLS] ... [SEP]``), cut to ``max_len`` (0: the
  tower's longest); the text vocabulary and special ids of the model follow the tokenizer.
* image: the image processor's resize/crop at the tower's resolution, stored as uint8
  ``(H, W, 3)`` (4x smaller than float pixels); the processor's rescale and mean/std are
  applied by the encoder (``models/encoders/hf.py``) from the same processor files.
* video: the image processor per frame, uint8 ``(F, H, W, 3)``.
* audio: mono, resampled to the feature extractor's rate, cut to ``clip_seconds``, then the
  feature extractor: ``(T, 1)`` normalized waveform (wav2vec2/HuBERT) or ``(T, F)`` mel
  frames (Whisper/AST).
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil
from pathlib import Path
from typing import Any

import numpy as np

from common.towers import TowerError, check_tower, load_config, load_processor, resolve_ref
from common.towers import tower_revision as _revision
from pipelines.featurize.audio import AudioFeaturizer, resample
from pipelines.featurize.base import SampleError, check_finite
from pipelines.featurize.image import ImageFeaturizer
from pipelines.featurize.text import TextFeaturizer
from pipelines.featurize.video import VideoFeaturizer


class _TowerMixin:
    """Loads and checks the processor of ``section.tower`` (relative: against
    ``assets_dir``, the shards or export directory)."""

    section: Any
    modality: str

    def _load_tower(self, assets_dir: str | Path | None) -> None:
        self.tower_ref = resolve_ref(self.section.tower, assets_dir)
        self.tower_config = load_config(self.tower_ref)
        self.processor = load_processor(self.tower_ref, self.modality)
        self.tower_info = check_tower(
            self.tower_ref, self.modality, self.tower_config, self.processor
        )

    def tower_revision(self) -> str:
        return _revision(self.tower_ref)

    def encoder_fields(self) -> dict[str, Any]:
        """The ``encoders.<m>`` section of kind ``hf`` this featurizer's output needs."""
        return {
            "kind": "hf",
            "tower": self.tower_ref,
            "revision": self.tower_revision(),
            "hidden": int(self.tower_info["hidden"]),
            **self._shape_fields(),
        }

    def _shape_fields(self) -> dict[str, Any]:
        raise NotImplementedError


class TowerTextFeaturizer(_TowerMixin, TextFeaturizer):
    """Text -> int32 ids of the tower's tokenizer."""

    @dataclass
    class Config(TextFeaturizer.Config):
        """``features.text`` with a tower: ``tower`` (dir or hub id) and ``cache``
        (compute the frozen tower's features once in prepare); ``max_len`` 0 = the
        tower's longest sequence."""

        tower: str = ""
        cache: bool = False
        max_len: int = 0

    tokenized = False

    def __init__(self, config=None, assets_dir=None, **kwargs: Any) -> None:
        kwargs.pop("tokenizer", None), kwargs.pop("tokenizer_dir", None)
        super().__init__(config, **kwargs)
        self._load_tower(assets_dir)
        longest = int(self.tower_info["max_len"])
        self.max_len = longest if not self.section.max_len else int(self.section.max_len)
        if self.max_len > longest:
            raise TowerError(
                f"tower {self.tower_ref}: features.text.max_len={self.max_len} exceeds the "
                f"tower's {longest} tokens"
            )
        self.tokenizer = self.processor

    def max_output_shape(self) -> tuple[int]:
        return (self.max_len,)

    def _shape_fields(self) -> dict[str, Any]:
        return {"max_len": self.max_len, "max_tokens": self.max_len}

    def model_args(self) -> dict[str, Any]:
        tok = self.processor

        def tid(*names: str) -> int:
            for n in names:
                v = getattr(tok, f"{n}_token_id", None)
                if v is not None:
                    return int(v)
            return 0

        return {
            "vocab_size": int(self.tower_info["vocab_size"]),
            "max_text_len": self.max_len,
            "pad_id": tid("pad"),
            "bos_id": tid("cls", "bos"),
            "eos_id": tid("sep", "eos"),
            "mask_id": tid("mask", "unk"),
        }

    def tokenize(self, clean_text: str) -> np.ndarray:
        ids = self.processor(clean_text, truncation=True, max_length=self.max_len)["input_ids"]
        return np.asarray(ids, dtype=np.int32)

    def detokenize(self, ids: np.ndarray | list[int]) -> str:
        return self.processor.decode([int(i) for i in ids], skip_special_tokens=True)


def _pixels(processor: Any, images: list[Any]) -> np.ndarray:
    """The processor's resize/crop (no rescale/normalize) -> uint8 (N, H, W, 3)."""
    out = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")[
        "pixel_values"
    ]  # (N, 3, H, W) float in 0..255
    return np.clip(np.rint(np.asarray(out)), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


class TowerImageFeaturizer(_TowerMixin, ImageFeaturizer):
    """Images -> uint8 (H, W, 3) at the tower's resolution, by its image processor."""

    @dataclass
    class Config(ImageFeaturizer.Config):
        """``features.image`` with a tower (``size`` follows the tower's processor)."""

        tower: str = ""
        cache: bool = False

    def __init__(self, config=None, assets_dir=None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._load_tower(assets_dir)
        self.section.size = int(self.tower_info["size"])

    def _shape_fields(self) -> dict[str, Any]:
        return {"size": self.section.size, "max_tokens": int(self.tower_info.get("tokens", 0))}

    def from_bytes(self, data: bytes, suffix: str | None = None) -> np.ndarray:
        # Decoded once, with the image featurizer's limits; the processor resizes.
        return _pixels(self.processor, [self.decode_image(data)])[0]

    def from_array(self, array: np.ndarray, **_: Any) -> np.ndarray:
        from PIL import Image

        a = np.asarray(array)
        if a.ndim != 3 or a.shape[-1] != 3 or a.dtype != np.uint8:
            raise SampleError("bad_shape", f"image array must be uint8 (H, W, 3), got {a.shape}")
        return _pixels(self.processor, [Image.fromarray(a)])[0]


class TowerVideoFeaturizer(_TowerMixin, VideoFeaturizer):
    """Video -> uint8 (F, H, W, 3): the image tower's processor on every sampled frame."""

    @dataclass
    class Config(VideoFeaturizer.Config):
        """``features.video`` with an image tower (``size`` follows its processor)."""

        tower: str = ""
        cache: bool = False

    def __init__(self, config=None, assets_dir=None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._load_tower(assets_dir)
        self.section.size = int(self.tower_info["size"])

    def _shape_fields(self) -> dict[str, Any]:
        return {
            "size": self.section.size,
            "num_frames": self.section.num_frames,
            "max_tokens": int(self.tower_info.get("tokens", 0)),
        }

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        from PIL import Image

        return _pixels(self.processor, [Image.fromarray(np.ascontiguousarray(f)) for f in frames])


class TowerAudioFeaturizer(_TowerMixin, AudioFeaturizer):
    """Audio -> float16 (T, F) by the tower's feature extractor (F = 1: waveform)."""

    @dataclass
    class Config(AudioFeaturizer.Config):
        """``features.audio`` with a tower: ``clip_seconds`` of audio the tower sees
        (longer clips are centre-cropped); ``sample_rate`` follows the tower."""

        tower: str = ""
        cache: bool = False
        clip_seconds: float = 4.0

    def __init__(self, config=None, assets_dir=None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._load_tower(assets_dir)
        self.section.sample_rate = int(self.tower_info["sample_rate"])
        self.input_name = str(self.tower_info["input_name"])
        n = int(round(self.section.clip_seconds * self.section.sample_rate))
        if self.input_name == "input_values":
            self._max = (n, 1)
        else:
            probe = self._extract(np.zeros(n, np.float32))
            self._max = tuple(int(s) for s in probe.shape)

    def output_shape(self) -> tuple[int | None, int]:
        return (None, self._max[1])

    def max_output_shape(self) -> tuple[int, int]:
        return self._max

    def _shape_fields(self) -> dict[str, Any]:
        return {
            "max_len": self._max[0],
            "feature_size": self._max[1],
            "input_name": self.input_name,
        }

    def _extract(self, mono: np.ndarray) -> np.ndarray:
        sr = self.section.sample_rate
        out = self.processor(mono, sampling_rate=sr, return_tensors="np")[self.input_name][0]
        out = np.asarray(out, np.float32)
        return out[:, None] if out.ndim == 1 else out.T  # (T, 1) | (F, T) -> (T, F)

    def _window(self, n_in: int, sr: int) -> tuple[int, int, int]:
        """The centre ``clip_seconds`` of the input (+ a margin for the resampling filter):
        only those samples are read and resampled, whatever the clip's length."""
        need = ceil(self.section.clip_seconds * sr) + 2 * (64 + ceil(10 * max(
            sr / self.section.sample_rate, 1.0)))  # fmt: skip
        if n_in <= need:
            return 0, n_in, 0
        start = (n_in - need) // 2
        return start, start + need, 0

    def _features(self, x: np.ndarray, sr: int, skip: int = 0) -> np.ndarray:
        check_finite(x, "audio")
        mono = resample(x.mean(axis=1), sr, self.section.sample_rate)
        n = int(round(self.section.clip_seconds * self.section.sample_rate))
        if len(mono) > n:
            start = (len(mono) - n) // 2
            mono = mono[start : start + n]
        if len(mono) < 16:
            raise SampleError("empty", f"{len(mono)} samples")
        return self._extract(mono.astype(np.float32)).astype(np.float16)


#: modality -> the featurizer used when ``features.<m>.tower`` is set.
TOWER_FEATURIZERS = {
    "text": TowerTextFeaturizer,
    "image": TowerImageFeaturizer,
    "video": TowerVideoFeaturizer,
    "audio": TowerAudioFeaturizer,
}
