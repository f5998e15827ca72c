"""Consolidating DeepSpeed checkpoints into the export directory of Contract 3.

``consolidate_checkpoint`` turns any ZeRO stage's checkpoint into a full fp32 state dict with
DeepSpeed's ``zero_to_fp32`` utilities (ZeRO-3: the partitioned fp32 master weights are
stitched together; ZeRO-1/2: the flat fp32 groups; stage 0: rank 0's module state), loads
it into a model rebuilt from ``model_config.yaml`` (strict: no key may be missing or left
over) and saves it with ``save_pretrained``. The export directory around those weights
(tokenizer, data config, zero-shot templates, metrics, training info) is written by
:func:`jobs.exports.write_export`, the one writer, and read by :func:`jobs.exports.load_export`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from jobs.training.checkpoint import DS_TAG


def consolidate_checkpoint(
    ckpt_dir: str | Path, model_config: str | Path, out_dir: str | Path
) -> Path:
    """DeepSpeed checkpoint dir (local) -> ``out_dir/model.safetensors`` + ``model_config.yaml``.

    Args:
        ckpt_dir: A checkpoint written by the training loop (holds ``ds/`` and ``latest``).
        model_config: The run's ``model_config.yaml`` (OmniConfig).
        out_dir: Destination; created if missing.

    Raises:
        FileNotFoundError: When ``ckpt_dir`` holds no DeepSpeed checkpoint.
        RuntimeError: When the consolidated weights do not match the model's parameters.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from models import OmniConfig, build_model

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / DS_TAG).is_dir():
        raise FileNotFoundError(f"{ckpt_dir} holds no DeepSpeed checkpoint (no '{DS_TAG}/')")
    expert_files = sorted((ckpt_dir / DS_TAG).glob("layer_*_expert_*_model_states.pt"))
    zero_files = list((ckpt_dir / DS_TAG).glob("*zero_pp_rank_*_optim_states.pt"))
    if expert_files:
        state = _rank0_state_dict(ckpt_dir / DS_TAG, expert_files)
    elif not zero_files:
        # ZeRO stage 0: no partitions; rank 0's module state is the whole fp32 model.
        state = _rank0_state_dict(ckpt_dir / DS_TAG, [])
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DS_TAG)
    cfg = OmniConfig.from_yaml(model_config)
    if expert_files and cfg.ep_size != 1:
        # The consolidated model holds every expert in one process (no expert parallelism).
        cfg = cfg.replace(ep_size=1)
    model = build_model(cfg)
    expected = model.state_dict()
    unknown_extra = [k for k in state if k not in expected]
    # Training lifts 0-dim parameters to (1,) (DeepSpeed cannot broadcast 0-dim tensors).
    state = {
        k: v.reshape(expected[k].shape)
        if k in expected and v.shape != expected[k].shape and v.numel() == expected[k].numel()
        else v
        for k, v in state.items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Keys absent from the checkpoint are acceptable only when they are tied aliases of
    # parameters that are present (same storage in the model).
    missing = [k for k in missing if not _shares_storage(model, k, state)]
    unexpected = sorted(set(unexpected) | set(unknown_extra))
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {ckpt_dir} does not match the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    return out


def _rank0_state_dict(tag_dir: Path, expert_files: list[Path]) -> dict[str, torch.Tensor]:
    """DeepSpeed-MoE (ZeRO-0/1/2; ZeRO-3 MoE is refused by config) or ZeRO-0 checkpoint ->
    state dict.

    ``zero_to_fp32`` does not understand the per-expert files, so the dense weights come from
    rank 0's module state (complete under ZeRO-1/2) and each expert's from its own file
    (DeepSpeed stores them under global expert ids). These ``.pt`` files are our own
    training output, loaded on the trusted training side; exports stay safetensors.
    """
    main = torch.load(
        tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    state = {k: v.float() for k, v in main["module"].items()}
    for f in expert_files:
        state.update({k: v.float() for k, v in torch.load(f, map_location="cpu").items()})
    return state


def _shares_storage(model: torch.nn.Module, key: str, loaded: dict[str, Any]) -> bool:
    sd = model.state_dict(keep_vars=True)
    t = sd.get(key)
    if t is None:
        return False
    ptr = t.data_ptr()
    return any(k in loaded and v.data_ptr() == ptr for k, v in sd.items() if k != key)
