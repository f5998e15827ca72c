"""Learning-rate schedule: linear warm-up then cosine decay (a pure function of the step)."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based, before the update).

    Args:
        step: Number of optimizer steps already taken.
        warmup_steps: Steps of linear warm-up from ``1/warmup`` to 1.
        total_steps: Total optimizer steps of the stage.
        min_lr_ratio: Floor of the cosine decay as a fraction of the peak.

    Returns:
        The LR factor in ``[min_lr_ratio, 1]`` (warm-up may start below the floor).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_lr_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` (its state_dict is its step count, so DeepSpeed checkpoints restore it)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup_steps=warmup_steps, total_steps=total_steps, min_lr_ratio=min_lr_ratio
        ),
    )
