"""Start ``world_size`` local processes with a torch.distributed process group, or join one.

:func:`launch` is the test-and-notebook launcher: it spawns one process per rank (``spawn``
start method, so CUDA and ORT state are never forked), picks a free TCP port on 127.0.0.1,
sets ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, initialises the
default group, runs ``fn(rank, world_size, *args)``, meets the other ranks at a barrier and
destroys the group. Each rank answers over its own pipe: the pickled return value as soon as
``fn`` returns, then "closed" after tear-down, or the formatted traceback of any failure. The
parent waits on all pipes until one deadline; on the first failure, a rank that dies without
answering, or the deadline, it stops every rank (SIGTERM, then SIGKILL) and raises
:class:`DistributedError` with one readable line followed by the failing rank's traceback. A
rank still running at the deadline is first asked (SIGUSR1, ``faulthandler``) to write its
Python stack, so the error says where it was blocked.

:func:`init_from_env` is the same set-up for scripts started by ``torchrun``.
"""

from __future__ import annotations

import faulthandler
import importlib
import importlib.util
import logging
import multiprocessing as mp
import os
import pickle
import signal
import socket
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from graphpress.graph.errors import DistributedError

__all__ = ["DistributedError", "launch", "init_from_env"]

logger = logging.getLogger(__name__)

_PORT_TAKEN = ("address already in use", "eaddrinuse")


