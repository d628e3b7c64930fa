"""The device layer: the only place that knows about CUDA streams, events, pinned memory and
copy threads. The generation loop talks to a ``Device`` and never branches on its kind.

Two kinds, one interface::

    device.submit(lane, fn) -> Handle      run fn (a copy job) on the "h2d" or "d2h" lane
    device.wait(handles)                   make the compute side wait for those jobs
    device.to_compute(t) / to_host(t)      placement helpers (pinned host memory under CUDA)
    device.stamp() / device.elapsed_s      timing marks (CUDA events or perf_counter)

* ``cuda``: each lane is a CUDA stream. ``submit`` runs ``fn`` on the host at once, with its
  kernels and copies enqueued on the lane's stream (after the compute stream's work so far, so
  a store sees the tensors it stores), and records an event. ``wait`` makes the compute stream
  wait for the events (``Stream.wait_event``): the host thread never blocks and there is no
  device-wide synchronize. Tensors a job returns are marked as used by the compute stream
  (``record_stream``), and tensors a job reads from compute (``inputs``) as used by the lane,
  so the caching allocator does not reuse either early. Under CUDA ``submit`` blocks the host
  only where a job itself makes a blocking copy (the KV store's host-tier writes).
* ``cpu``: the "GPU" is host memory under a byte budget (see ``budget.py``). Each lane is a
  one-worker ``ThreadPoolExecutor``; ``submit`` returns a future and ``wait`` joins it. Torch
  releases the GIL inside copies and kernels, so copies overlap compute on another core. A job
  runs on one intra-op thread unless it is ``bulk`` (a layer's weights), which uses as many as
  compute does. Where compute's threads already occupy every CPU the process may use, there is
  no core for a copy to overlap on: a worker could only take turns with compute, and each turn
  stalls compute's OpenMP team at its next barrier. There jobs run inline, at ``submit``, on the
  compute thread (``copy_threads=False``; see ``copy_threads_fit``), and their errors are still
  raised at ``wait``.

A handle measures its own busy time (events on the lane, or perf_counter in the worker), from
which the runner reports how much transfer time compute hid.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import torch
from torch import Tensor

from cost_model.profiling import copy_threads_fit

LANES = ("h2d", "d2h")  # host → device copies (loads), device → host copies (stores)


@dataclass
class Handle:
    """One submitted copy job: its result, and its busy time once finished."""

    lane: str  # "h2d" or "d2h"
    future: Future | None = None  # cpu: the worker's future, until waited for
    event: Any = None  # cuda: event recorded on the lane after the job
    start_event: Any = None  # cuda: event recorded on the lane before the job
    result: Any = None  # cuda / inline cpu: the job's return value, until waited for
    error: BaseException | None = None  # inline cpu: what the job raised, re-raised at wait
    busy_s: float = 0.0  # cpu: seconds the worker (or the inline call) spent in the job
    waited: bool = field(default=False)  # wait() has been called


class Device:
    """Common part: placement and timing; subclasses implement submit/wait."""

    kind = "cpu"

    def __init__(self, torch_device: torch.device) -> None:
        self.torch_device = torch_device  # where compute runs and the GPU tier lives
        self.pin = torch_device.type == "cuda"  # pinned host buffers only help under CUDA

    def submit(self, lane: str, fn: Callable[[], Any], inputs: Any = None,
               bulk: bool = False) -> Handle:
        """Run ``fn`` on ``lane``; ``inputs``: device tensors it reads that compute produced;
        ``bulk``: a large copy (a layer's weights), run with as many threads as compute."""
        raise NotImplementedError

    def wait(self, handles: Iterable[Handle]) -> list[Any]:
        """Make compute wait for ``handles``; return their results (a job's error re-raises)."""
        raise NotImplementedError

    def busy_s(self, handles: Iterable[Handle]) -> float:
        """Seconds the lanes spent in these (finished) jobs."""
        return sum(h.busy_s for h in handles)

    def to_compute(self, t: Tensor) -> Tensor:
        """A copy of ``t`` on the compute device (always a new tensor: a real transfer)."""
        if t.device == self.torch_device:
            return t.clone()
        return t.to(self.torch_device, non_blocking=self.pin and t.is_pinned())

    def to_host(self, t: Tensor) -> Tensor:
        """A host copy of ``t``, pinned under CUDA (asynchronous there: read it on the device
        only after the job's event, as ``load_*`` jobs do)."""
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        out.copy_(t, non_blocking=self.pin)
        return out

    def stamp(self) -> Any:
        return time.perf_counter()

    def elapsed_s(self, start: Any, end: Any) -> float:
        return end - start

    @property
    def copy_mode(self) -> str:
        """How copy jobs run: "streams" (CUDA), "threads" or "inline" (CPU)."""
        raise NotImplementedError

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return isinstance(exc, torch.OutOfMemoryError)

    def finish(self) -> None:
        """Block the host until every job and kernel issued so far is done (once per block)."""

    def close(self) -> None:
        """Release worker threads; the device may not be used afterwards."""


class CpuDevice(Device):
    """Compute on the host; copies on one worker thread per lane, or inline (see the module
    docstring). ``copy_threads``: None picks threads only where compute leaves a CPU free."""

    kind = "cpu"

    def __init__(self, copy_threads: bool | None = None) -> None:
        super().__init__(torch.device("cpu"))
        self.threads = torch.get_num_threads()  # compute's intra-op threads
        self.copy_threads = (copy_threads_fit(self.threads) if copy_threads is None
                             else copy_threads)
        self.pools = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"flexalisa-{lane}")
                      for lane in LANES} if self.copy_threads else {}

    @property
    def copy_mode(self) -> str:
        return "threads" if self.copy_threads else "inline"

    def submit(self, lane: str, fn: Callable[[], Any], inputs: Any = None,
               bulk: bool = False) -> Handle:
        handle = Handle(lane)
        if not self.copy_threads:
            start = time.perf_counter()
            try:
                handle.result = fn()
            except Exception as exc:  # noqa: BLE001 - raised at wait, as a worker's would be
                handle.error = exc
            handle.busy_s = time.perf_counter() - start
            return handle

        def timed() -> Any:
            # small jobs run on one thread: a second OpenMP team woken for them competed
            # with compute's (SmolLM2 b16, all on the device: 3.8 -> 2.9 ms per layer-step);
            # a layer's weights are copied with compute's thread count (with compute on one
            # thread, copying on both cores made streamed policies 10-30% slower here)
            torch.set_num_threads(self.threads if bulk else 1)
            start = time.perf_counter()
            try:
                return fn()
            finally:
                handle.busy_s = time.perf_counter() - start

        handle.future = self.pools[lane].submit(timed)
        return handle

    def wait(self, handles: Iterable[Handle]) -> list[Any]:
        out = []
        for handle in handles:
            handle.waited = True
            if handle.error is not None:
                error, handle.error = handle.error, None
                raise error
            if handle.future is not None:
                out.append(handle.future.result())
            else:
                out.append(handle.result)
            # drop what the job made: the block keeps every handle
            handle.future = handle.result = None
        return out

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True)


