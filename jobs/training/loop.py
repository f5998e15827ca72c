"""The per-worker training loop run by Ray Train's ``TorchTrainer`` (one DeepSpeed rank each).

Everything arrives through ``train_loop_config`` (no globals): the resolved ``TrainConfig``
as a dict, the stage name, the model's constructor arguments, label names, the previous
stage's weights and the run paths.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from typing import Any

import ray.train
import torch

from common.config import from_dict
from jobs.training.checkpoint import (
    DS_TAG,
    TrainState,
    checkpoint_dir_name,
    find_resumable,
    read_rank_state,
    write_rank_state,
)
from jobs.training.config import TrainConfig
from jobs.training.data import RankBatches
from jobs.training.engine import (
    all_reduce_mean,
    apply_freeze,
    build_stage_model,
    compile_model,
    lift_scalar_params,
    param_counts,
    seed_everything,
    skip_single_rank_allreduce,
)
from jobs.training.metrics import (
    JsonlWriter,
    expert_load_by_layer,
    expert_load_fractions,
    mean_gates,
    peak_bf16_tflops,
)
from jobs.training.schedule import build_scheduler
from jobs.training.stage import StageObjective, to_device


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Trains one stage on this rank; reports metrics and DeepSpeed checkpoints to Ray Train.

    Args:
        config: ``train_config`` (TrainConfig as dict), ``stage``, ``model_config``,
            ``label_names``, ``modalities``, ``pairs``, ``class_weights`` (list or None),
            ``ds_config`` (DeepSpeed dict),
            ``init_from`` (dir with ``model.safetensors`` or None), ``run_dir``,
            ``experiment_path`` (Ray Train run dir of this stage).
    """
    import deepspeed

    tc = from_dict(TrainConfig, config["train_config"])
    stage: str = config["stage"]
    st = tc.stage(stage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = tc.scaling.use_gpu and torch.cuda.is_available()
    if use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # One intra-op thread per reserved CPU (at least 1): oversubscribed cores crawl.
        torch.set_num_threads(max(1, round(tc.scaling.cpus_per_worker)))
    seed_everything(tc.seed + rank)

    model = build_stage_model(config["model_config"], init_from=config.get("init_from"))
    model.trunk.activation_checkpointing = tc.activation_checkpointing
    model.trunk.varlen_attention = tc.varlen_attention
    if tc.compile:
        compile_model(model)
    objective = StageObjective(
        stage,
        st,
        modalities=config["modalities"],
        label_names=config["label_names"],
        pairs=config["pairs"],
        seed=tc.seed,
        class_weights=config.get("class_weights"),
    )
    # Model FLOPs per token (the MFU convention: 6 x active params, forward + backward).
    flops_per_token = {m: 6.0 * model.active_parameters_per_token(m) for m in model.modalities}
    peak_tflops = peak_bf16_tflops(torch.cuda.get_device_name(device)) if use_gpu else None
    apply_freeze(model, st)
    unused = objective.freeze_unused(model)
    counts = {**param_counts(model), "unused_by_stage": unused}
    if rank == 0:  # what this stage trains (the connector-only recipe aims at <= 5 %)
        print(
            f"[{stage}] trainable parameters: {counts['trainable']:,} of "
            f"{counts['trainable'] + counts['frozen']:,} "
            f"({100 * counts['trainable_fraction']:.2f} %, freeze={st.freeze})",
            flush=True,
        )
    lift_scalar_params(model)
    model_params = [p for p in model.parameters() if p.requires_grad]
    if tc.deepspeed.zero_stage == 3:
        _mark_z3_leaves(model)

    # Resolved on the driver (paths are relative to the job's CWD, not the worker's).
    ds_cfg = config["ds_config"]
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=_param_groups(model, model_params, tc),
        config=ds_cfg,
        lr_scheduler=lambda opt: build_scheduler(
            opt, warmup_steps=st.warmup_steps, total_steps=st.steps, min_lr_ratio=st.min_lr_ratio
        ),
        dist_init_required=False,
    )
    if tc.deepspeed.zero_stage == 3:
        _gather_z3_persistent(engine.module)
    skip_single_rank_allreduce(engine, tc.deepspeed.zero_stage)

    # -- resume: Ray's latest checkpoint if complete, else the newest complete one (#41700).
    state = TrainState(world_size=world, stage=stage)
    offered = ray.train.get_checkpoint()
    found = find_resumable(config["experiment_path"], offered.path if offered else None)
    resumed_from = None
    if found is not None:
        path, fs = found
        with ray.train.Checkpoint(path=path, filesystem=fs).as_directory() as d:
            load_path, _ = engine.load_checkpoint(
                d, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
            state = read_rank_state(d, rank)
        state.world_size = world
        resumed_from = state.step

    writer = JsonlWriter(os.path.join(config["run_dir"], "metrics.jsonl")) if rank == 0 else None
    if writer:
        writer.write(
            {
                "event": "start",
                "stage": stage,
                "start_step": state.step,
                "resumed_from": resumed_from,
                "world_size": world,
                "time": time.time(),
                "zero_stage": tc.deepspeed.zero_stage,
                **counts,
            }
        )

    batches = RankBatches(
        ray.train.get_dataset_shard("train"),
        modalities=config["modalities"],
        batch_size=tc.data.batch_size,
        cache=tc.data.cache,
        shuffle=tc.data.shuffle,
        seed=tc.seed,
        rank=rank,
        sampling=st.sampling if stage == "finetune" else "uniform",
    )
    fault = tc.fault_injection
    marker = os.path.join(config["run_dir"], fault.marker)
    label_names = config["label_names"]
    engine.train()

    # Loss terms, tokens and FLOPs add up on the device and are read once per log step:
    # a per-step .item() would stall the GPU behind the host every step.
    acc: dict[str, torch.Tensor] = {}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    n_acc, samples, tokens, flops = 0, 0, zero, zero
    t_last = time.perf_counter()
    while state.step < st.steps:
        got_any = False
        for samples_list in batches.epoch(state.epoch, skip=state.batch):
            got_any = True
            batch = to_device(objective.collate(samples_list, label_names), device)
            out_terms, out = objective(engine, batch, step=state.step, rank=rank)
            loss = out_terms["loss"]
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            step_lr = scheduler.get_last_lr()[0] if scheduler is not None else None
            engine.step()
            state.batch += 1
            for k, v in out_terms.items():
                v = v.detach().to(torch.float64)
                acc[k] = acc[k] + v if k in acc else v
            n_acc += 1
            samples += len(samples_list)
            for m, n in objective.token_counts(out).items():
                tokens = tokens + n
                flops = flops + n * flops_per_token.get(m, 0.0)
            if not boundary:
                continue
            state.step += 1

            if (
                fault.at_step is not None
                and stage == fault.stage
                and rank == fault.rank
                and state.step == fault.at_step
                and not os.path.exists(marker)
            ):
                open(marker, "w").close()  # fires once: the restarted group finds the marker
                raise RuntimeError(f"fault injection: rank {rank} fails at step {state.step}")

            last = state.step >= st.steps
            if state.step % tc.log_every == 0 or last or state.step % st.checkpoint_every == 0:
                dt = max(time.perf_counter() - t_last, 1e-9)
                keys = sorted(acc)
                sums = torch.stack([acc[k] for k in keys] + [tokens, flops]).tolist()
                metrics = {k: s / max(n_acc, 1) for k, s in zip(keys, sums[:-2], strict=True)}
                check_finite_loss(metrics, stage, state.step, n_acc)
                metrics["samples_per_s"] = samples / dt
                metrics["tokens_per_s"] = sums[-2] / dt
                metrics["model_tflops_per_s"] = sums[-1] / dt / 1e12
                metrics = all_reduce_mean(metrics, device)
                # Throughput is per rank after the mean; the job's is world x that.
                for k in ("samples_per_s", "tokens_per_s", "model_tflops_per_s"):
                    metrics[k] *= world
                # MFU is per device: the mean rank's achieved FLOP/s over one device's peak.
                mfu = metrics["model_tflops_per_s"] / world / peak_tflops if peak_tflops else None
                record = {
                    "stage": stage,
                    "step": state.step,
                    "epoch": state.epoch,
                    "lr": step_lr,  # the LR this step's update used
                    **{
                        ("loss" if k == "loss" else f"loss/{k}"): v
                        for k, v in metrics.items()
                        if k not in ("samples_per_s", "tokens_per_s", "model_tflops_per_s")
                    },
                    "samples_per_s": metrics["samples_per_s"],
                    "tokens_per_s": metrics["tokens_per_s"],
                    "model_tflops_per_s": metrics["model_tflops_per_s"],
                    "mfu": mfu,
                    "grad_norm": _grad_norm(engine),
                    "expert_load": expert_load_fractions(getattr(out, "expert_load", {}) or {}),
                    "expert_load_layers": expert_load_by_layer(
                        getattr(out, "expert_load", {}) or {}
                    ),
                    "gates": mean_gates(
                        getattr(out, "gates", None),
                        list(getattr(out, "fusion_modalities", []) or []),
                        batch,
                    ),
                    "time": time.time(),
                }
                if writer:
                    writer.write(record)
                acc, n_acc, samples, tokens, flops = {}, 0, 0, zero, zero
                t_last = time.perf_counter()
                scalar = {k: v for k, v in record.items() if isinstance(v, int | float)}
                if state.step % st.checkpoint_every == 0 or last:
                    _save_and_report(engine, state, rank, scalar)
                else:
                    ray.train.report(scalar)
            if state.step >= st.steps:
                break
        # A resume exactly at an epoch's end skips every batch of it: that is no error.
        if not got_any and state.batch == 0:
            raise RuntimeError(
                f"rank {rank}: epoch {state.epoch} yielded no batch of {tc.data.batch_size} "
                "rows; lower data.batch_size or use fewer workers"
            )
        if state.step < st.steps:
            state.epoch += 1
            state.batch = 0
    _probe(engine, objective, batches, label_names, device, rank, config["run_dir"], stage)
    if writer:
        writer.write({"event": "end", "stage": stage, "step": state.step, "time": time.time()})


def _probe(
    engine: Any,
    objective: StageObjective,
    batches: RankBatches,
    label_names: list[str],
    device: torch.device,
    rank: int,
    run_dir: str,
    stage: str,
) -> None:
    """Embeds a fixed probe batch with the trained engine (all ranks: ZeRO-3 gathers params in
    forward); rank 0 saves ``{run_dir}/{stage}/probe.safetensors`` + ``probe_ids.json`` so an
    export can be checked against the model as it was at the end of training."""
    import json

    from safetensors.torch import save_file

    samples_list = next(iter(batches.epoch(0)))
    batch = to_device(objective.collate(samples_list, label_names), device)
    active = objective.sync_modalities(batch)
    engine.eval()
    with torch.no_grad():
        out = engine(batch, modalities=active)
    engine.train()
    if rank == 0:
        out_dir = os.path.join(run_dir, stage)
        os.makedirs(out_dir, exist_ok=True)
        tensors = {f"embed/{m}": e.float().cpu().contiguous() for m, e in out.embeds.items()}
        if out.fused is not None:
            tensors["fused"] = out.fused.float().cpu().contiguous()
        save_file(tensors, os.path.join(out_dir, "probe.safetensors"))
        with open(os.path.join(out_dir, "probe_ids.json"), "w") as f:
            json.dump({"ids": [s["id"] for s in samples_list], "modalities": active}, f)


def _save_and_report(engine: Any, state: TrainState, rank: int, metrics: dict[str, Any]) -> None:
    """Every rank saves its DeepSpeed shard + state, then reports it (Ray merges the dirs)."""
    tmp = tempfile.mkdtemp(prefix="omni_ckpt_")
    try:
        engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": state.step})
        write_rank_state(tmp, rank, state)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.step),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_finite_loss(metrics: dict[str, float], stage: str, step: int, n_steps: int) -> None:
    """Fails the run on a non-finite mean loss (checked at log steps, where the sums are
    read anyway): with bf16 there is no loss scaler to skip such steps, and continuing
    would only write NaN weights into the next checkpoint.

    Raises:
        FloatingPointError: Naming the stage, the step window and what to change.
    """
    loss = metrics.get("loss", 0.0)
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{stage}: the loss became non-finite ({loss}) in the {n_steps} micro-steps "
            f"before step {step}; lower the learning rate or lengthen the warm-up and re-run "
            "(the run resumes from the last checkpoint, written before this happened)"
        )


