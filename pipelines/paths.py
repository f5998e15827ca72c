"""Resolving manifest paths safely: relative to the corpus root, never outside it.

A manifest path is relative to the manifest's folder, or a URI/absolute path. Every
path must resolve (after ``..`` normalization and, for local files, symlinks) inside
the corpus root or one of ``extra_roots``; anything else is ``outside_root`` and is
never opened.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipelines.featurize.base import SampleError


def _has_scheme(p: str) -> bool:
    head, sep, _ = p.partition("://")
    return bool(sep) and head.isalnum() and len(head) > 1


@dataclass(frozen=True)
class _Root:
    fs: pafs.FileSystem
    kind: str  # filesystem type name ("local", "s3", ...)
    base: str  # normalized base path inside that filesystem
    scheme: str = "file"  # URI scheme of the root ("file" for local paths)
    location: str = ""  # the root URI without its scheme ("bucket/prefix"), remote roots


def _make_root(uri_or_path: str) -> _Root:
    if _has_scheme(uri_or_path):
        fs, base = pafs.FileSystem.from_uri(uri_or_path)
        scheme, _, rest = uri_or_path.partition("://")
        if fs.type_name == "local":  # file:// roots: compare like local paths
            return _Root(fs, "local", os.path.realpath(base))
        return _Root(
            fs, fs.type_name, posixpath.normpath(base), scheme.lower(), posixpath.normpath(rest)
        )
    fs = pafs.LocalFileSystem()
    return _Root(fs, fs.type_name, os.path.realpath(os.path.abspath(uri_or_path)))


def manifest_root(manifest: str) -> str:
    """Folder of a manifest path or URI (the corpus root)."""
    if _has_scheme(manifest):
        scheme, _, rest = manifest.partition("://")
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(manifest))


def _inside(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


class PathResolver:
    """Maps manifest paths to ``(filesystem, path)`` inside the allowed roots.

    Args:
        root: Corpus root (the manifest's folder): local dir or URI.
        extra_roots: Further allowed roots.
    """

    def __init__(self, root: str, extra_roots: list[str] | tuple[str, ...] = ()) -> None:
        self.root_spec = root
        self.roots = [_make_root(root)] + [_make_root(r) for r in extra_roots]

    def resolve(self, path: str) -> tuple[pafs.FileSystem, str]:
        """Returns the filesystem and normalized path of a manifest entry.

        Raises:
            SampleError: ``outside_root`` for anything outside the allowed roots.
        """
        if not isinstance(path, str) or not path.strip():
            raise SampleError("bad_path", f"not a path: {path!r}")
        if "\x00" in path:
            raise SampleError("bad_path", "path contains a NUL byte")
        main = self.roots[0]
        if _has_scheme(path) and not path.startswith("file://"):
            return self._remote(path)
        if path.startswith("file://"):
            p, kind = path[len("file://") :], "local"
        elif os.path.isabs(path) or (main.kind != "local" and path.startswith("/")):
            p, kind = path, main.kind
        else:
            p, kind = posixpath.join(main.base, path), main.kind
        if kind == "local":
            p = os.path.realpath(os.path.normpath(p))  # resolves ``..`` and symlinks
        else:
            p = posixpath.normpath(p)
        for r in self.roots:
            if r.kind == kind and _inside(p, r.base):
                return r.fs, p
        raise SampleError("outside_root", f"{path!r} resolves outside the corpus root")

    def _remote(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """A URI with a scheme other than ``file``: checked against the roots of that scheme
        textually, before any filesystem is built (building one may already contact the
        remote service); a scheme no root has is ``unsupported_uri``."""
        scheme, _, rest = uri.partition("://")
        roots = [r for r in self.roots if r.kind != "local" and r.scheme == scheme.lower()]
        if not roots:
            allowed = sorted({r.scheme for r in self.roots})
            raise SampleError(
                "unsupported_uri",
                f"{uri[:200]!r}: {scheme.lower()[:20]}:// is not a source of this corpus"
                f" (allowed: {', '.join(s + '://' for s in allowed)}; add a root to"
                " extra_roots to allow one); nothing was fetched",
            )
        loc = posixpath.normpath(rest)
        for r in roots:
            if _inside(loc, r.location):
                return r.fs, posixpath.normpath(
                    posixpath.join(r.base, loc[len(r.location) :].lstrip("/"))
                )
        raise SampleError("outside_root", f"{uri[:200]!r} resolves outside the corpus root")

    def read(self, path: str, max_bytes: int) -> bytes:
        """Resolves and reads one file, with size checks before reading.

        Raises:
            SampleError: ``outside_root``, ``not_found``, ``empty``, ``too_large``,
                ``decode_error`` (not a regular file / unreadable).
        """
        fs, p = self.resolve(path)
        try:
            info = fs.get_file_info(p)
        except OSError as e:
            raise SampleError("not_found", str(e)) from e
        if info.type == pafs.FileType.NotFound:
            raise SampleError("not_found", f"{path!r} does not exist")
        if info.type != pafs.FileType.File:
            raise SampleError("decode_error", f"{path!r} is not a regular file")
        if info.size is not None:
            if info.size == 0:
                raise SampleError("empty", "zero-byte file")
            if info.size > max_bytes:
                raise SampleError("too_large", f"{info.size} bytes > max_file_bytes={max_bytes}")
        try:
            with fs.open_input_file(p) as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            raise SampleError("decode_error", f"cannot read {path!r}: {e}") from e
        if len(data) > max_bytes:
            raise SampleError("too_large", f"> max_file_bytes={max_bytes}")
        return data
