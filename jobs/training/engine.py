"""Worker-side set-up: model building, layer freezing, DeepSpeed config, distributed helpers."""

from __future__ import annotations

import copy
import os
import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from common.config import read_yaml
from jobs.training.config import StageSection, TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def deepspeed_config(tc: TrainConfig, st: StageSection, *, use_gpu: bool) -> dict[str, Any]:
    """Base YAML of ``configs/deepspeed/`` + the stage's batch, accumulation, clip and optimizer.

    Args:
        tc: The training config (``deepspeed.config`` path, ZeRO stage, batch size).
        st: The stage (lr, weight decay, accumulation, clipping).
        use_gpu: bf16 on GPU; fp32 on CPU (DeepSpeed's CPU accelerator has no fused kernels).
    """
    path = tc.deepspeed.config.format(zero_stage=tc.deepspeed.zero_stage)
    base = copy.deepcopy(read_yaml(path if os.path.isabs(path) else os.path.abspath(path)))
    cfg = dict(base)
    cfg["train_micro_batch_size_per_gpu"] = tc.data.batch_size
    cfg["gradient_accumulation_steps"] = st.grad_accum
    cfg["gradient_clipping"] = float(st.grad_clip)
    cfg.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accum x world
    zero = dict(cfg.get("zero_optimization", {}))
    zero["stage"] = tc.deepspeed.zero_stage
    cfg["zero_optimization"] = zero
    opt = dict(cfg.get("optimizer", {"type": "AdamW", "params": {}}))
    params = dict(opt.get("params", {}))
    params["lr"] = float(st.lr)
    params["weight_decay"] = float(st.weight_decay)
    if not use_gpu:
        params["torch_adam"] = True  # DeepSpeed's FusedAdam/CPUAdam need compiled ops
    opt["params"] = params
    cfg["optimizer"] = opt
    if use_gpu:
        bf16 = dict(cfg.get("bf16") or {})
        bf16["enabled"] = True
        # bf16 has fp32's exponent range: no loss scaling, so no overflow to skip steps for.
        # DeepSpeed's check would test every gradient tensor with a host sync each (800+
        # per step for `base`); the loop itself fails on a non-finite loss at log steps.
        bf16.setdefault("check_grad_overflow", False)
        cfg["bf16"] = bf16
    else:
        cfg.pop("bf16", None)
        cfg.pop("fp16", None)
    if tc.deepspeed.zero_stage == 3:
        # Consolidation at export reads the fp32 partitions (zero_to_fp32), not a 16-bit gather.
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", False)
    return cfg


def apply_freeze(model: torch.nn.Module, st: StageSection) -> dict[str, int]:
    """Sets ``requires_grad`` per the stage's freeze policy.

    ``encoders``: modality encoders (and their tokenizers) frozen. ``top_k``: encoders and all
    but the top ``train_top_k`` trunk layers frozen; adapters, fusion and heads always train.

    Returns:
        ``{"trainable": n, "frozen": n}`` parameter counts.
    """
    for p in model.parameters():
        p.requires_grad_(True)
    if st.freeze in ("encoders", "top_k"):
        encoders = getattr(model, "encoders", None)
        if encoders is None:
            raise AttributeError("model has no `encoders` module to freeze")
        for p in encoders.parameters():
            p.requires_grad_(False)
    if st.freeze == "top_k":
        trunk = getattr(model, "trunk", None)
        layers = getattr(trunk, "layers", None) if trunk is not None else None
        if layers is None:
            raise AttributeError("model.trunk has no `layers` to freeze")
        keep = max(0, min(st.train_top_k, len(layers)))
        for i, layer in enumerate(layers):
            if i < len(layers) - keep:
                for p in layer.parameters():
                    p.requires_grad_(False)
    encoders = getattr(model, "encoders", None) or {}
    for m, enc in encoders.items():
        if not hasattr(enc, "set_tower_training"):
            continue
        if st.freeze == "none":
            enc.set_tower_training(st.towers.get(m, enc.section.train))
        elif st.freeze == "connectors":
            enc.set_tower_training("frozen")  # the connector trains, the tower does not
        else:  # encoders / top_k: the whole branch frozen
            for p in enc.parameters():
                p.requires_grad_(False)
    if st.freeze == "connectors":
        for p in model.parameters():
            p.requires_grad_(False)
        for enc in encoders.values():
            for p in getattr(enc, "connector_parameters", list)():
                p.requires_grad_(True)
        for attr in st.also_train:
            part = getattr(model, attr, None)
            if part is None:
                raise AttributeError(f"also_train: the model has no part {attr!r}")
            for p in [part] if isinstance(part, torch.nn.Parameter) else part.parameters():
                p.requires_grad_(True)
    return param_counts(model)


