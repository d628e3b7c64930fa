"""The CPU device: copy jobs run on worker threads concurrently with the caller, one lane each,
in submission order, or inline where compute occupies every CPU; errors surface at wait in
both modes; copies are real copies."""

from __future__ import annotations

import threading

import pytest
import torch

from flexalisa.runtime import CpuDevice, make_device


def test_jobs_run_on_a_worker_concurrently_with_compute():
    device = CpuDevice(copy_threads=True)
    started, release = threading.Event(), threading.Event()

    def job() -> str:
        started.set()
        assert release.wait(5), "the caller never released the job"  # blocks the worker only
        return threading.current_thread().name

    handle = device.submit("h2d", job)
    assert started.wait(5)  # the job is running while the caller goes on
    release.set()
    (name,) = device.wait([handle])
    assert name.startswith("flexalisa-h2d") and handle.busy_s > 0
    device.close()


def test_small_jobs_run_on_one_thread_and_bulk_copies_on_computes_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # what compute uses when the device is made
        device = CpuDevice(copy_threads=True)
        small = device.submit("h2d", torch.get_num_threads)
        bulk = device.submit("h2d", torch.get_num_threads, bulk=True)
        assert device.wait([small, bulk]) == [1, 2]
        assert torch.get_num_threads() == 2  # the caller's setting is its own
        device.close()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("copy_threads", [True, False])
def test_a_lane_runs_jobs_in_order_and_errors_surface_at_wait(copy_threads):
    device = CpuDevice(copy_threads)
    order: list[int] = []
    handles = [device.submit("d2h", lambda i=i: order.append(i)) for i in range(20)]
    device.wait(handles)
    assert order == list(range(20))
    bad = device.submit("h2d", lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        device.wait([bad])
    device.close()


def test_copies_are_new_tensors_and_oom_is_recognised():
    device = make_device("cpu")
    t = torch.arange(6.0)
    assert device.to_compute(t).data_ptr() != t.data_ptr()
    assert torch.equal(device.to_host(t), t)
    assert device.is_out_of_memory(torch.OutOfMemoryError("x"))
    assert not device.is_out_of_memory(RuntimeError("x"))
    device.close()
    with pytest.raises(ValueError, match="unknown device"):
        make_device("tpu")


@pytest.mark.parametrize("copy_threads", [True, False])
def test_a_waited_handle_keeps_no_reference_to_what_its_job_made(copy_threads):
    """The loop keeps every handle of a block for busy-time accounting; were results kept with
    them, every fetched KV copy and streamed layer of the block would stay alive (a 16-row,
    256-step run was killed for memory on a 24 GiB machine before this)."""
    import gc
    import weakref

    device = CpuDevice(copy_threads)
    made = []

    def job() -> torch.Tensor:
        t = torch.zeros(1024)
        made.append(weakref.ref(t))
        return t

    handle = device.submit("h2d", job)
    (result,) = device.wait([handle])
    assert result.shape == (1024,) and handle.waited and handle.busy_s >= 0
    del result
    gc.collect()
    assert made[0]() is None  # only the handle could still hold it
    device.close()


def test_inline_jobs_run_at_submit_on_the_callers_thread():
    device = CpuDevice(copy_threads=False)
    assert device.copy_mode == "inline" and not device.pools
    ran: list[str] = []
    handle = device.submit("h2d", lambda: ran.append(threading.current_thread().name) or 7)
    assert ran == [threading.current_thread().name]  # done before submit returned
    assert device.wait([handle]) == [7] and handle.busy_s >= 0 and handle.result is None
    device.close()


def test_copy_threads_only_where_compute_leaves_a_cpu_free(monkeypatch):
    from cost_model import profiling
    from flexalisa.runtime import device as device_module

    threads = torch.get_num_threads()
    try:
        for cpus, compute, mode in ((2, 1, "threads"), (2, 2, "inline"), (1, 1, "inline"),
                                    (16, 8, "threads")):
            monkeypatch.setattr(profiling, "usable_cpus", lambda cpus=cpus: cpus)
            torch.set_num_threads(compute)
            device = device_module.CpuDevice()
            assert device.copy_mode == mode, (cpus, compute)
            device.close()
    finally:
        torch.set_num_threads(threads)
