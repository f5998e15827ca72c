"""The export directory (Contract 3): one writer and one loader.

An export holds everything needed to embed new inputs exactly as training did:

* ``model.safetensors`` + ``model_config.yaml``: the weights and the resolved ``OmniConfig``;
* ``data_config.yaml``: the featurizers' config (only its ``features`` section is read);
* ``tokenizer/``: for the modalities whose featurizer takes a ``tokenizer_dir`` (text);
* ``zero_shot.yaml``: the prompt templates of the zero-shot classifier, so evaluation and
  serving build the same classifier (:mod:`models.zeroshot`), and optionally ``label_text``
  (the text written into ``{label}`` per class, read by evaluation);
* ``metrics.json`` and ``training.yaml`` (aligned pairs, label names, stages).

:func:`write_export` assembles it from consolidated weights and the prepared shards;
:func:`load_export` is the only reader (evaluation, serving and tools use it). It fails
loudly, with an :class:`ExportError` naming the path, when a file is missing or when the
model's input sizes do not match what the featurizers produce; nothing falls back to
defaults silently. Exports written before ``zero_shot.yaml`` existed still load, with the
default templates and a logged warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipelines.tokenizer import TOKENIZER_DIR

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.yaml"
DATA_CONFIG_FILE = "data_config.yaml"
ZERO_SHOT_FILE = "zero_shot.yaml"
METRICS_FILE = "metrics.json"
TRAINING_FILE = "training.yaml"
#: Files every export has (``tokenizer/`` too when a featurizer needs it).
REQUIRED_FILES = (WEIGHTS_FILE, MODEL_CONFIG_FILE, DATA_CONFIG_FILE)


class ExportError(ValueError):
    """An export directory that cannot be used; the message names the offending path."""


@dataclass
class Export:
    """A loaded export.

    Attributes:
        model: ``OmniModel`` in eval mode on the requested device.
        featurizers: modality -> featurizer built from the export's ``data_config.yaml``
            (and ``tokenizer/``), one per loaded branch.
        config: the model's ``OmniConfig``.
        features: the export's ``FeatureConfig``.
        templates: zero-shot prompt templates (each contains ``{label}``).
        info: the export's ``training.yaml`` (``aligned_pairs``, ``label_names``, ...;
            empty when absent).
        path: the export directory.
    """

    model: Any
    featurizers: dict[str, Any]
    config: Any
    features: Any
    templates: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


# --------------------------------------------------------------------------- writing


def write_export(
    weights_dir: str | Path,
    out_dir: str | Path,
    *,
    shards_dir: str | Path | None,
    metrics: dict[str, Any],
    training_info: dict[str, Any],
    templates: list[str] | None = None,
    label_text: dict[str, str] | None = None,
) -> Path:
    """Assembles the export dir: weights + tokenizer + data config + templates + metrics.

    Args:
        weights_dir: Dir with ``model.safetensors`` + ``model_config.yaml`` (from
            :func:`jobs.training.export.consolidate_checkpoint`).
        out_dir: The export dir (written to ``<out>.tmp`` then moved into place).
        shards_dir: Prepared shards (``tokenizer/`` and ``data_config.yaml`` are copied).
        metrics: Written as ``metrics.json``.
        training_info: Written as ``training.yaml`` (``aligned_pairs``, ``label_names``, ...).
        templates: Zero-shot prompt templates written as ``zero_shot.yaml``; default
            :data:`models.zeroshot.DEFAULT_TEMPLATES`.
        label_text: Optional ``{class name: text put into {label}}`` (also in
            ``zero_shot.yaml``, for evaluation).

    Raises:
        ExportError: ``shards_dir`` lacks ``data_config.yaml`` (the export could not be
            featurized for) or a template has no ``{label}``.
    """
    templates = _check_templates(templates or _default_templates(), "templates")
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(weights_dir, tmp)
    if shards_dir is not None:
        sd = Path(shards_dir)
        if (sd / TOKENIZER_DIR).is_dir():
            shutil.copytree(sd / TOKENIZER_DIR, tmp / TOKENIZER_DIR, dirs_exist_ok=True)
        if not (sd / DATA_CONFIG_FILE).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            raise ExportError(f"{sd / DATA_CONFIG_FILE} not found: an export needs the data config")
        shutil.copy2(sd / DATA_CONFIG_FILE, tmp / DATA_CONFIG_FILE)
    _copy_towers(tmp)
    with open(tmp / ZERO_SHOT_FILE, "w") as f:
        zs: dict[str, Any] = {"templates": list(templates)}
        if label_text:
            zs["label_text"] = {str(k): str(v) for k, v in label_text.items()}
        yaml.safe_dump(zs, f, sort_keys=False, allow_unicode=True)
    with open(tmp / METRICS_FILE, "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    with open(tmp / TRAINING_FILE, "w") as f:
        yaml.safe_dump(training_info, f, sort_keys=False)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


TOWERS_DIR = "towers"


def _copy_towers(export: Path) -> None:
    """Copies every local pretrained tower (``encoders.<m>.kind: hf``) into
    ``towers/<m>/`` (config, weights, processor files) and points both the model config and
    the data config at it (relative), so the export featurizes and loads on any machine."""
    mc_path, dc_path = export / MODEL_CONFIG_FILE, export / DATA_CONFIG_FILE
    if not mc_path.is_file():
        return  # nothing to point at a tower (the loader reports the missing config)
    mc = yaml.safe_load(mc_path.read_text()) or {}
    dc = yaml.safe_load(dc_path.read_text()) if dc_path.is_file() else {}
    copied: dict[str, str] = {}
    changed = False
    for m, sec in (mc.get("encoders") or {}).items():
        if not isinstance(sec, dict) or sec.get("kind") != "hf":
            continue
        src = Path(str(sec.get("tower", "")))
        if not src.is_dir():
            continue  # a hub id travels as is
        key = str(src.resolve())
        if key not in copied:
            rel = f"{TOWERS_DIR}/{m}"
            shutil.copytree(src, export / rel, dirs_exist_ok=True)
            copied[key] = rel
        sec["tower"] = copied[key]
        feats = (dc or {}).get("features") or {}
        if isinstance(feats.get(m), dict) and feats[m].get("tower"):
            feats[m]["tower"] = copied[key]
        changed = True
    if changed:
        mc_path.write_text(yaml.safe_dump(mc, sort_keys=False))
        if dc:
            dc_path.write_text(yaml.safe_dump(dc, sort_keys=False))
        _drop_tower_copies(
            export,
            {
                m: sec["tower"]
                for m, sec in mc["encoders"].items()
                if isinstance(sec, dict) and sec.get("tower") in copied.values()
            },
        )


def _drop_tower_copies(export: Path, towers: dict[str, str]) -> None:
    """Stores every tower's weights once: the tensors of ``model.safetensors`` under
    ``encoders.<m>.tower.`` that equal the copy in ``towers/<m>/`` are dropped, and the
    file's metadata names the modalities whose tower weights come from there
    (:data:`models.pretrained.EXTERNAL_TOWERS_KEY`; the loader builds the tower from that
    directory, which is what it does anyway). What training changed (``last_k`` layers,
    LoRA adapters) stays in ``model.safetensors``."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from common.towers import load_model, tower_module
    from models.pretrained import EXTERNAL_TOWERS_KEY

    wpath = export / WEIGHTS_FILE
    if not towers or not wpath.is_file():
        return
    with safe_open(str(wpath), framework="pt") as f:
        meta = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iter
    external = set(json.loads(meta.get(EXTERNAL_TOWERS_KEY, "[]")))
    refs: dict[str, dict[str, Any]] = {}
    dropped = 0
    for m, rel in towers.items():
        prefix = f"encoders.{m}.tower."
        if rel not in refs:
            refs[rel] = tower_module(load_model(str(export / rel)), m).state_dict()
        ref = refs[rel]
        keys = [k for k in state if k.startswith(prefix)]
        drop = []
        for k in keys:
            name = k[len(prefix) :].replace(".base_layer.", ".")  # LoRA wraps the base Linear
            r = ref.get(name)
            if r is not None and r.shape == state[k].shape and torch.equal(r, state[k]):
                drop.append(k)
        if keys and drop:
            for k in drop:
                del state[k]
            dropped += len(drop)
            external.add(m)
    if dropped:
        meta[EXTERNAL_TOWERS_KEY] = json.dumps(sorted(external))
        save_file(state, str(wpath), metadata=meta)


