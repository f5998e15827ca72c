"""The fusion/heads deployment: gated cross-modal fusion and the text decoder.

It receives *features* computed by the modality replicas (token features, masks, pooled and
embedded vectors; see :meth:`serve.replica.ModalityEncoder.embed`) and never sees raw input,
so it holds no encoder: ``/v1/fuse`` → :meth:`FusionHead.fuse`, ``/v1/describe`` →
:meth:`FusionHead.describe`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve

from serve.config import OmniServeArgs

logger = logging.getLogger("omniray.serve")

#: Non-encoder parts of the model the fusion replica loads.
FUSION_PARTS: list[str] = ["fusion", "decoder", "classifier"]


def features_from_numpy(feats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """Per-modality numpy features of ONE sample -> ``ModalityFeatures`` with B = 1.

    Args:
        feats: ``{m: {"tokens": (N, d), "mask": (N,), "pooled": (d,), "embed": (E,)}}``.

    Returns:
        ``{m: models.ModalityFeatures}`` with tensors (1, N, d), (1, N), (1, d), (1, E).
    """
    import torch

    from models.model import ModalityFeatures

    out = {}
    # np.array copies: arrays from the object store are read-only, torch wants writable.
    for m, f in feats.items():
        out[m] = ModalityFeatures(
            tokens=torch.from_numpy(np.array(f["tokens"], dtype=np.float32))[None],
            mask=torch.from_numpy(np.array(f["mask"], dtype=bool))[None],
            pooled=torch.from_numpy(np.array(f["pooled"], dtype=np.float32))[None],
            embed=torch.from_numpy(np.array(f["embed"], dtype=np.float32))[None],
        )
    return out


@serve.deployment(
    max_ongoing_requests=32,
    max_queued_requests=128,
    ray_actor_options={"num_cpus": 0.1},  # serve YAML sets real resources
)
class FusionHead:
    """Fuses features of several modalities and generates text from features.

    Args:
        args: :class:`~serve.config.OmniServeArgs` (as a dict) of the application.
    """

    def __init__(self, args: dict[str, Any]):
        import torch

        from pipelines.tokenizer import TOKENIZER_DIR, load_tokenizer
        from serve.runtime import load_for_serving

        self.args = OmniServeArgs.model_validate(args)
        torch.set_num_threads(self.args.torch_threads)
        self.model = load_for_serving(
            self.args.export_dir,
            modalities=[],
            quantization=self.args.quantization,
            parts=FUSION_PARTS,
        ).model
        self.tokenizer = load_tokenizer(Path(self.args.export_dir) / TOKENIZER_DIR)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusion")
        self.counters = {"fuse": 0, "describe": 0}
        # fuse_features returns gates (B, M) in config.modalities order.
        self.fusion_modalities = list(self.model.config.modalities)

    async def fuse(self, feats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        """Gated fusion of one sample's modalities.

        Returns:
            ``{"embedding": (E,) float32, "gates": {m: float}}`` (gates of absent
            modalities are left out).
        """
        self.counters["fuse"] += 1
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._fuse, feats)

    async def describe(
        self, feats: dict[str, dict[str, np.ndarray]], max_len: int, num_beams: int
    ) -> dict[str, Any]:
        """Text from one sample's features with the model's decoder.

        Returns:
            ``{"text": str, "token_ids": list[int]}``.
        """
        self.counters["describe"] += 1
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._describe, feats, max_len, num_beams
        )

    def stats(self) -> dict[str, Any]:
        return {"modality": None, "replica": f"fusion-{os.getpid()}", **self.counters}

    def _fuse(self, feats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
        import torch

        from serve.runtime import to_numpy

        mf = features_from_numpy(feats)
        with torch.inference_mode():
            fused, gates = self.model.fuse_features(mf)
        fused = to_numpy(fused)[0]  # (E,)
        gates = to_numpy(gates)[0]  # (M,) over the model's fusion modality order
        order = self._gate_order(list(mf))
        out_gates = {m: float(gates[i]) for i, m in enumerate(order) if m in mf}
        return {"embedding": fused, "gates": out_gates}

    def _gate_order(self, present: list[str]) -> list[str]:
        # The gate vector is over the model's fusion modality order when it exposes one.
        return self.fusion_modalities or present

    def _describe(
        self, feats: dict[str, dict[str, np.ndarray]], max_len: int, num_beams: int
    ) -> dict[str, Any]:
        import torch

        mf = features_from_numpy(feats)
        with torch.inference_mode():
            ids = self.model.generate_from_features(mf, max_len=max_len, num_beams=num_beams)
        ids0 = [int(t) for t in ids[0]]
        text = self.tokenizer.decode(ids0, skip_special_tokens=True)
        return {"text": text.strip(), "token_ids": ids0}
