"""The Serve application builder (Ray Serve's typed app-builder pattern).

Start it with a serve YAML (``import_path: serve.app:build_app`` + ``args:``)::

    serve run configs/serve/demo.yaml            # or: serve deploy configs/serve/demo.yaml
    serve run serve.app:build_app export_dir=runs/demo/export   # args as key=value

or from Python: ``serve.run(build_app({"export_dir": ...}), route_prefix="/")``.

The graph: ``Router`` (FastAPI ingress) → one ``ModalityEncoder`` per served modality, named
``<modality>_encoder`` → ``FusionHead`` (named ``fusion``). Replica counts, autoscaling,
resources and queue limits of each are set per name in the YAML's ``deployments:`` list.
"""

import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serve.config import (
    FUSION_NAME,
    ROUTER_NAME,
    OmniServeArgs,
    deployment_names,
    encoder_name,
)
from serve.fusion import FusionHead
from serve.replica import ModalityEncoder
from serve.router import Router
from serve.runtime import check_serving


def apply_env_overrides(args: OmniServeArgs) -> OmniServeArgs:
    """``OMNIRAY_EXPORT_DIR``, ``OMNIRAY_GALLERY_SPLIT`` and ``OMNIRAY_GALLERY_EMBEDDINGS``
    (``none`` disables search) replace the paths of a serve YAML, which ``serve run
    config.yaml`` cannot override itself. Setting one gallery source clears the other."""
    export = os.environ.get("OMNIRAY_EXPORT_DIR")
    if export:
        args = args.model_copy(update={"export_dir": export})
    for var, key, other in (
        ("OMNIRAY_GALLERY_SPLIT", "split_dir", "embeddings_dir"),
        ("OMNIRAY_GALLERY_EMBEDDINGS", "embeddings_dir", "split_dir"),
    ):
        value = os.environ.get(var)
        if value:
            value = None if value.lower() == "none" else value
            args = args.model_copy(
                update={"gallery": args.gallery.model_copy(update={key: value, other: None})}
            )
    return args


def check_gallery(args: OmniServeArgs) -> None:
    """Start-up check of the configured gallery, in the driver (before any replica).

    Raises:
        FileNotFoundError: a split without shards.
        jobs.embedding.output.EmbeddingDirError: an embedding directory that is missing,
            unfinished, embedded by another model revision or of another embedding size,
            or whose index is stale.
    """
    g = args.gallery
    if g.split_dir is not None:
        if not any(Path(g.split_dir).glob("*.parquet")):
            raise FileNotFoundError(
                f"gallery split {g.split_dir} has no *.parquet shards "
                "(set gallery.split_dir to a prepared split, or null to disable /v1/search)"
            )
    if g.embeddings_dir is not None:
        from jobs.embedding.index import read_index_info
        from jobs.embedding.output import EmbeddingDirError, check_embedding_dir, export_revision
        from jobs.exports import MODEL_CONFIG_FILE
        from models import OmniConfig

        dim = OmniConfig.from_yaml(Path(args.export_dir) / MODEL_CONFIG_FILE).embed_dim
        meta = check_embedding_dir(
            g.embeddings_dir, revision=export_revision(args.export_dir), dim=dim
        )
        read_index_info(g.embeddings_dir)
        if g.modalities is not None:
            missing = sorted(set(g.modalities) - set(meta["modalities"]))
            if missing:
                raise EmbeddingDirError(
                    f"gallery.modalities {missing} are not in {g.embeddings_dir} "
                    f"(it holds {meta['modalities']})"
                )


def build_app(args: OmniServeArgs) -> Application:
    """Builds the OmniRay application.

    Args:
        args: :class:`~serve.config.OmniServeArgs` (Serve converts the YAML ``args:`` dict
            through this annotation) or a plain dict of its fields. Validated here, in the
            driver: a wrong key, a missing export file, a modality the export has no
            branch for, a missing gallery split or a missing or mismatched embedding
            directory (:func:`check_gallery`) fails before any replica starts.

    Returns:
        The bound application (ingress: the router).
    """
    if not isinstance(args, OmniServeArgs):
        args = OmniServeArgs.model_validate(dict[str, Any](args))
    args = apply_env_overrides(args).with_absolute_paths()
    served = check_serving(args.export_dir, args.modalities, args.features)
    args = OmniServeArgs.model_validate({**args.model_dump(), "modalities": served})
    check_gallery(args)
    plain = args.model_dump()
    opts = args.deployment_options

    def options(name: str) -> dict[str, Any]:
        return {**opts.get(name, {}), "name": name}

    encoders = {
        m: ModalityEncoder.options(**options(encoder_name(m))).bind(m, plain)
        for m in args.served_modalities
    }
    fusion = FusionHead.options(**options(FUSION_NAME)).bind(plain)
    return Router.options(**options(ROUTER_NAME)).bind(plain, encoders, fusion)


__all__ = ["build_app", "deployment_names", "encoder_name", "serve"]
