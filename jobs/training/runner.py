"""Driver side of ``jobs.train``: one ``TorchTrainer`` per stage, resume, export.

Each stage is its own Ray Train run (``{storage_path}/{name}-{stage}``) started from the
previous stage's consolidated weights (``{run_dir}/{stage}/final``). A finished stage leaves
``{run_dir}/{stage}/DONE.json`` and is skipped when the same command runs again; an
interrupted stage resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ConfigError, to_dict
from jobs.console import Progress, format_duration, say
from jobs.training.checkpoint import disk_usage, find_resumable, format_disk
from jobs.training.config import STAGES, TrainConfig
from jobs.training.data import ShardInfo, inspect_shards, join_path, resolve_path
from jobs.training.engine import deepspeed_config
from jobs.training.metrics import plot_losses, read_jsonl
from jobs.training.stage import class_weights

log = logging.getLogger("jobs.train")


class RunPaths:
    """Every path of a run, resolved once on the driver (relative to the CWD)."""

    def __init__(self, tc: TrainConfig) -> None:
        self.run_dir = resolve_path(os.path.join(tc.runs_dir, tc.name))
        self.storage = resolve_path(tc.storage_path or os.path.join(self.run_dir, "ray"))
        self.shards = resolve_path(tc.data.shards_dir)
        self.export = resolve_path(tc.export_dir or os.path.join(self.run_dir, "export"))
        self.model_config = os.path.join(self.run_dir, "model_config.yaml")
        self.metrics = os.path.join(self.run_dir, "metrics.jsonl")
        self.name = tc.name

    def stage_dir(self, stage: str) -> str:
        return os.path.join(self.run_dir, stage)

    def final(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "final")

    def done(self, stage: str) -> str:
        return os.path.join(self.stage_dir(stage), "DONE.json")

    def experiment(self, stage: str) -> str:
        return join_path(self.storage, f"{self.name}-{stage}")


def model_config_from_data(
    tc: TrainConfig, shards_dir: str, info: ShardInfo, modalities: list[str]
) -> Any:
    """The run's resolved ``OmniConfig``: size ``tc.model``, input sizes from the featurizers.

    Each modality's encoder section comes from what its featurizer declares it produces
    (``ENCODERS[m].sizes_for(featurizer.max_output_shape())``, with the featurizer config of
    the shards' ``data_config.yaml``); top-level fields a featurizer fixes (the text
    vocabulary and length) from ``featurizer.model_args()``; ``moe_impl``/``ep_size`` from
    the DeepSpeed section; ``model_overrides`` wins over all of them.

    Raises:
        ConfigError: ``data_config.yaml`` is missing or invalid, or the sizes do not fit
            the encoders.
    """
    from common.config import deep_merge
    from jobs.exports import model_sizes
    from models import OmniConfig
    from models.config import upgrade_legacy
    from pipelines.config import load_feature_config
    from pipelines.featurize import build_featurizers

    fc = load_feature_config(join_path(shards_dir, "data_config.yaml"))
    kw: dict[str, Any] = {
        "modalities": list(modalities),
        "num_classes": len(info.label_names),
        "moe_impl": tc.deepspeed.moe_impl,
        "ep_size": tc.deepspeed.ep_size,
        **model_sizes(build_featurizers(fc, modalities, assets_dir=shards_dir)),
    }
    kw = deep_merge(kw, upgrade_legacy(dict(tc.model_overrides)))
    gen = kw.get("generation")
    if gen and gen.get("targets") is not None:
        # Generation follows the data like align pairs do: a target the prepared data lacks
        # (or data.modalities leaves out) is dropped; none left = no generation heads.
        # So is a target whose branch is a pretrained tower (no generator for its input).
        encs = kw.get("encoders") or {}
        targets = [
            t for t in gen["targets"] if t in modalities and (encs.get(t) or {}).get("kind") != "hf"
        ]
        kw["generation"] = {**gen, "targets": targets} if targets else {}
    return OmniConfig.from_name(tc.model, **kw)


def aligned_pairs(
    tc: TrainConfig, modalities: list[str], info: ShardInfo | None = None
) -> list[list[str]]:
    """The align stage's pairs: ``align.pairs``, or the pairs the prepared data has.

    Without ``align.pairs`` every pair of the trained modalities that at least one train
    row holds together (``info.pair_rows``; every pair when ``info`` is None).

    Raises:
        ConfigError: A pair of ``align.pairs`` names a modality that is not trained (the
            data lacks it, or ``data.modalities`` leaves it out).
    """
    for p in tc.align.pairs or []:
        for m in p:
            if m not in modalities:
                raise ConfigError(
                    f"align.pairs: pair {list(p)} names {m!r}, which the data does not have "
                    f"(trained modalities: {modalities}); remove the pair, or leave align.pairs "
                    "unset to align the pairs the data has"
                )
    held_out = {frozenset(p) for p in held_out_pairs(tc, modalities)}  # checks the names
    if tc.align.pairs is None:
        return [
            list(p)
            for p in combinations(modalities, 2)
            if (info is None or info.rows_with_pair(*p) > 0) and frozenset(p) not in held_out
        ]
    return [list(p) for p in tc.align.pairs]


def held_out_pairs(tc: TrainConfig, modalities: list[str]) -> list[list[str]]:
    """``align.held_out_pairs`` among the trained modalities (a pair naming a declared
    modality the run does not train holds nothing out and is left out).

    Raises:
        ConfigError: A pair names a modality that is not declared at all (a typo).
    """
    from common.modalities import modality_names

    known = set(modality_names())
    for p in tc.align.held_out_pairs:
        for m in p:
            if m not in known:
                raise ConfigError(
                    f"align.held_out_pairs: pair {list(p)} names {m!r}, which is no modality "
                    f"(declared: {sorted(known)})"
                )
    return [list(p) for p in tc.align.held_out_pairs if set(p) <= set(modalities)]


@dataclass
class RunSetup:
    """What the driver resolves from the config and the shards before any worker starts."""

    paths: RunPaths
    info: ShardInfo
    modalities: list[str]
    model_config: Any
    pairs: list[list[str]]
    class_weights: dict[str, list[float] | None]


def resolve_run(tc: TrainConfig) -> RunSetup:
    """Checks the config against the prepared data; every problem is a one-line error.

    Raises:
        ConfigError: A key that does not fit the data (``data.shards_dir``,
            ``data.modalities``, ``align.pairs``, the model sizes), naming the key.
    """
    paths = RunPaths(tc)
    try:
        info = inspect_shards(paths.shards)
    except FileNotFoundError as e:
        raise ConfigError(f"data.shards_dir: {e}") from e
    missing = sorted(set(tc.data.modalities or []) - set(info.modalities))
    if missing:
        raise ConfigError(
            f"data.modalities: {missing} are not in the shards at {paths.shards} "
            f"(they hold {info.modalities})"
        )
    mods = [m for m in (tc.data.modalities or info.modalities) if m in info.modalities]
    model_cfg = model_config_from_data(tc, paths.shards, info, mods)
    from jobs.tower_cache import check_cache

    # Cached frozen-tower features must come from the model's tower revision.
    check_cache(paths.shards, model_cfg.encoders)
    pairs = aligned_pairs(tc, mods, info)
    for a, b in pairs:
        if info.rows_with_pair(a, b) == 0:
            say(f"[train] warning: align.pairs [{a}, {b}]: no train row holds both")
    if not pairs and tc.align.enabled and len(mods) > 1:
        say("[train] warning: no train row holds two modalities: align has no pair")
    weights = {
        s: class_weights(tc.stage(s).class_weighting, info.label_names, info.label_counts)
        for s in STAGES
    }
    return RunSetup(paths, info, mods, model_cfg, pairs, weights)


def connect_ray() -> None:
    """Connects to ``RAY_ADDRESS`` (``ray job submit`` sets it) or starts a local Ray."""
    import ray

    if not ray.is_initialized():
        # Without RAY_ADDRESS, always a fresh local instance: ``address=None`` would attach to
        # whichever cluster ``ray start`` launched last on this machine.
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=True)


def run_training(
    tc: TrainConfig, stages: list[str], setup: RunSetup | None = None
) -> dict[str, Any]:
    """Runs the requested stages in order (skipping finished ones) and exports at the end.

    Args:
        tc: The training config.
        stages: Stages to run, in pipeline order.
        setup: :func:`resolve_run`'s result (resolved here when None).

    Returns:
        ``{"stages": {stage: summary}, "export_dir": path | None, "run_dir": path,
        "disk": {...}}`` (the disk the run's dirs use, :func:`disk_usage`).
    """
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jobs.training.loop import train_loop_per_worker

    setup = setup or resolve_run(tc)
    paths, info, mods, pairs = setup.paths, setup.info, setup.modalities, setup.pairs
    model_cfg = setup.model_config
    os.makedirs(paths.run_dir, exist_ok=True)
    model_cfg.save_yaml(paths.model_config)
    print(f"[train] modalities {mods}; align pairs {pairs}", flush=True)
    say(
        f"[train] {tc.name}: {tc.model} model, {len(mods)} modalities, {len(pairs)} align "
        f"pairs, {tc.scaling.num_workers} workers, stages {', '.join(stages)}; run dir "
        f"{paths.run_dir}"
    )
    with open(os.path.join(paths.run_dir, "train_config.yaml"), "w") as f:
        import yaml

        yaml.safe_dump(to_dict(tc), f, sort_keys=False)

    connect_ray()
    summaries: dict[str, Any] = {}
    for stage in STAGES:
        if stage not in stages:
            continue
        done = Path(paths.done(stage))
        if done.is_file():
            log.info("stage %s already finished (%s): skipped", stage, done)
            say(f"[train] stage {stage}: already finished, skipped")
            summaries[stage] = json.loads(done.read_text())
            continue
        prev = _previous_final(paths, stage)
        if prev is None and stage != STAGES[0]:
            say(f"[train] stage {stage}: no earlier stage weights, starting from scratch")
        t0 = time.time()
        st = tc.stage(stage)
        use_gpu = tc.scaling.use_gpu
        resources = {"CPU": tc.scaling.cpus_per_worker}
        if use_gpu:
            resources["GPU"] = tc.scaling.gpus_per_worker
        loop_config = {
            "train_config": to_dict(tc),
            "stage": stage,
            "model_config": model_cfg.to_dict(),  # resolved once, here
            "label_names": info.label_names,
            "modalities": mods,
            "pairs": pairs,
            "class_weights": setup.class_weights.get(stage),
            "init_from": prev,
            "ds_config": deepspeed_config(tc, st, use_gpu=use_gpu),
            "run_dir": paths.run_dir,
            "experiment_path": paths.experiment(stage),
        }
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # reproducible data position on resume
        ctx.enable_progress_bars = False
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(
                num_workers=tc.scaling.num_workers,
                use_gpu=use_gpu,
                resources_per_worker=resources,
                placement_strategy=tc.scaling.placement_strategy,
            ),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=RunConfig(
                name=f"{tc.name}-{stage}",
                storage_path=paths.storage,
                failure_config=FailureConfig(max_failures=tc.max_failures),
                # The newest N (Ray always keeps the latest reported one); with N >= 2 an
                # older complete one remains if the newest did not fully arrive (#41700).
                checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            ),
            datasets={"train": ray.data.read_parquet(join_path(paths.shards, "train"))},
        )
        say(
            f"[train] stage {stage}: {st.steps} steps, batch {tc.data.batch_size} x "
            f"{tc.scaling.num_workers} workers, lr {st.lr:g}"
        )
        with StageProgress(paths.metrics, stage, st.steps):
            result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"stage {stage} failed: {result.error}") from result.error
        found = find_resumable(
            paths.experiment(stage), result.checkpoint.path if result.checkpoint else None
        )
        if found is None:
            raise RuntimeError(f"stage {stage} finished without a complete checkpoint")
        ckpt_path, fs = found
        from ray.train import Checkpoint

        from jobs.training.export import consolidate_checkpoint

        with Checkpoint(path=ckpt_path, filesystem=fs).as_directory() as d:
            consolidate_checkpoint(d, paths.model_config, paths.final(stage))
        records = read_jsonl(paths.metrics)
        png = plot_losses(records, stage, os.path.join(paths.run_dir, f"loss_{stage}.png"))
        summary = _stage_summary(records, stage, st.steps)
        summary.update(
            {
                "checkpoint": ckpt_path,
                "final": paths.final(stage),
                "wall_s": time.time() - t0,
                "plot": png,
            }
        )
        done.parent.mkdir(parents=True, exist_ok=True)
        done.write_text(json.dumps(summary, indent=2))
        summaries[stage] = summary
        first, final = summary.get("first_loss"), summary.get("final_loss")
        say(
            f"[train] stage {stage}: done in {format_duration(summary['wall_s'])}, loss "
            + (f"{first:.3f} -> {final:.3f}" if first is not None and final is not None else "n/a")
            + f", {summary.get('samples_per_s', 0):.0f} samples/s"
        )

    export_dir = None
    gen_fit = None
    last = next((s for s in reversed(STAGES) if Path(paths.done(s)).is_file()), None)
    if tc.export_at_end and last is not None and stages and last == stages[-1]:
        export_dir = export_run(tc, paths, info, pairs, mods)
        say(f"[train] exported {last} weights to {export_dir}")
        if tc.generation_fit.steps > 0:
            gen_fit = fit_heads_on_export(export_dir, paths.shards, tc.generation_fit)
    records = read_jsonl(paths.metrics)
    from jobs.training.plots import expert_load_heatmap, gate_weights

    expert_load_heatmap(records, os.path.join(paths.run_dir, "expert_load.png"))
    gate_weights(records, os.path.join(paths.run_dir, "gate_weights.png"))
    disk = disk_usage(paths.run_dir, paths.storage, paths.export)
    say(f"[train] {format_disk(disk)}")
    summary = {
        "stages": summaries,
        "export_dir": export_dir,
        "run_dir": paths.run_dir,
        "disk": disk,
        "generation_fit": gen_fit,
    }
    with open(os.path.join(paths.run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return summary


class StageProgress:
    """One progress bar per stage on the driver, fed by rank 0's ``metrics.jsonl`` records
    (step, loss, samples/s) while ``trainer.fit()`` runs; the workers print nothing."""

    def __init__(self, metrics_path: str, stage: str, steps: int, poll_s: float = 2.0) -> None:
        self.path, self.stage, self.steps, self.poll_s = metrics_path, stage, steps, poll_s
        self.offset = os.path.getsize(metrics_path) if os.path.exists(metrics_path) else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.bar: Progress | None = None

    def __enter__(self) -> StageProgress:
        self.bar = Progress(self.stage, self.steps, prefix="[train]", interval_s=60.0)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()
        if self.bar is not None:
            self.bar.close()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self._poll()

    def _poll(self) -> None:
        if self.bar is None or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind("\n") + 1  # a line still being written waits for the next poll
        self.offset += len(chunk[:end].encode())
        for line in chunk[:end].splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("stage") != self.stage or r.get("event") or "step" not in r:
                continue
            self.bar.update_to(
                int(r["step"]), loss=r.get("loss"), samples_per_s=r.get("samples_per_s")
            )


def fit_heads_on_export(export_dir: str, shards: str, fit: Any) -> dict[str, Any]:
    """``generation_fit``: the export's generation heads fitted in place on its frozen
    encoders (:func:`jobs.training.generation.fit_generation_heads`); an export without
    heads is left as it is."""
    from jobs.exports import load_export
    from jobs.training.generation import FitGenerationConfig, fit_generation_heads

    if not len(load_export(export_dir).model.generators):
        say("[train] generation_fit: the model has no generation heads; skipped")
        return {"skipped": "no generation heads"}
    t0 = time.time()
    say(f"[train] generation_fit: {fit.steps} steps on the frozen encoders' train embeddings")
    res = fit_generation_heads(
        export_dir,
        shards,
        export_dir,
        FitGenerationConfig(
            steps=fit.steps,
            batch=fit.batch,
            lr=fit.lr,
            max_rows=fit.max_rows,
            log_every=max(1, fit.steps // 4),
        ),
        log=say,
    )
    res["wall_s"] = time.time() - t0
    loss = " ".join(f"{m} {a:.3f}->{b:.3f}" for m, (a, b) in res["loss"].items())
    say(f"[train] generation_fit: done in {format_duration(res['wall_s'])}, loss {loss}")
    return res


def export_run(
    tc: TrainConfig,
    paths: RunPaths,
    info: ShardInfo,
    pairs: list[list[str]],
    mods: list[str],
    stage: str | None = None,
    out_dir: str | None = None,
) -> str:
    """Writes the export dir from the consolidated weights of ``stage`` (default: the last)."""
    from jobs.exports import write_export

    stage = stage or next((s for s in reversed(STAGES) if os.path.isdir(paths.final(s))), None)
    if stage is None or not os.path.isdir(paths.final(stage)):
        raise FileNotFoundError(f"no finished stage with weights under {paths.run_dir}")
    metrics, training_info = _export_info(tc, paths, info, pairs, mods, stage)
    training_info["stages_done"] = [s for s in STAGES if os.path.isfile(paths.done(s))]
    training_info.update(
        {
            "zero_stage": tc.deepspeed.zero_stage,
            "num_workers": tc.scaling.num_workers,
            "shards_dir": paths.shards,
        }
    )
    return str(
        write_export(
            paths.final(stage),
            out_dir or paths.export,
            shards_dir=paths.shards,
            metrics=metrics,
            training_info=training_info,
            templates=tc.zero_shot_templates,
            label_text=tc.zero_shot_label_text or None,
        )
    )


def _previous_final(paths: RunPaths, stage: str) -> str | None:
    idx = STAGES.index(stage)
    for prev in reversed(STAGES[:idx]):
        if os.path.isfile(os.path.join(paths.final(prev), "model.safetensors")):
            return paths.final(prev)
    return None


def _stage_summary(records: list[dict[str, Any]], stage: str, steps: int) -> dict[str, Any]:
    rows = [r for r in records if r.get("stage") == stage and "loss" in r and not r.get("event")]
    if not rows:
        return {"steps": steps}
    by_step = {int(r["step"]): r for r in rows}
    ordered = [by_step[k] for k in sorted(by_step)]
    k = max(1, len(ordered) // 10)
    return {
        "steps": steps,
        "first_loss": float(np.mean([r["loss"] for r in ordered[:k]])),
        "final_loss": float(np.mean([r["loss"] for r in ordered[-k:]])),
        "samples_per_s": float(np.median([r["samples_per_s"] for r in ordered])),
        "tokens_per_s": float(np.median([r["tokens_per_s"] for r in ordered])),
        "model_tflops_per_s": float(
            np.median([r.get("model_tflops_per_s") or 0.0 for r in ordered])
        ),
        "mfu": (
            float(np.median([r["mfu"] for r in ordered]))
            if all(r.get("mfu") is not None for r in ordered)
            else None
        ),
        "restarts": sum(
            1
            for r in records
            if r.get("event") == "start"
            and r.get("stage") == stage
            and r.get("resumed_from") is not None
        ),
    }


def export_from_config(
    tc: TrainConfig,
    *,
    stage: str | None = None,
    checkpoint: str | None = None,
    out: str | None = None,
) -> str:
    """``jobs.export``: consolidate (if needed) and write the export dir of a run.

    Args:
        tc: The run's training config.
        stage: Stage to export (default: the last with weights or checkpoints).
        checkpoint: Explicit DeepSpeed checkpoint dir (local) to consolidate.
        out: Export dir (default: ``tc.export_dir`` or ``runs/<name>/export``).

    Raises:
        FileNotFoundError: When the run has no weights or checkpoint to export.
    """
    from ray.train import Checkpoint

    from jobs.training.export import consolidate_checkpoint

    paths = RunPaths(tc)
    if not os.path.isfile(paths.model_config):
        raise FileNotFoundError(f"{paths.model_config} missing: was this run trained?")
    info = inspect_shards(paths.shards)
    mods = [m for m in (tc.data.modalities or info.modalities) if m in info.modalities]
    pairs = aligned_pairs(tc, mods, info)
    if checkpoint is not None:
        weights = os.path.join(paths.run_dir, "export_weights")
        consolidate_checkpoint(resolve_path(checkpoint), paths.model_config, weights)
        return _export_weights(tc, paths, info, pairs, mods, weights, stage or "checkpoint", out)
    candidates = [stage] if stage else list(reversed(STAGES))
    for s in candidates:
        if os.path.isfile(os.path.join(paths.final(s), "model.safetensors")):
            return export_run(tc, paths, info, pairs, mods, stage=s, out_dir=out)
        found = find_resumable(paths.experiment(s))
        if found is not None:  # an interrupted stage: its newest complete checkpoint
            weights = os.path.join(paths.stage_dir(s), "partial")
            with Checkpoint(path=found[0], filesystem=found[1]).as_directory() as d:
                consolidate_checkpoint(d, paths.model_config, weights)
            return _export_weights(tc, paths, info, pairs, mods, weights, s, out)
    raise FileNotFoundError(
        f"no weights or complete checkpoint for {candidates} in {paths.run_dir}"
    )


def _export_weights(
    tc: TrainConfig,
    paths: RunPaths,
    info: ShardInfo,
    pairs: list[list[str]],
    mods: list[str],
    weights: str,
    stage: str,
    out: str | None,
) -> str:
    from jobs.exports import write_export

    metrics, training_info = _export_info(tc, paths, info, pairs, mods, stage)
    return str(
        write_export(
            weights,
            out or paths.export,
            shards_dir=paths.shards,
            metrics=metrics,
            training_info=training_info,
            templates=tc.zero_shot_templates,
            label_text=tc.zero_shot_label_text or None,
        )
    )


def _export_info(
    tc: TrainConfig,
    paths: RunPaths,
    info: ShardInfo,
    pairs: list[list[str]],
    mods: list[str],
    stage: str,
) -> tuple[dict, dict]:
    """The export's ``metrics.json`` (per-stage loss summaries) and ``training.yaml`` basics."""
    records = read_jsonl(paths.metrics)
    metrics = {
        "stages": {
            s: _stage_summary(records, s, tc.stage(s).steps)
            for s in STAGES
            if any(r.get("stage") == s for r in records)
        },
        "exported_stage": stage,
    }
    training_info = {
        "aligned_pairs": pairs,
        # Pairs held out of alignment on purpose: the evaluation's emergent-alignment figure.
        "emergent_pairs": held_out_pairs(tc, mods),
        "label_names": info.label_names,
        "modalities": mods,
        "exported_stage": stage,
        "model": tc.model,
        "class_weighting": tc.finetune.class_weighting,
    }
    return metrics, training_info
