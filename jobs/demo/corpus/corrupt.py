"""Deliberately corrupt files: the kinds per file modality and the bytes of each kind.

Every kind produces a file the pipeline must quarantine. Which files are corrupt is
:func:`jobs.demo.corpus.plan._plan_rows`'s decision; the bytes are made here.
"""

from __future__ import annotations

import io

import numpy as np

#: Corruption kinds, per file modality. Each produces a file the pipeline must quarantine.
CORRUPT_KINDS: dict[str, tuple[str, ...]] = {
    "image": ("truncated", "garbage"),
    "audio": ("empty", "garbage"),
    "video": ("truncated", "empty"),
    "pointcloud": ("empty", "non_finite"),
    "signal": ("non_finite", "pickle", "truncated"),
}


def _corrupt_bytes(modality: str, kind: str, good: bytes, r: np.random.Generator) -> bytes:
    """A broken version of a file, of the given kind (see CORRUPT_KINDS)."""
    if kind == "empty":
        return b""
    if kind == "truncated" and modality == "signal" and not good.startswith(b"\x93NUMPY"):
        # CSV: cut mid-line so the last record misses fields (a clean cut would still parse).
        cut = good[: max(16, int(len(good) * r.uniform(0.2, 0.5)))]
        return cut[: cut.rindex(b",") + 1]
    if kind == "truncated":
        return good[: max(8, int(len(good) * r.uniform(0.2, 0.5)))]
    if kind == "garbage":
        return r.integers(0, 256, int(r.integers(64, 2048)), dtype=np.uint8).tobytes()
    if kind == "non_finite" and modality == "signal":
        buf = io.BytesIO()
        x = np.load(io.BytesIO(good), allow_pickle=False) if good[:6] == b"\x93NUMPY" else None
        if x is None:  # csv: write NaNs into the text
            lines = good.decode().splitlines()
            k = 1 + int(r.integers(len(lines) - 1))
            lines[k] = "nan,inf,1"
            return ("\n".join(lines) + "\n").encode()
        x = x.copy()
        # A NaN step inside the recording: a NaN last step would be end padding (trimmed).
        x[:, min(int(r.integers(x.shape[1])), x.shape[1] - 2)] = np.nan
        np.save(buf, x, allow_pickle=False)
        return buf.getvalue()
    if kind == "pickle":  # an object array: only loadable by unpickling, which is refused
        buf = io.BytesIO()
        np.save(buf, np.array([{"x": [1.0, 2.0]}, None], dtype=object), allow_pickle=True)
        return buf.getvalue()
    raise ValueError(f"unknown corruption {modality}/{kind}")