def param_counts(model: torch.nn.Module) -> dict[str, int]:
    """``{"trainable": n, "frozen": n}`` parameter counts."""
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return {
        "trainable": n_train,
        "frozen": n_all - n_train,
        "trainable_fraction": n_train / max(n_all, 1),
    }


def lift_scalar_params(model: torch.nn.Module) -> list[str]:
    """Turns every 0-dim parameter (e.g. the learnable temperature) into shape ``(1,)``.

    DeepSpeed's initial parameter broadcast views each parameter as bytes, which fails on
    0-dim tensors ("self.dim() cannot be 0 to view Float as Byte"). ``(1,)`` broadcasts the
    same way in every use; :func:`jobs.training.export.consolidate_checkpoint` reshapes the
    values back to the model's own shapes.

    Returns:
        Names of the lifted parameters.
    """
    lifted = []
    for name, p in list(model.named_parameters()):
        if p.dim() == 0:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            setattr(
                owner, leaf, torch.nn.Parameter(p.data.reshape(1), requires_grad=p.requires_grad)
            )
            lifted.append(name)
    return lifted


def skip_single_rank_allreduce(engine: Any, zero_stage: int) -> bool:
    """ZeRO-0 with one data-parallel rank: turns off DeepSpeed's gradient all-reduce.

    Over one rank the all-reduce is a no-op, yet DeepSpeed still flattens every gradient
    into a bucket, reduces it and copies it back each step (about 4% of a ``small`` step on
    CPU). ZeRO-1/2/3 reduce inside their optimizers and are left alone.

    Returns:
        Whether the all-reduce was turned off.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if zero_stage != 0 or world != 1:
        return False
    engine.enable_backward_allreduce = False
    return True


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gathers ``x`` (B, E) from every rank into (world*B, E), keeping gradients.

    As OpenCLIP's ``gather_features(gather_with_grad=True)``: the autograd-aware all_gather of
    ``torch.distributed.nn`` sends each rank's gradient of the gathered copy back to its owner,
    so the "local loss" (local queries vs all keys) trains every rank's encoder correctly.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Averages scalar metrics over ranks (one small all-reduce)."""
    if not values or not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


# -- model set-up moved out of models/ (process-wide compiler flags, DeepSpeed MoE) ------
def build_stage_model(
    model_config: dict[str, Any], init_from: str | None = None
) -> torch.nn.Module:
    """The worker's model from the driver's RESOLVED ``OmniConfig`` dict (the
    ``model_config.yaml`` of the run), optionally with an earlier stage's weights.

    Args:
        model_config: ``OmniConfig.to_dict()`` as resolved on the driver.
        init_from: Dir with ``model.safetensors`` of the previous stage (strictly loaded).
    """
    from models import OmniConfig, build_model

    model = build_model(OmniConfig.from_dict(model_config))
    if init_from:
        from safetensors.torch import load_file

        state = load_file(os.path.join(init_from, "model.safetensors"))
        model.load_state_dict(state, strict=True)
    return model


def compile_model(model: Any, **compile_kwargs: Any) -> Any:
    """``model.compile_blocks(**compile_kwargs)`` with the process-wide compiler settings
    training needs.

    Returns:
        ``model``.
    """
    import torch._dynamo
    import torch._functorch.config
    import torch._inductor.config

    # One graph per modality sequence length (and per dtype) for each compiled function.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    # Compile against this process's own parameters, not kernels cached on disk by an
    # earlier process: DeepSpeed packs bf16 parameters into flat buffers whose per-tensor
    # offsets change with the set of trainable parameters (one stage to the next), and
    # a cached kernel that assumed a 16-byte-aligned parameter faults on a 2-byte offset.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    return model.compile_blocks(**compile_kwargs)


def moe_parameter_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DeepSpeed (ZeRO) wants the expert parameters of ``moe_impl=deepspeed`` layers in
    groups of their own (expert-data-parallel reduction)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer(groups)


def setup_expert_parallel(model: torch.nn.Module) -> None:
    """Creates DeepSpeed's expert-parallel groups for ``moe_impl=deepspeed`` layers
    (``deepspeed.initialize`` does this itself; call it when running without the engine,
    after ``deepspeed.init_distributed``)."""
    from models.moe import DeepSpeedMoEFFN

    for module in model.modules():
        if isinstance(module, DeepSpeedMoEFFN):
            module.moe.set_deepspeed_parallelism()
