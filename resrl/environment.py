"""Environment variables resrl sets when the user has not: the one place that lists them.

Each is a default (`os.environ.setdefault`): a value the user exported wins.
"""
from __future__ import annotations

import ctypes
import os
import socket
import sys

# Needed for correctness, also when the library is used without the CLI.
ENGINE_DEFAULTS = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # vLLM's engine core in this process: weights sync in memory
}

# Quiet and offline: what the CLI (and the test suite) run with.
PROCESS_DEFAULTS = {
    **ENGINE_DEFAULTS,
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "VLLM_LOGGING_LEVEL": "ERROR",          # its CPU warnings repeat at every weight sync
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",                  # nothing is downloaded unless the user opts in
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "resrl",  # resrl's own log lines (e.g. a wait for a cache entry) in the flow's log
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # ... and outside a flow run just on the console
    # Prefect's temporary server gets 20 s to answer; 8 runs starting at once on 2 cores needed more
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}


# glibc's malloc: keep freed memory for reuse rather than hand it back to the kernel. A training step
# allocates and frees the same few-MB activations in every micro-batch; by default glibc serves
# such blocks with mmap and returns them on free, so every reuse page-faults them in again
# (17,000-44,000 faults per update of the embedded default, README "Measured").
# (name of glibc's variable, mallopt's parameter number for it, value)
MALLOC_DEFAULTS = (
    ("MALLOC_MMAP_THRESHOLD_", -3, 32 << 20),  # blocks below 32 MiB from the heap (glibc's largest threshold)
    ("MALLOC_TRIM_THRESHOLD_", -1, 1 << 30),   # keep up to 1 GiB of free heap instead of trimming it
)


def keep_freed_memory() -> list[str]:
    """Apply MALLOC_DEFAULTS to this process (mallopt: glibc reads the variables only at its first
    allocation) and, as variables, to the processes it starts; a variable the user set wins (and
    was already read). Returns the variables applied; none off glibc (e.g. musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return []
    applied = []
    for name, param, value in MALLOC_DEFAULTS:
        if name not in os.environ and mallopt(param, value) == 1:
            os.environ[name] = str(value)
            applied.append(name)
    return applied


def _set_defaults(values: dict[str, str]) -> None:
    for key, value in values.items():
        os.environ.setdefault(key, value)


def set_process_defaults() -> None:
    """For a whole process (the CLI, the tests): before anything heavy is imported."""
    _set_defaults(PROCESS_DEFAULTS)
    keep_freed_memory()


def set_engine_defaults() -> None:
    """Before a vLLM engine is built."""
    _set_defaults(ENGINE_DEFAULTS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_single_process_world(device: str) -> None:
    """torch.distributed's variables for a world of this one process, unless a launcher set them."""
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    _set_defaults({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("MASTER_PORT", str(free_port()))  # looked for only when none is set