def launch(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0,
           backend: str = "gloo") -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` local ranks; return their results.

    ``fn`` and ``args`` must be picklable (a module-level function). Each rank uses one
    intra-op thread. Raises :class:`DistributedError` (all ranks stopped) when a rank raises,
    dies, or the whole run exceeds ``timeout`` seconds.
    """
    if world_size < 1:
        raise DistributedError(f"world_size must be at least 1, got {world_size}")
    for attempt in range(2):
        try:
            return _launch_once(fn, world_size, args, timeout, backend)
        except DistributedError as exc:  # another process took the port between pick and bind
            if attempt or not any(m in str(exc).lower() for m in _PORT_TAKEN):
                raise
            logger.info("port was taken before the ranks bound it; retrying once")
    raise AssertionError("unreachable")


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default group from torchrun's environment; return ``(rank, world_size)``.

    ``backend=None`` picks gloo for CPU tensors plus NCCL for CUDA tensors when CUDA is
    present. On CUDA the rank's device is set to ``LOCAL_RANK``. An already initialised group
    is reused.
    """
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(
            f"environment variables {missing} are not set; start this script with torchrun, "
            "e.g. 'torchrun --nproc-per-node 4 script.py', or use launch() from Python"
        )
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend, rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))
    return dist.get_rank(), dist.get_world_size()


def _launch_once(fn: Callable[..., Any], world: int, args: tuple, timeout: float,
                 backend: str) -> list[Any]:
    ctx = mp.get_context("spawn")
    port = _free_port()
    try:  # pickled here, so the rank can first import fn's module by path (see _import_origin)
        payload = pickle.dumps((fn, args))
    except Exception as exc:
        raise DistributedError(f"launch could not pickle fn or its arguments: {exc}; pass a "
                               "module-level function and picklable arguments") from None
    module = getattr(fn, "__module__", None)
    origin = (module, getattr(sys.modules.get(module or ""), "__file__", None))
    with tempfile.TemporaryDirectory(prefix="graphpress-dist-") as tmp:
        # Through a file, not the Process arguments: a spawn child unpickles those only after
        # importing graphpress, and a large payload would block start() until it has.
        (Path(tmp) / "payload.pkl").write_bytes(payload)
        procs, readers = [], {}
        try:
            for rank in range(world):
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_rank_main, name=f"graphpress-rank-{rank}",
                                   args=(origin, rank, world, port, backend, timeout, writer,
                                         tmp), daemon=True)
                proc.start()
                writer.close()  # the parent keeps only the reading end: EOF = the rank died
                procs.append(proc)
                readers[reader] = rank
            results = _collect(procs, readers, timeout, Path(tmp))
            for proc in procs:  # every rank answered after tearing down: let them exit
                proc.join(2.0)
            return results
        finally:
            _stop(procs)
            for reader in readers:
                reader.close()


def _collect(procs: list, readers: dict, timeout: float, tmp: Path) -> list[Any]:
    """Read each rank's result, then its "closed" after teardown, until the deadline."""
    world, results, deadline = len(procs), {}, time.monotonic() + timeout
    pending = dict(readers)
    while pending:
        ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            running = sorted(r for r in pending.values() if r not in results)
            waiting = sorted(r for r in pending.values() if r in results)
            stacks = _dump_stacks(procs, running or waiting, tmp)
            raise DistributedError(
                f"distributed run timed out after {timeout:g} s: rank(s) {running or waiting} "
                f"of {world} did not finish (returned and waiting for them: {waiting}); look "
                f"for a rank blocked in a collective or a send without its recv, or raise "
                f"timeout=\n{stacks}".rstrip())
        for reader in ready:
            rank = pending[reader]
            try:
                status, payload = pickle.loads(reader.recv_bytes())
            except (EOFError, OSError):
                procs[rank].join(2)
                raise DistributedError(
                    f"rank {rank} of {world} died without a result (exit code "
                    f"{procs[rank].exitcode}); the other ranks were stopped. A negative code is "
                    "the signal that killed it (e.g. -9: out of memory)") from None
            if status == "error":
                summary, payload = payload
                raise DistributedError(
                    f"rank {rank} of {world} failed: {summary}; the other ranks were stopped. "
                    f"Traceback of rank {rank}:\n{payload}".rstrip())
            if status == "ok":
                results[rank] = payload
            else:  # "closed": the group is torn down on this rank
                del pending[reader]
    return [results[r] for r in range(world)]


def _rank_main(origin: tuple[str | None, str | None], rank: int, world: int, port: int,
               backend: str, timeout: float, writer: Any, tmp: str) -> None:
    """Body of one spawned rank: set up, run ``fn``, tear down, answer (never raises)."""
    stack_file = open(Path(tmp) / f"rank{rank}.stack", "w")  # noqa: SIM115 (lives until exit)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, file=stack_file, all_threads=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        _import_origin(*origin)
        fn, args = pickle.loads((Path(tmp) / "payload.pkl").read_bytes())
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=max(timeout, 1.0)))
        writer.send_bytes(pickle.dumps(("ok", fn(rank, world, *args))))
        dist.barrier()  # rank 0 hosts the store: nobody leaves while others still use it
        dist.destroy_process_group()
        writer.send_bytes(pickle.dumps(("closed", None)))
    except BaseException as exc:  # report everything, KeyboardInterrupt and SystemExit too
        lines = str(exc).strip().splitlines()
        summary = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
        writer.send_bytes(pickle.dumps(("error", (summary, traceback.format_exc()))))
    writer.close()


def _import_origin(module: str | None, path: str | None) -> None:
    """Make ``fn``'s module importable by name, loading it from ``path`` if need be.

    Test modules imported by pytest's ``importlib`` mode (``tests.export.test_x``) are not on
    ``sys.path`` unless pytest runs as ``python -m pytest`` from the repository root.
    """
    if not module or module == "__main__" or path is None:
        return
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    parts = module.split(".")
    for i in range(1, len(parts)):  # empty parents, so pickle's __import__ finds the name
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:
        return
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[module] = loaded
    spec.loader.exec_module(loaded)


def _dump_stacks(procs: list, ranks: list[int], tmp: Path) -> str:
    """Ask still-running ranks for their Python stacks (SIGUSR1 → faulthandler)."""
    if not hasattr(signal, "SIGUSR1"):
        return ""
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.5)
    parts = []
    for rank in ranks:
        path = tmp / f"rank{rank}.stack"
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        if text:
            parts.append(f"Stack of rank {rank}:\n{text}")
    return "\n".join(parts)


def _stop(procs: list) -> None:
    """Terminate every rank still alive, then kill those that ignore SIGTERM; reap all."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 3.0
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(2.0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
