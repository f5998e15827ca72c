"""Running a native decoder on untrusted bytes in a sacrificial child process.

Some decoders (decord's ffmpeg, open3d's readers) do not fail politely on hostile input: a
container whose index lies about its frame count makes decord throw ``std::bad_alloc`` and
``abort()`` the whole process, and a point-cloud header claiming 10^9 vertices makes open3d
allocate for them. Neither is a Python exception, so no ``except`` catches it: in a Ray Data
task it kills the worker (and Ray retries the task), in a serving replica it kills the replica
(and the router retries the request on the next one).

:func:`run_isolated` runs the decoder in a child process whose address space is limited
(``RLIMIT_AS``: what the parent mapped at the fork plus ``memory_mb``) and sends the result
back as an ``.npz`` (never pickled). When the child aborts, runs out of memory or time, only
the child dies; the caller gets a :class:`~pipelines.featurize.base.SampleError`:

* ``decoder_crashed`` (400 in the service): killed by a signal or exited without an answer;
* ``too_large`` (413): over its memory budget (``MemoryError``) or its time limit.

The header checks of each featurizer run first (in the parent, in Python), so ordinary
oversized input is refused with a precise message before anything is forked; the child is the
second line, for what a header check cannot foresee.

The child is **reused**: each process (a Ray Data worker, a serving replica) forks one
decode server per memory budget, lazily, and sends it one job at a time (the decoder call,
pickled with ``cloudpickle`` by the trusted parent; answers come back as ``.npz`` only). A
fork of a process that holds torch costs tens of milliseconds (page tables, copy-on-write
faults, the copy's teardown), 5-25x the decode of a small clip; a server pays it once and
again only after a child died (crash, over its memory or time limit: the next call forks a
fresh one) or served ``MAX_CALLS`` jobs. Between jobs the child gives freed memory back to
the system (``malloc_trim``) so one big input does not shrink the budget of the next.
``reuse=False`` (or a callable that cannot be pickled) forks a child for that call alone.
Platforms without ``fork`` (or ``isolate=False`` in a featurizer config) decode in process.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import select
import signal
import struct
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


def _answer(fn: Callable[[], dict[str, np.ndarray]], memory_mb: int, limit: bool = True) -> bytes:
    try:
        if limit:
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


#: Jobs a decode server serves before it is replaced (bounds slow leaks in native decoders).
MAX_CALLS = 2000
_LEN = struct.Struct("<Q")


def _pickle():
    try:
        import cloudpickle
    except ImportError:  # pragma: no cover - Ray vendors it
        from ray import cloudpickle
    return cloudpickle


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int) -> bytes | None:
    """``n`` bytes from a blocking fd, or None at EOF (child side: the parent went away)."""
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _serve(req: int, rep: int, memory_mb: int) -> None:
    """The decode server's loop (child side): one job in, one answer out, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        _limit_child(memory_mb)
    except BaseException:  # noqa: BLE001 - without its limit the child must not decode
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        trim = None
    loads = _pickle().loads
    while True:
        head = _read_exact(req, _LEN.size)
        if head is None:
            return
        body = _read_exact(req, _LEN.unpack(head)[0])
        if body is None:
            return
        try:
            fn = loads(body)
        except BaseException as e:  # noqa: BLE001 - reported, the server goes on
            payload = _FAILED + f"cannot load the job: {type(e).__name__}: {e}"[:300].encode()
        else:
            del body
            payload = _answer(fn, memory_mb, limit=False)
            del fn
        _write_all(rep, _LEN.pack(len(payload)))  # apart: no copy of a big answer
        _write_all(rep, payload)
        del payload
        if trim is not None:
            trim(0)