def _grad_norm(engine: Any) -> float | None:
    try:
        g = engine.get_global_grad_norm()
    except Exception:  # noqa: BLE001 - not every ZeRO stage exposes it on every step
        return None
    return float(g) if g is not None else None


def _param_groups(
    model: torch.nn.Module, params: list[torch.nn.Parameter], tc: TrainConfig
) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
    """DeepSpeed MoE needs expert params in their own groups (expert-data-parallel reduce)."""
    if tc.deepspeed.moe_impl != "deepspeed":
        return params
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    return split_params_into_different_moe_groups_for_optimizer({"params": params, "name": "dense"})


def _gather_z3_persistent(model: torch.nn.Module) -> None:
    """Makes ZeRO-3 *persistent* parameters available once, for good.

    ZeRO-3 fetches a module's own parameters in that module's forward hook; the encoders run
    through ``encode()`` rather than ``forward``, so their direct parameters (positions,
    modality and mask embeddings) would never be fetched and backward would see empty
    tensors. ``configs/deepspeed/zero3.yaml`` sets ``stage3_param_persistence_threshold``
    above the size of such parameters (persistent = never released after a gather), and
    this gathers them once right after ``deepspeed.initialize``.
    """
    for p in model.parameters():
        status = getattr(p, "ds_status", None)
        if getattr(p, "ds_persist", False) and status is not None and status.name != "AVAILABLE":
            p.all_gather()


def _mark_z3_leaves(model: torch.nn.Module) -> None:
    """Marks MoE blocks as ZeRO-3 leaf modules: their expert params are gathered once per call
    instead of per expert, so data-dependent expert skipping cannot desynchronize ranks."""
    from deepspeed.utils import set_z3_leaf_modules

    moe_types = {
        type(m) for m in model.modules() if type(m).__name__ in ("NativeMoE", "MoE", "SparseMoE")
    }
    if moe_types:
        set_z3_leaf_modules(model, list(moe_types))
