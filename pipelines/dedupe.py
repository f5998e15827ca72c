"""Duplicate detection: content hashes, image pHash, text MinHash, and the decision.

Workers compute per-item keys (:func:`content_hash`, :func:`image_phash`,
:func:`text_minhash`); the driver gathers the (small) keys and calls
:func:`find_duplicates`, which is deterministic: items are visited in id order and an
item that matches an earlier survivor becomes ``duplicate_of:<smallest matching id>``,
so the same item survives in every run whatever the block order was.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import scipy.fft

_MERSENNE = np.uint64((1 << 61) - 1)


def content_hash(data: bytes | str) -> str:
    """128-bit BLAKE2b hex digest of raw bytes (or of UTF-8 text)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def image_phash(image: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an RGB/grey uint8 image (H, W[, 3]).

    The image is converted to grey and resized to 32x32 (the featurized images already
    are); the 8x8 lowest DCT frequencies are compared with their median.
    """
    a = np.asarray(image)
    if a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3 and a.shape[:2] != (32, 32):
        # A large uint8 RGB image (224 px at the realistic preset): PIL's grey conversion
        # (ITU-R 601-2 luma, the weights below) and resize on 8-bit data, ~2x faster than
        # the float path and the same bits on photos (the hash thresholds a 8x8 DCT).
        from PIL import Image

        grey = Image.fromarray(np.ascontiguousarray(a), "RGB").convert("L")
        img = np.asarray(grey.resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float32)
    else:
        img = a.astype(np.float32)
        if img.ndim == 3:
            img = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (H, W)
        if img.shape != (32, 32):
            from PIL import Image

            img = np.asarray(
                Image.fromarray(img.astype(np.float32)).resize((32, 32), Image.Resampling.BILINEAR)
            )
    low = scipy.fft.dctn(img, type=2, norm="ortho")[:8, :8].ravel()  # (64,)
    # The DC term only measures brightness; leave it out of the median: of the 63 others,
    # the 32nd smallest (what np.median returns for an odd count, 10x cheaper here).
    rest = low[1:]
    bits = low > np.partition(rest, len(rest) // 2)[len(rest) // 2]
    return int(np.packbits(bits.astype(np.uint8)).view(">u8")[0])


def _stored_min_side(data: bytes) -> int:
    """Shorter side of an encoded image from its header (no pixel decoding)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return min(im.size)
    except Exception:  # noqa: BLE001 - decoded already; a header PIL cannot read: compare
        return 1 << 30


def _minhash_params(num_perm: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 1 << 32, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, 1 << 32, size=num_perm, dtype=np.uint64)
    return a, b


def normalize_text_key(text: str) -> str:
    """Lower-case alphanumeric words: equal for texts differing in case/punctuation/spaces."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def text_minhash(text: str, num_perm: int = 64, shingle: int = 5) -> np.ndarray:
    """MinHash signature uint32 (num_perm,) of lower-cased character shingles.

    Whitespace and punctuation are reduced so that near duplicates that differ in case,
    spacing or trailing punctuation share their shingles.
    """
    norm = normalize_text_key(text)
    if len(norm) < shingle:
        grams = {norm}
    else:
        grams = {norm[i : i + shingle] for i in range(len(norm) - shingle + 1)}
    x = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "little")
            for g in sorted(grams)
        ),
        dtype=np.uint64,
        count=len(grams),
    )
    a, b = _minhash_params(num_perm)
    # (a*x + b) mod (2^61 - 1): a, x < 2^32, so the product fits in uint64.
    h = (a[:, None] * x[None, :] + b[:, None]) % _MERSENNE  # (num_perm, n_grams)
    return (h.min(axis=1) & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def hamming64(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def find_duplicates(
    ids: Sequence[str],
    exact: Sequence[str | None] | None = None,
    phash: Sequence[int | None] | None = None,
    hamming: int = 4,
    minhash: Sequence[np.ndarray | None] | None = None,
    jaccard: float = 0.8,
    bands: int = 16,
) -> dict[int, tuple[int, str]]:
    """Finds duplicates among the items of one modality.

    Args:
        ids: Row id of each item (unique).
        exact: Content hash per item (None: not compared).
        phash: 64-bit perceptual hash per item (None: not compared); near when the
            Hamming distance is <= ``hamming``.
        hamming: Max pHash distance.
        minhash: MinHash signature per item; near when the share of equal entries is
            >= ``jaccard``.
        jaccard: Min estimated Jaccard similarity.
        bands: LSH bands for MinHash candidates.

    Returns:
        ``{duplicate index: (survivor index, "exact" | "near")}``; survivors have the
        smallest ids.
    """
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    dup: dict[int, tuple[int, str]] = {}
    if exact is not None:
        first: dict[str, int] = {}
        for i in order:
            h = exact[i]
            if h is None:
                continue
            if h in first:
                dup[i] = (first[h], "exact")
            else:
                first[h] = i
    if phash is not None:
        # Pigeonhole: within distance t, at least one of t+1 disjoint bit bands is equal.
        nb = hamming + 1
        cuts = [int(c) for c in np.linspace(0, 64, nb + 1)]
        masks = [
            (((1 << (hi - lo)) - 1) << lo, lo) for lo, hi in zip(cuts[:-1], cuts[1:], strict=True)
        ]
        buckets: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in order:
            if i in dup or phash[i] is None:
                continue
            p = int(phash[i])
            keys = [(k, (p & m) >> lo) for k, (m, lo) in enumerate(masks)]
            match = None
            for key in keys:
                for j in buckets.get(key, ()):
                    if hamming64(p, int(phash[j])) <= hamming and (
                        match is None or ids[j] < ids[match]
                    ):
                        match = j
            if match is not None:
                dup[i] = (match, "near")
            else:
                for key in keys:
                    buckets[key].append(i)
    if minhash is not None:
        buckets = defaultdict(list)
        for i in order:
            if i in dup or minhash[i] is None:
                continue
            sig = np.asarray(minhash[i])
            rows = len(sig) // bands
            keys = [(k, sig[k * rows : (k + 1) * rows].tobytes()) for k in range(bands)]
            match = None
            seen: set[int] = set()
            for key in keys:
                for j in buckets.get(key, ()):
                    if j in seen:
                        continue
                    seen.add(j)
                    if np.mean(sig == np.asarray(minhash[j])) >= jaccard and (
                        match is None or ids[j] < ids[match]
                    ):
                        match = j
            if match is not None:
                dup[i] = (match, "near")
            else:
                for key in keys:
                    buckets[key].append(i)
    return dup


#: Near-duplicate methods a featurizer may name in ``near_dedupe``.
NEAR_METHODS: tuple[str, ...] = ("phash", "minhash")


def _checked(cfg: object, key: str, have: list[str]) -> list[str]:
    """The modalities of ``have`` that ``cfg.<key>`` selects (``None``: all of them)."""
    from pipelines.featurize import FEATURIZERS

    listed = getattr(cfg, key)
    if listed is None:
        return [m for m in have if cfg.captions or not FEATURIZERS[m].is_caption()]
    caps = sorted(m for m in listed if m in FEATURIZERS and FEATURIZERS[m].is_caption())
    if caps and not cfg.captions:
        raise ValueError(
            f"dedupe.{key}: {caps} are captions (the same caption on different samples is "
            "kept); remove them, or set dedupe.captions=true to deduplicate captions too"
        )
    bad = sorted(set(listed) - set(have))
    if bad:
        raise ValueError(f"dedupe.{key}: {bad} cannot be deduplicated so (can: {have})")
    return [m for m in have if m in listed]


def exact_modalities(cfg: object) -> list[str]:
    """Modalities deduplicated by content hash under ``cfg`` (a DedupeConfig), table order.

    Captions (``Featurizer.is_caption``) only with ``cfg.captions``.

    Raises:
        ValueError: ``cfg.exact`` lists a caption without ``cfg.captions``.
    """
    from common.modalities import modality_names
    from pipelines.featurize import FEATURIZERS

    return _checked(cfg, "exact", [m for m in modality_names() if m in FEATURIZERS])


def near_modalities(cfg: object) -> list[str]:
    """Modalities near-deduplicated under ``cfg`` (a DedupeConfig), in table order.

    Captions (``Featurizer.is_caption``) only with ``cfg.captions``.

    Raises:
        ValueError: ``cfg.near`` lists a modality whose featurizer has no method, or a
            caption without ``cfg.captions``.
    """
    from common.modalities import modality_names
    from pipelines.featurize import FEATURIZERS

    have = [m for m in modality_names() if m in FEATURIZERS and FEATURIZERS[m].near_dedupe]
    return _checked(cfg, "near", have)


def near_key(method: str, item: object, cfg: object, data: bytes | None = None) -> bytes | None:
    """The near-duplicate key of one decoded item as bytes (``None``: not compared).

    Args:
        method: ``phash`` (``item``: a uint8 image (H, W[, 3]); an image file whose shorter
            side is below ``cfg.phash_min_side`` gives ``None``) or ``minhash`` (``item``:
            a string; shorter than ``cfg.minhash_min_chars`` gives ``None``).
        item: The stage-1 (decoded) item.
        cfg: The :class:`~pipelines.config.DedupeConfig`.
        data: The raw file bytes the item came from (None: given inline or as an array).
    """
    if method == "phash":
        if data is not None and _stored_min_side(data) < cfg.phash_min_side:
            return None
        return int(image_phash(np.asarray(item))).to_bytes(8, "big")
    if method == "minhash":
        text = str(item)
        if len(text) < cfg.minhash_min_chars:
            return None
        return text_minhash(text, cfg.minhash_num_perm, cfg.minhash_shingle).tobytes()
    raise ValueError(f"unknown near-duplicate method {method!r}; known: {NEAR_METHODS}")


def find_near_duplicates(
    method: str,
    ids: Sequence[str],
    keys: Sequence[bytes | None],
    cfg: object,
    exact: Sequence[str | None] | None = None,
) -> dict[int, tuple[int, str]]:
    """:func:`find_duplicates` with the keys of :func:`near_key` (and optional exact hashes)."""
    if method == "phash":
        phash = [None if k is None else int.from_bytes(k, "big") for k in keys]
        return find_duplicates(ids, exact=exact, phash=phash, hamming=cfg.phash_hamming)
    if method == "minhash":
        sigs = [None if k is None else np.frombuffer(k, dtype=np.uint32) for k in keys]
        return find_duplicates(
            ids, exact=exact, minhash=sigs, jaccard=cfg.minhash_jaccard, bands=cfg.minhash_bands
        )
    raise ValueError(f"unknown near-duplicate method {method!r}; known: {NEAR_METHODS}")
