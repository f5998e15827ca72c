"""Prints every named size's parameter counts: ``python -m models.sizes [--json]``.

Active parameters per token = what one token of a modality touches: its encoder branch,
the trunk's attention/norms, ``top_k`` of the ``num_experts`` experts per layer, its
adapter and projection (fusion/decoder/heads excluded).
"""

from __future__ import annotations

import argparse
import json

import torch

from models.config import MODEL_SIZES, OmniConfig
from models.model import build_model


def size_report(name: str, **overrides) -> dict:
    """Parameter counts of size ``name`` (built on the meta device: no memory used)."""
    cfg = OmniConfig.from_name(name, **overrides)
    with torch.device("meta"):
        model = build_model(cfg)
    trunk_total = sum(p.numel() for p in model.trunk.parameters())
    return {
        "name": name,
        "d_model": cfg.d_model,
        "trunk_layers": cfg.trunk_layers,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "total_params": model.num_parameters(),
        "trunk_params": trunk_total,
        "trunk_active_params_per_token": model.active_parameters_per_token(),
        "active_params_per_token": {
            m: model.active_parameters_per_token(m) for m in model.modalities
        },
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)
    reports = [size_report(n) for n in MODEL_SIZES]
    if args.json:
        print(json.dumps(reports, indent=2))
        return
    print(
        f"{'size':<6} {'total':>12} {'trunk':>12} {'trunk active/tok':>17}  per-modality active/tok"
    )
    for r in reports:
        act = ", ".join(f"{m}={v / 1e6:.2f}M" for m, v in r["active_params_per_token"].items())
        print(
            f"{r['name']:<6} {r['total_params'] / 1e6:>11.2f}M {r['trunk_params'] / 1e6:>11.2f}M "
            f"{r['trunk_active_params_per_token'] / 1e6:>16.2f}M  {act}"
        )


if __name__ == "__main__":
    main()
