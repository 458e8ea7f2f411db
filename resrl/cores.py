"""A share of the machine's cores for each of several processes that run at once: the lanes of
a sweep (flows/sweep.py) and the data-parallel ranks of one machine (resrl/ranks.py).

Left alone, every such process sizes its OpenMP/torch thread pool to all cores; two of them on 2
cores then keep 4 runnable threads spinning and slow each other 5-10x, not 2x (../shared/STACK.md).
Each process instead gets `cores // processes` cores of its own - disjoint sets where there are
enough cores - and as many threads:

- `core_share` computes a process's share (pure: which cores, how many threads);
- `CoreShare.env()` the environment that carries it to a child process: OMP_NUM_THREADS,
  MKL_NUM_THREADS, VLLM_CPU_OMP_THREADS_BIND (vLLM's CPU core list, e.g. "0-3" or "0,2"; read by
  vLLM's multiprocessing executor - resrl's in-process engine runs on this process's own threads,
  so the first two and the affinity are what bind it), and RESRL_CORES;
- `apply_share` / `apply_from_env`, in the child: torch's intra-op threads (before a vLLM engine
  is built: vLLM's CPU worker then disables torch.set_num_threads) and the CPU affinity of every
  thread of the process (os.sched_setaffinity, where the platform has it).

RESRL_PIN_CORES=0 turns all of it off (the processes then share every core, as before).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "RESRL_CORES")


def enabled() -> bool:
    return os.environ.get("RESRL_PIN_CORES", "1") != "0"


def id_list(cores) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the format of vLLM's VLLM_CPU_OMP_THREADS_BIND and of taskset -c)."""
    out, run = [], []
    for c in sorted(cores):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def parse_id_list(text: str) -> tuple[int, ...]:
    """"0-2,5" -> (0, 1, 2, 5)."""
    cores: list[int] = []
    for part in text.split(","):
        if "-" in part:
            a, b = part.split("-")
            cores += range(int(a), int(b) + 1)
        elif part.strip():
            cores.append(int(part))
    return tuple(cores)


@dataclass(frozen=True)
class CoreShare:
    cores: tuple[int, ...]  # the cores this process may run on
    threads: int            # its torch / OpenMP / MKL thread count

    def env(self) -> dict[str, str]:
        ids = id_list(self.cores)
        return {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads),
                "VLLM_CPU_OMP_THREADS_BIND": ids, "RESRL_CORES": ids}


def available_cores() -> list[int]:
    """The cores this process may use (its affinity: taskset, cgroups), else all of them."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def user_thread_cap() -> int | None:
    """OMP_NUM_THREADS as the user exported it (RESRL_THREAD_CAP where a launcher replaced it for
    the ranks): a share never gets more threads than that."""
    value = os.environ.get("RESRL_THREAD_CAP", os.environ.get("OMP_NUM_THREADS", ""))
    return int(value) if value.isdigit() and int(value) >= 1 else None


def launcher_env(processes: int) -> dict[str, str]:
    """What a launcher of `processes` ranks on this machine adds to their environment: the
    user's thread cap kept aside (torchrun would otherwise set OMP_NUM_THREADS=1 for all ranks)
    and a first OpenMP thread count of cores // processes; each rank then takes its own share."""
    if not enabled() or processes <= 1:
        return {}
    cap = user_thread_cap()
    threads = max(1, len(available_cores()) // processes)
    return {"RESRL_THREAD_CAP": str(cap or 0), "OMP_NUM_THREADS": str(min(threads, cap or threads))}


def core_share(index: int, count: int, cores: list[int], cap: int | None = None) -> CoreShare:
    """Process `index` of `count` on `cores`: a contiguous block of len(cores) // count cores (the
    first len(cores) % count processes take one more), disjoint from the others' blocks. With more
    processes than cores, each gets one core (shared round-robin). Threads: the block's size,
    at most `cap`."""
    if not 0 <= index < count:
        raise ValueError(f"process {index} of {count}")
    if not cores:
        raise ValueError("no cores to share")
    n = len(cores)
    if count <= n:
        base, extra = divmod(n, count)
        start = index * base + min(index, extra)
        mine = tuple(cores[start:start + base + (1 if index < extra else 0)])
    else:
        mine = (cores[index % n],)
    threads = len(mine) if cap is None else max(1, min(cap, len(mine)))
    return CoreShare(mine, threads)


@contextlib.contextmanager
def environ(values: dict[str, str]):
    """os.environ with `values` for the block (a child started inside it inherits them from its
    first instruction on, before its OpenMP runtime reads OMP_NUM_THREADS), restored after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def apply_share(share: CoreShare) -> None:
    """In the process that owns `share`: its environment, torch's thread count and the affinity
    of all its threads (new threads inherit it)."""
    import torch

    os.environ.update(share.env())
    torch.set_num_threads(share.threads)
    if hasattr(os, "sched_setaffinity"):
        tids = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
        for tid in tids:
            with contextlib.suppress(OSError):  # a thread that ended meanwhile; a core we may not use
                os.sched_setaffinity(int(tid), share.cores)


def apply_from_env() -> CoreShare | None:
    """Apply the share a parent handed down in RESRL_CORES / OMP_NUM_THREADS (a sweep lane); None
    when there is none."""
    ids = os.environ.get("RESRL_CORES")
    if not ids or not enabled():
        return None
    share = CoreShare(parse_id_list(ids), user_thread_cap() or len(parse_id_list(ids)))
    apply_share(share)
    return share


def local_rank_share() -> CoreShare | None:
    """The share of this data-parallel rank among the ranks of its machine (torchrun's LOCAL_RANK /
    LOCAL_WORLD_SIZE), or None for a single process or with RESRL_PIN_CORES=0."""
    size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if size <= 1 or not enabled():
        return None
    return core_share(int(os.environ.get("LOCAL_RANK", "0")), size, available_cores(), cap=user_thread_cap())