class _Server:
    """One reusable decode child of this process (parent side)."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self.owner = os.getpid()  # a forked copy of this process has none of its children
        self.pid = 0
        self.calls = 0
        self.lock = threading.Lock()

    def _start(self) -> None:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            try:
                os.close(req_w)
                os.close(rep_r)
                _serve(req_r, rep_w, self.memory_mb)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(rep_w)
        self.pid, self.req, self.rep, self.calls = pid, req_w, rep_r, 0

    def stop(self, kill: bool = False) -> int | None:
        """Closes the pipes (the child exits at EOF); returns the exit status if waited."""
        if not self.pid:
            return None
        pid, self.pid = self.pid, 0
        for fd in (self.req, self.rep):
            try:
                os.close(fd)
            except OSError:
                pass
        if kill:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                return os.waitpid(pid, 0)[1]
            except ChildProcessError:
                return 0
        _reap_later(pid)
        return None

    def call(self, job: bytes, timeout_s: float) -> tuple[bytes, int | None]:
        """Sends one pickled job; returns (answer, None), or (partial answer, exit status)
        when the child died or timed out (then it is gone and the next call forks anew)."""
        deadline = time.monotonic() + timeout_s
        for attempt in (0, 1):
            if not self.pid or self.calls >= MAX_CALLS:
                self.stop()
                self._start()
            try:
                _write_all(self.req, _LEN.pack(len(job)))
                _write_all(self.req, job)
                break
            except BrokenPipeError:
                # The child was already gone (killed from outside): not this input's doing.
                self.stop(kill=True)
                if attempt:
                    return b"", 0
        self.calls += 1
        head, body = b"", []
        need, got = None, 0
        while need is None or got < need:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop(kill=True)
                return b"", -1
            ready, _, _ = select.select([self.rep], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.rep, 1 << 20)
            if not chunk:  # the child died on this job
                return b"".join(body), self.stop(kill=True) or 0
            if need is None:
                head += chunk
                if len(head) < _LEN.size:
                    continue
                need = _LEN.unpack(head[: _LEN.size])[0]
                chunk = head[_LEN.size :]
            body.append(chunk)
            got += len(chunk)
        return b"".join(body), None


_SERVERS: dict[int, _Server] = {}
_SERVERS_LOCK = threading.Lock()


def _server(memory_mb: int) -> _Server:
    with _SERVERS_LOCK:
        srv = _SERVERS.get(memory_mb)
        if srv is None or srv.owner != os.getpid():
            srv = _SERVERS[memory_mb] = _Server(memory_mb)
        return srv


def _raise_for(data: bytes, status: int, what: str, memory_mb: int, timeout_s: float):
    """The answer of a child as arrays, or the SampleError it stands for."""
    if status == -1:
        raise SampleError("too_large", f"{what} exceeded its time limit of {timeout_s:g} s")
    if status is not None and (os.WIFSIGNALED(status) or not data or not _complete(data)):
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


def server_pid(memory_mb: int) -> int:
    """The pid of this process's decode server for ``memory_mb`` (0: none running)."""
    srv = _SERVERS.get(memory_mb)
    return srv.pid if srv is not None and srv.owner == os.getpid() else 0


def run_isolated(
    fn: Callable[[], dict[str, np.ndarray]],
    *,
    memory_mb: int,
    timeout_s: float,
    what: str = "decoder",
    reuse: bool = True,
) -> dict[str, np.ndarray]:
    """Runs ``fn()`` in a child limited to ``memory_mb`` more address space and
    ``timeout_s`` seconds of wall time.

    Args:
        fn: Returns named arrays (numeric dtypes; they travel as ``.npz``).
        memory_mb: Address space the child may add to what the parent maps at the fork.
        timeout_s: Wall-clock limit; the child is killed after it.
        what: Name of the decoder, for messages.
        reuse: Run it in this process's decode server (forked once, see the module
            docstring); False, or an ``fn`` that cannot be pickled: a child for this call.

    Returns:
        ``fn()``'s arrays.

    Raises:
        SampleError: What ``fn`` raised; ``too_large`` over the memory or time limit;
            ``decoder_crashed`` when the child died (a native abort, a signal).
    """
    if reuse:
        try:
            job = _pickle().dumps(fn)
        except Exception:  # noqa: BLE001 - not picklable: a child of its own (fork copies it)
            job = None
        if job is not None:
            srv = _server(memory_mb)
            with srv.lock:
                data, status = srv.call(job, timeout_s)
                if status is None and data[:1] == _MEMORY:
                    srv.stop()  # over budget once: start the next job in a fresh child
            return _raise_for(data, status, what, memory_mb, timeout_s)
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
        status = None
    else:
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else's SIGCHLD handler
            status = 0
        if timed_out:
            status = -1
    return _raise_for(data, status, what, memory_mb, timeout_s)