# --------------------------------------------------------------------------- reading


def check_export(export_dir: str | Path) -> Path:
    """The export's path once its required files are there (cheap: nothing is parsed).

    Raises:
        ExportError: missing directory or file (the message names it).
    """
    d = Path(export_dir)
    if not d.is_dir():
        raise ExportError(f"export directory not found: {d}")
    for name in REQUIRED_FILES:
        if not (d / name).is_file():
            raise ExportError(
                f"{d / name} not found: {d} is not a complete export (expected "
                f"{list(REQUIRED_FILES)}, written by `python -m jobs.export`)"
            )
    return d


def read_templates(export_dir: str | Path) -> list[str]:
    """The export's zero-shot templates (``zero_shot.yaml``); the defaults, with a logged
    warning, for an export written before the file existed.

    Raises:
        ExportError: the file is unreadable or a template has no ``{label}``.
    """
    path = Path(export_dir) / ZERO_SHOT_FILE
    if not path.is_file():
        log.warning("%s not found (an older export): using the default templates", path)
        return _default_templates()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict) or "templates" not in data:
        raise ExportError(f"{path}: expected a mapping with a 'templates' list")
    return _check_templates(data["templates"], str(path))


def read_training_yaml(export_dir: str | Path) -> dict[str, Any]:
    """The export's ``training.yaml`` (empty when absent).

    Raises:
        ExportError: the file exists but is not a YAML mapping.
    """
    path = Path(export_dir) / TRAINING_FILE
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ExportError(f"cannot read {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ExportError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_featurizers(
    export_dir: str | Path,
    config: Any,
    modalities: Iterable[str] | None = None,
    feature_overrides: dict[str, Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The export's ``FeatureConfig`` and one featurizer per modality, each checked against
    the model config (see :func:`check_sizes`).

    Args:
        export_dir: the export directory.
        config: the export's ``OmniConfig``.
        modalities: featurizers to build (default: every branch of ``config``).
        feature_overrides: deep-merged onto the export's features
            (``FeatureConfig.with_overrides``; serving tightens its input limits so); an
            override that changes what the model sees fails the size check.

    Raises:
        ExportError: unreadable data config, missing ``tokenizer/``, a featurizer that
            cannot be built, or sizes that disagree with the model.
    """
    from common.config import ConfigError
    from pipelines.config import load_feature_config

    d = Path(export_dir)
    cfg_path = d / DATA_CONFIG_FILE
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path} not found: the export cannot featurize inputs")
    try:
        features = load_feature_config(cfg_path)
    except (ConfigError, OSError, ValueError) as e:
        raise ExportError(f"unreadable {cfg_path}: {e}") from e
    if feature_overrides:
        try:
            features = features.with_overrides(feature_overrides)
        except (ConfigError, ValueError) as e:
            raise ExportError(f"feature overrides do not apply to {cfg_path}: {e}") from e
    try:
        from pipelines.featurize import FEATURIZERS, get_featurizer
    except ImportError as e:  # a featurizer's decoder library missing on this node
        raise ExportError(f"cannot import the featurizers for {d}: {e}") from e

    mods = list(config.modalities if modalities is None else modalities)
    featurizers: dict[str, Any] = {}
    for m in mods:
        if m not in FEATURIZERS:
            raise ExportError(
                f"{d / MODEL_CONFIG_FILE}: modality {m!r} has no registered featurizer "
                f"(registered: {sorted(FEATURIZERS)})"
            )
        tower = getattr(features.section(m), "tower", "")  # a tower's processor: towers/<m>
        if FEATURIZERS[m].tokenized and not tower and not (d / TOKENIZER_DIR).is_dir():
            raise ExportError(
                f"{d / TOKENIZER_DIR} not found: the {m} featurizer needs the tokenizer"
            )
        try:
            featurizers[m] = get_featurizer(m, features, assets_dir=d)
        except (OSError, ValueError, KeyError, ImportError) as e:
            raise ExportError(f"cannot build the {m} featurizer from {d}: {e}") from e
    check_sizes(config, featurizers, where=str(d))
    return features, featurizers


def model_sizes(featurizers: dict[str, Any]) -> dict[str, Any]:
    """``OmniConfig`` fields fixed by the featurizers: each branch's input sizes
    (``encoders[m] = ENCODERS[m].sizes_for(featurizer.max_output_shape())``) and the
    top-level fields a featurizer fixes (``model_args()``: the text vocabulary, length).

    The one place model sizes are derived from data (training's driver, dev exports, and
    the size check of :func:`load_export` all use it).
    """
    from models.encoders import ENCODERS

    out: dict[str, Any] = {"encoders": {}}
    for m, feat in featurizers.items():
        if m not in ENCODERS:
            raise ExportError(f"no encoder registered for {m!r} (known: {sorted(ENCODERS)})")
        if hasattr(feat, "encoder_fields"):  # a pretrained tower: encoder kind ``hf``
            out["encoders"][m] = feat.encoder_fields()
        else:
            out["encoders"][m] = ENCODERS[m].sizes_for(tuple(feat.max_output_shape()))
        out.update(feat.model_args())
    return out


def check_sizes(config: Any, featurizers: dict[str, Any], where: str = "export") -> None:
    """Fails when a branch's input sizes differ from what its featurizer produces.

    For every modality ``m``: ``ENCODERS[m].sizes_for(featurizer.max_output_shape())``
    must equal the same fields of ``config.encoder_section(m)``.

    Raises:
        ExportError: naming the modality, the field and both values.
    """
    wanted = model_sizes(featurizers)["encoders"]
    for m, want in wanted.items():
        section = config.encoder_section(m)
        bad = {
            k: (getattr(section, k, None), v)
            for k, v in want.items()
            # A tower's path differs between the run and its export; its revision does not.
            if k != "tower" and getattr(section, k, None) != v
        }
        if bad:
            detail = ", ".join(f"{k}: model {a!r} vs featurizer {b!r}" for k, (a, b) in bad.items())
            raise ExportError(
                f"{where}: the {m} branch of {MODEL_CONFIG_FILE} does not match the "
                f"featurizer of {DATA_CONFIG_FILE} ({detail})"
            )


def load_export(
    export_dir: str | Path,
    *,
    device: str = "cpu",
    modalities: Iterable[str] | None = None,
    parts: Iterable[str] | None = None,
    feature_overrides: dict[str, Any] | None = None,
) -> Export:
    """Loads an export: model, featurizers, configs, zero-shot templates, training info.

    Args:
        export_dir: the export directory (Contract 3).
        device: torch device of the model.
        modalities: branches (and featurizers) to load; default every branch.
        parts: ``OmniModel.from_pretrained`` parts to load (default all; ``[]`` loads only
            the branches, trunk and temperature, as a serving replica does).
        feature_overrides: see :func:`load_featurizers` (the service's input limits).

    Returns:
        The :class:`Export`.

    Raises:
        ExportError: a missing or unreadable file, an unknown modality, sizes that do not
            match the featurizers, weights that do not fit the config, or a bad device.
    """
    import torch

    from common.config import ConfigError
    from models import OmniModel

    d = check_export(export_dir)
    try:
        from models.pretrained import read_config

        config = read_config(d)
    except (ConfigError, OSError, ValueError, TypeError) as e:
        raise ExportError(f"unreadable {d / MODEL_CONFIG_FILE}: {e}") from e
    mods = list(config.modalities if modalities is None else modalities)
    unknown = [m for m in mods if m not in config.modalities]
    if unknown:
        raise ExportError(
            f"{d / MODEL_CONFIG_FILE}: no branch for {unknown}; the model has "
            f"{list(config.modalities)}"
        )
    features, featurizers = load_featurizers(d, config, mods, feature_overrides)
    templates = read_templates(d)
    info = read_training_yaml(d)
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ExportError(f"bad device {device!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExportError(f"device {device!r} requested but CUDA is not available")
    try:
        model = OmniModel.from_pretrained(d, modalities=mods, parts=parts, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure here is a bad export
        raise ExportError(f"cannot load the model from {d}: {type(e).__name__}: {e}") from e
    return Export(
        model=model.to(dev).eval(),
        featurizers=featurizers,
        config=config,
        features=features,
        templates=templates,
        info=info,
        path=d,
    )


def _default_templates() -> list[str]:
    from models.zeroshot import DEFAULT_TEMPLATES

    return list(DEFAULT_TEMPLATES)


def _check_templates(templates: Any, where: str) -> list[str]:
    if (
        not isinstance(templates, list | tuple)
        or not templates
        or not all(isinstance(t, str) and "{label}" in t for t in templates)
    ):
        raise ExportError(
            f"{where}: zero-shot templates must be a non-empty list of strings containing "
            f"'{{label}}', got {templates!r}"
        )
    return [str(t) for t in templates]
