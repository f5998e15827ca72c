"""Training metrics: JSONL records (``runs/<name>/metrics.jsonl``) and loss-curve PNGs."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch

#: Dense bf16 tensor-core peaks (TFLOP/s, datasheet) by device-name substring, most specific
#: first: the MFU denominator.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("H800", 989.4),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (``torch.cuda.get_device_name``); None when
    unknown (then no MFU is reported)."""
    return next((v for k, v in PEAK_BF16_TFLOPS if k in device_name), None)


class JsonlWriter:
    """Appends one JSON object per line; flushes every write so a crash loses nothing."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(_plain(record)) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """All records of a JSONL file (missing file -> empty list)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def expert_load_fractions(expert_load: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """``{m: (L, E) token counts}`` -> ``{m: [E fractions]}`` summed over trunk layers."""
    out = {}
    for m, load in expert_load.items():
        tot = load.detach().float().sum(0)
        out[m] = (tot / tot.sum().clamp_min(1.0)).tolist()
    return out


def expert_load_by_layer(expert_load: dict[str, torch.Tensor]) -> dict[str, list[list[float]]]:
    """``{m: (L, E) token counts}`` -> ``{m: L rows of E fractions}`` (each layer sums to 1):
    the expert-load heatmap per modality and layer."""
    out = {}
    for m, load in expert_load.items():
        x = load.detach().float()
        if x.dim() == 1:
            x = x[None]
        out[m] = (x / x.sum(-1, keepdim=True).clamp_min(1.0)).tolist()
    return out


def mean_gates(
    gates: torch.Tensor | None, modalities: list[str], batch: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Mean fusion gate weight per modality over the rows that hold it.

    Args:
        gates: ``(B, M)`` gate weights in ``modalities`` order (or None).
        modalities: The fusion order (``out.fusion_modalities``).
        batch: The collated batch (for ``<m>_present``).
    """
    if gates is None:
        return {}
    out = {}
    g = gates.detach().float()
    if g.dim() == 3:  # (B, M, d) elementwise gates -> per-modality mean
        g = g.mean(-1)
    for i, m in enumerate(modalities):
        present = batch.get(f"{m}_present")
        if present is None:
            continue
        sel = g[present.to(g.device).bool(), i]
        if sel.numel():
            out[m] = float(sel.mean())
    return out


def plot_losses(records: list[dict[str, Any]], stage: str, path: str) -> str | None:
    """Saves the loss terms of ``stage`` as small multiples grouped by family (see
    :func:`jobs.training.plots.loss_small_multiples`)."""
    from jobs.training.plots import loss_small_multiples

    return loss_small_multiples(records, stage, path)


def _plain(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist() if x.numel() > 1 else float(x)
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
