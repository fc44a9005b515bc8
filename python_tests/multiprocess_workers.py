"""Runs a test's worker function in several gloo processes on 127.0.0.1, bounded in time.

The worker is ``target(rank, port, out_dir, *args)``; it writes ``rank<r>.pt`` into
``out_dir`` and, on an exception, its traceback into ``rank<r>.err``.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
from typing import NoReturn

import torch

JOIN_TIMEOUT_S = 120


def leave_process_group_and_exit() -> NoReturn:
    """The workers' last call, once their results are saved.

    The barrier keeps a rank from tearing gloo down while another still talks to it. The process
    then ends without interpreter finalization: after DDP or FSDP2 the gloo process group outlives
    ``destroy_process_group`` (its threads still run), and its destructor during finalization can
    abort the process (exit -6, "terminate called without an active exception"; pytorch#179291).
    It did so, rarely, in loaded CI runs, after every rank had written its results.
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, world: int, out_dir: str, *args) -> list:
    """Runs ``world`` workers (spawned: no state forked from pytest) and returns each rank's saved results.

    It runs once more, on a fresh port, when the port, probed free and then released, was taken
    before the rank-0 store bound it ("address already in use"): that failure is the harness's.
    Any other failure, a crash after a rank's results included, fails the test.
    """
    errors = _run(target, world, out_dir, args)
    if any("address already in use" in error.lower() for error in errors):
        errors = _run(target, world, out_dir, args)
    assert not errors, "\n".join(errors)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt"), weights_only=True) for rank in range(world)]


def _run(target, world: int, out_dir: str, args: tuple) -> list[str]:
    """One attempt: the ranks' error reports, with a rank that did not exit cleanly counted as one."""
    for name in os.listdir(out_dir):
        os.remove(os.path.join(out_dir, name))
    context = multiprocessing.get_context("spawn")
    port = free_port()
    workers = [context.Process(target=target, args=(rank, port, out_dir, *args)) for rank in range(world)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(JOIN_TIMEOUT_S)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
    if not errors and not all(w.exitcode == 0 for w in workers):
        errors.append(f"worker exit codes {[w.exitcode for w in workers]} (timeout {JOIN_TIMEOUT_S}s?)")
    return errors
