"""Running a native decoder on untrusted bytes in a sacrificial child process.

Some decoders (decord's ffmpeg, open3d's readers) do not fail politely on hostile input: a
container whose index lies about its frame count makes decord throw ``std::bad_alloc`` and
``abort()`` the whole process, and a point-cloud header claiming 10^9 vertices makes open3d
allocate for them. Neither is a Python exception, so no ``except`` catches it: in a Ray Data
task it kills the worker (and Ray retries the task), in a serving replica it kills the replica
(and the router retries the request on the next one).

:func:`run_isolated` forks the current process, lowers the child's address-space limit
(``RLIMIT_AS``: what it already maps plus ``memory_mb``), runs the decoder there and sends the
result back as an ``.npz`` (never pickled). When the child aborts, runs out of memory or time,
only the child dies; the caller gets a :class:`~pipelines.featurize.base.SampleError`:

* ``decoder_crashed`` (400 in the service): killed by a signal or exited without an answer;
* ``too_large`` (413): over its memory budget (``MemoryError``) or its time limit.

The header checks of each featurizer run first (in the parent, in Python), so ordinary
oversized input is refused with a precise message before anything is forked; the child is the
second line, for what a header check cannot foresee.

``fork`` copies nothing up front (copy on write), so the cost is a few milliseconds even in a
replica that holds a model; the child touches only the decoder and exits with ``os._exit``.
Platforms without ``fork`` (or ``isolate=False`` in a featurizer config) decode in process.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

from pipelines.featurize.base import SampleError

#: Exit markers of the child (first byte of its answer).
_OK, _SAMPLE_ERROR, _MEMORY, _FAILED = b"0", b"1", b"2", b"3"


def can_isolate() -> bool:
    """Whether this platform can fork a decoder child (Linux, macOS)."""
    return hasattr(os, "fork") and sys.platform != "win32"


def _vm_size() -> int:
    """Bytes of address space this process maps now (``VmSize``), 0 when unknown."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _limit_child(memory_mb: int) -> None:
    import faulthandler
    import resource

    faulthandler.disable()  # an expected abort here is not the parent's crash report

    # One malloc arena: glibc reserves 64 MiB of address space per thread arena, which would
    # count against RLIMIT_AS for every decoder thread without holding any data.
    try:
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # an abort writes no core file
    base = _vm_size()
    if base:
        limit = base + memory_mb * 2**20
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _answer(fn: Callable[[], dict[str, np.ndarray]], memory_mb: int) -> bytes:
    try:
        _limit_child(memory_mb)
        out = fn()
        buf = io.BytesIO()
        np.savez(buf, **{k: np.asarray(v) for k, v in out.items()})
        return _OK + buf.getvalue()
    except SampleError as e:
        return _SAMPLE_ERROR + json.dumps([e.reason, e.detail[:500]]).encode()
    except MemoryError:
        return _MEMORY
    except BaseException as e:  # noqa: BLE001 - reported to the parent as a decode error
        return _FAILED + f"{type(e).__name__}: {str(e)[:300]}".encode("utf-8", "replace")


def _complete(data: bytes) -> bool:
    """Whether an answer arrived whole (an ``.npz`` ends with its zip directory record)."""
    if data[:1] != _OK:
        return True
    return data.rfind(b"PK\x05\x06", max(1, len(data) - 65_600)) >= 0


_ZOMBIES: list[int] = []
_ZOMBIES_LOCK = threading.Lock()


def _reap_later(pid: int) -> None:
    """Collects exited children without blocking: this one if done, earlier ones too."""
    with _ZOMBIES_LOCK:
        _ZOMBIES.append(pid)
        for p in list(_ZOMBIES):
            try:
                done, _ = os.waitpid(p, os.WNOHANG)
            except ChildProcessError:
                done = p
            if done:
                _ZOMBIES.remove(p)


def run_isolated(
    fn: Callable[[], dict[str, np.ndarray]],
    *,
    memory_mb: int,
    timeout_s: float,
    what: str = "decoder",
) -> dict[str, np.ndarray]:
    """Runs ``fn()`` in a forked child limited to ``memory_mb`` more address space and
    ``timeout_s`` seconds of wall time.

    Args:
        fn: Returns named arrays (numeric dtypes; they travel as ``.npz``).
        memory_mb: Address space the child may add to what the parent maps at the fork.
        timeout_s: Wall-clock limit; the child is killed after it.
        what: Name of the decoder, for messages.

    Returns:
        ``fn()``'s arrays.

    Raises:
        SampleError: What ``fn`` raised; ``too_large`` over the memory or time limit;
            ``decoder_crashed`` when the child died (a native abort, a signal).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        try:
            os.close(r)
            payload = _answer(fn, memory_mb)
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view) :]
            os.close(w)  # the parent reads EOF now, not after this big process is torn down
        finally:
            os._exit(0)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        if timed_out:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    data = b"".join(chunks)
    if not timed_out and data[:1] in (_OK, _SAMPLE_ERROR, _MEMORY, _FAILED) and _complete(data):
        # A whole answer: the exit status adds nothing, and tearing down a copy of a big
        # process (a replica holding a model) takes longer than the decode; reap it later.
        _reap_later(pid)
        status = 0
    else:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else's SIGCHLD handler
            status = 0
    if timed_out:
        raise SampleError("too_large", f"{what} exceeded its time limit of {timeout_s:g} s")
    if os.WIFSIGNALED(status) or not data:
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        name = signal.Signals(sig).name if sig else f"exit {os.WEXITSTATUS(status)}"
        raise SampleError(
            "decoder_crashed",
            f"{what} died ({name}) on this input (memory limit {memory_mb} MiB);"
            " refused, not retried",
        )
    tag, body = data[:1], data[1:]
    if tag == _OK:
        with np.load(io.BytesIO(body), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if tag == _SAMPLE_ERROR:
        reason, detail = json.loads(body)
        raise SampleError(reason, detail)
    if tag == _MEMORY:
        raise SampleError("too_large", f"{what} needed more than {memory_mb} MiB")
    raise SampleError("decode_error", body.decode("utf-8", "replace"))
