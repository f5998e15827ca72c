"""Overhead of the Ray Train + DeepSpeed loop vs a plain PyTorch loop, and 2-vs-1 worker scaling.

    .venv/bin/python benchmarks/train_overhead.py [--steps 60] [--batch 8] [--model tiny]

Same model, batch size, data (synthetic shards, rows cached in memory) and objective
(``pretrain``: masked modelling + MoE aux) in all three runs:

1. plain: one process, ``torch.optim.AdamW``, no Ray, no DeepSpeed;
2. deepspeed: the same process with a DeepSpeed engine (world size 1, gloo, the job's
   DeepSpeed config) and no Ray: separates DeepSpeed's own cost from Ray Train's;
3. ray1: ``jobs.training`` with 1 worker (ZeRO-2, gloo, torch AdamW);
4. ray2: the same with 2 workers (same per-worker batch: 2x the samples per step).

steps/s are measured after ``--warmup`` steps (from the loop's metrics timestamps). Target:
ray1/plain >= 0.9. Prints a table and writes ``benchmarks/results/train_overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def plain_loop(
    shards: str, args: argparse.Namespace, stats: dict | None = None, *, deepspeed: bool = False
) -> float:
    """steps/s of a single-process loop over the same rows, model and objective.

    With ``deepspeed=True`` the optimizer step goes through a DeepSpeed engine built from the
    job's DeepSpeed config (world size 1, gloo), still without Ray.

    ``stats`` (optional) receives tokens/s, samples/s and approximate model FLOPs per step
    (``6 * active params per token * tokens``, per modality; attention scores and heads
    excluded), used for the GPU MFU figure.
    """
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from jobs.training.data import RankBatches, inspect_shards
    from jobs.training.objectives import StageObjective, build_model_from_kwargs
    from jobs.training.runner import model_kwargs_from_data

    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    tc = _config(shards, "unused", 1, args)
    info = inspect_shards(shards)
    kw = model_kwargs_from_data(tc, shards, info, info.modalities)
    model = build_model_from_kwargs({"size": tc.model, **kw}).to(device)
    active = {m: model.active_parameters_per_token(m) for m in info.modalities}
    flops, tokens, n_samples = 0.0, 0, 0
    opt = torch.optim.AdamW(model.parameters(), lr=tc.pretrain.lr, betas=(0.9, 0.98))
    engine = None
    if deepspeed:
        import deepspeed as ds

        from jobs.training.engine import deepspeed_config, lift_scalar_params

        if not dist.is_initialized():
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0")
            os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
            dist.init_process_group("gloo")
        lift_scalar_params(model)
        engine, *_ = ds.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=deepspeed_config(tc, tc.pretrain, use_gpu=device.type == "cuda"),
            dist_init_required=False,
        )
    obj = StageObjective(
        "pretrain", tc.pretrain, modalities=info.modalities, label_names=info.label_names
    )

    class _Iter:
        def iter_batches(self, **kw):
            yield pq.read_table(os.path.join(shards, "train"))

    batches = RankBatches(
        _Iter(),
        modalities=info.modalities,
        batch_size=args.batch,
        cache=True,
        shuffle=True,
        seed=0,
        rank=0,
    )
    step, epoch, t0 = 0, 0, None
    while step < args.steps:
        for samples in batches.epoch(epoch):
            batch = obj.collate(samples, info.label_names)
            if device.type != "cpu":
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            if engine is not None:
                terms, out = obj(engine, batch, step=step)
                engine.backward(terms["loss"])
                engine.step()
            else:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    terms, out = obj(model, batch, step=step)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.pretrain.grad_clip)
                opt.step()
            step += 1
            if t0 is not None:
                n_tok = {m: int(f.mask.sum()) for m, f in out.features.items()}
                tokens += sum(n_tok.values())
                flops += sum(6.0 * active[m] * n for m, n in n_tok.items())
                n_samples += len(samples)
            if step == args.warmup:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if step >= args.steps:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if engine is not None:
        dist.destroy_process_group()
    if stats is not None:
        stats.update(
            samples_per_s=n_samples / dt,
            tokens_per_s=tokens / dt,
            model_flops_per_s=flops / dt,
            active_params_per_token={m: int(v) for m, v in active.items()},
            params=sum(p.numel() for p in model.parameters()),
        )
    return (args.steps - args.warmup) / dt


def _config(shards: str, runs: str, workers: int, args: argparse.Namespace):
    from jobs.training.config import load_train_config

    return load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={shards}",
            f"runs_dir={runs}",
            f"name=bench{workers}",
            f"model={args.model}",
            f"data.batch_size={args.batch}",
            f"scaling.num_workers={workers}",
            f"scaling.cpus_per_worker={1.0 if workers == 1 else 0.5}",
            f"pretrain.steps={args.steps}",
            f"pretrain.checkpoint_every={10 * args.steps}",
            f"log_every={args.warmup}",
            "pretrain.warmup_steps=2",
            "export_at_end=false",
        ],
    )


def ray_loop(shards: str, runs: str, workers: int, args: argparse.Namespace) -> float:
    """steps/s of the Ray Train + DeepSpeed loop, from the metrics timestamps."""
    from jobs.training.metrics import read_jsonl
    from jobs.training.runner import run_training

    tc = _config(shards, runs, workers, args)
    res = run_training(tc, ["pretrain"])
    rows = [
        r
        for r in read_jsonl(os.path.join(res["run_dir"], "metrics.jsonl"))
        if r.get("stage") == "pretrain" and "loss" in r
    ]
    first = next(r for r in rows if r["step"] == args.warmup)
    last = rows[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--model", default="tiny")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/...)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument(
        "--plain-only",
        action="store_true",
        help="only the single-process loop (e.g. a GPU box without Ray/DeepSpeed): "
        "samples/s, tokens/s and MFU",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100 SXM: 989)"
    )
    args = p.parse_args()
    if args.steps % args.warmup:
        raise SystemExit("--steps must be a multiple of --warmup (metrics are logged every warmup)")
    from jobs.training.synthetic import write_synthetic_shards

    work = tempfile.mkdtemp(prefix="bench_train_")
    shards = write_synthetic_shards(os.path.join(work, "shards"), n=max(256, 4 * args.batch))
    if args.plain_only:
        stats: dict = {}
        sps = plain_loop(shards, args, stats)
        shutil.rmtree(work, ignore_errors=True)
        import torch

        result = {
            "model": args.model,
            "batch": args.batch,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "bf16": args.bf16,
            "steps": args.steps,
            "warmup": args.warmup,
            "steps_per_s": sps,
            **stats,
            "mfu_approx": stats["model_flops_per_s"] / (args.peak_tflops * 1e12),
            "peak_tflops": args.peak_tflops,
        }
        print(json.dumps(result, indent=2))
        _write(
            args.out or str(ROOT / f"benchmarks/results/train_{args.model}_{args.device}.json"),
            result,
        )
        return 0
    plain = plain_loop(shards, args)
    ds_only = plain_loop(shards, args, deepspeed=True)
    import ray

    ray_tmp = tempfile.mkdtemp(prefix="ray_b_", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=ray_tmp,
        object_store_memory=500_000_000,
        log_to_driver=False,
    )
    try:
        ray1 = ray_loop(shards, os.path.join(work, "runs"), 1, args)
        ray2 = ray_loop(shards, os.path.join(work, "runs"), 2, args)
    finally:
        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "model": args.model,
        "batch_per_worker": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "device": "cpu",
        "plain_steps_per_s": plain,
        "deepspeed_no_ray_steps_per_s": ds_only,
        "deepspeed_no_ray_over_plain": ds_only / plain,
        "ray1_steps_per_s": ray1,
        "ray2_steps_per_s": ray2,
        "ray1_over_plain": ray1 / plain,
        "ray2_samples_per_s_over_ray1": (2 * ray2) / ray1,
        "target_ray1_over_plain": 0.9,
        "cpus": os.cpu_count(),
    }
    print(f"plain PyTorch      : {plain:7.2f} steps/s")
    print(f"DeepSpeed, no Ray  : {ds_only:7.2f} steps/s  ({ds_only / plain:.2f} of plain)")
    print(f"Ray+DeepSpeed x1   : {ray1:7.2f} steps/s  ({ray1 / plain:.2f} of plain, target >= 0.9)")
    print(f"Ray+DeepSpeed x2   : {ray2:7.2f} steps/s  (samples/s scaling x{2 * ray2 / ray1:.2f})")
    _write(args.out or str(ROOT / "benchmarks/results/train_overhead.json"), result)
    print(json.dumps(result))
    return 0


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
