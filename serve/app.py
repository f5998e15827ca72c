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
    """``OMNIRAY_EXPORT_DIR`` / ``OMNIRAY_GALLERY_SPLIT`` (``none`` disables search) replace
    the paths of a serve YAML, which ``serve run config.yaml`` cannot override itself."""
    export = os.environ.get("OMNIRAY_EXPORT_DIR")
    split = os.environ.get("OMNIRAY_GALLERY_SPLIT")
    if export:
        args = args.model_copy(update={"export_dir": export})
    if split:
        value = None if split.lower() == "none" else split
        args = args.model_copy(
            update={"gallery": args.gallery.model_copy(update={"split_dir": value})}
        )
    return args


def build_app(args: OmniServeArgs) -> Application:
    """Builds the OmniRay application.

    Args:
        args: :class:`~serve.config.OmniServeArgs` (Serve converts the YAML ``args:`` dict
            through this annotation) or a plain dict of its fields. Validated here, in the
            driver: a wrong key, a missing export file, a modality the export has no
            branch for or a missing gallery split fails before any replica starts.

    Returns:
        The bound application (ingress: the router).
    """
    if not isinstance(args, OmniServeArgs):
        args = OmniServeArgs.model_validate(dict[str, Any](args))
    args = apply_env_overrides(args).with_absolute_paths()
    served = check_serving(args.export_dir, args.modalities, args.features)
    args = OmniServeArgs.model_validate({**args.model_dump(), "modalities": served})
    if args.gallery.split_dir is not None:
        if not any(Path(args.gallery.split_dir).glob("*.parquet")):
            raise FileNotFoundError(
                f"gallery split {args.gallery.split_dir} has no *.parquet shards "
                "(set gallery.split_dir to a prepared split, or null to disable /v1/search)"
            )
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
