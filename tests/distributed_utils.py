"""Run a module-level function on several CPU ranks (gloo), one spawned process per rank, and collect
what each rank returns; a failing, crashing or hanging rank fails the caller with its traceback."""
from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_rank(func: Callable, rank: int, world_size: int, backend: str, port: int, timeout_s: float,
              results, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))  # as torchrun: no oversubscription
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
        results.put((rank, True, func(rank, world_size, *args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is already reported
        pass


def run_distributed(func: Callable, world_size: int = 2, backend: str = "gloo", timeout_s: float = 120.0,
                    args: tuple = (), child_processes: bool = False) -> list[Any]:
    """func(rank, world_size, *args) must be module-level (picklable) and return a picklable value.
    Returns the values in rank order; raises RuntimeError if a rank fails or dies, TimeoutError
    after `timeout_s`. `child_processes`: the ranks may start processes of their own (as
    megatron-core's checkpoint writer does), so they are not daemonic; they are still killed
    when they outlive the call."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = find_free_port()
    procs = [ctx.Process(target=_run_rank, args=(func, rank, world_size, backend, port, timeout_s, results, args),
                         daemon=not child_processes)
             for rank in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    values: dict[int, Any] = {}
    finished = False
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{func.__name__}: ranks {sorted(set(range(world_size)) - set(values))} "
                                   f"did not finish within {timeout_s:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue_module.Empty:
                for rank, proc in enumerate(procs):
                    if rank not in values and proc.exitcode not in (None, 0):
                        raise RuntimeError(f"{func.__name__}: rank {rank} died with exit code {proc.exitcode}")
                continue
            if not ok:
                raise RuntimeError(f"{func.__name__}: rank {rank} failed:\n{value}")
            values[rank] = value
        finished = True
    finally:
        for proc in procs:  # after a failure the other ranks may hang in a collective: no waiting
            proc.join(timeout=max(0.0, min(10.0, deadline - time.monotonic())) if finished else 0.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [values[rank] for rank in range(world_size)]