class CudaDevice(Device):
    """Compute on the current CUDA stream; one copy stream per lane, synchronised by events."""

    kind = "cuda"

    def __init__(self, index: int | None = None) -> None:
        super().__init__(torch.device("cuda", torch.cuda.current_device() if index is None
                                      else index))
        self.streams = {lane: torch.cuda.Stream(self.torch_device) for lane in LANES}
        self.compute = torch.cuda.current_stream(self.torch_device)

    @property
    def copy_mode(self) -> str:
        return "streams"

    def submit(self, lane: str, fn: Callable[[], Any], inputs: Any = None,
               bulk: bool = False) -> Handle:
        stream = self.streams[lane]
        stream.wait_stream(self.compute)  # a store reads what compute produced so far
        _record_stream(inputs, stream)  # not reused while the lane may still read them
        handle = Handle(lane, start_event=torch.cuda.Event(enable_timing=True))
        with torch.cuda.stream(stream):
            handle.start_event.record(stream)
            handle.result = fn()
            handle.event = torch.cuda.Event(enable_timing=True)
            handle.event.record(stream)
        return handle

    def wait(self, handles: Iterable[Handle]) -> list[Any]:
        out = []
        for handle in handles:
            self.compute.wait_event(handle.event)
            _record_stream(handle.result, self.compute)
            handle.waited = True
            out.append(handle.result)
            handle.result = None  # drop what the job made: the block keeps every handle
        return out

    def finish(self) -> None:
        for stream in (*self.streams.values(), self.compute):
            stream.synchronize()  # per stream, once per block: never a device-wide sync

    def busy_s(self, handles: Iterable[Handle]) -> float:
        total = 0.0
        for handle in handles:
            handle.event.synchronize()  # called once per block, after the loop
            total += handle.start_event.elapsed_time(handle.event) / 1e3
        return total

    def stamp(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.compute)
        return event

    def elapsed_s(self, start: Any, end: Any) -> float:
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def _record_stream(obj: Any, stream: Any) -> None:
    """Mark every CUDA tensor inside ``obj`` (tensors, lists, dicts, dataclasses) as used."""
    if isinstance(obj, Tensor):
        if obj.is_cuda:
            obj.record_stream(stream)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _record_stream(item, stream)
    elif isinstance(obj, dict):
        for item in obj.values():
            _record_stream(item, stream)
    elif is_dataclass(obj) and not isinstance(obj, type):
        for f in fields(obj):
            _record_stream(getattr(obj, f.name), stream)


def make_device(name: str, copy_threads: bool | None = None) -> Device:
    """``"cpu"`` or ``"cuda"`` (ValueError naming the choice otherwise, or without CUDA);
    ``copy_threads`` as ``CpuDevice`` (ignored under CUDA, whose copies run on streams)."""
    if name == "cpu":
        return CpuDevice(copy_threads)
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        return CudaDevice()
    raise ValueError(f"unknown device {name!r}; choose cpu or cuda")
