"""resrl.environment: glibc keeps freed memory for reuse (MALLOC_DEFAULTS), so a step's
re-allocated activations do not page-fault again; a value the user exported wins."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from resrl.environment import MALLOC_DEFAULTS

ROUNDS, TENSORS, PAGES = 20, 10, 1024  # 4 MiB tensors: 1,024 pages each
# In a fresh process: apply the defaults, then ROUNDS times make TENSORS 4 MiB tensors alive at once
# and free them all (as each micro-batch does with its activations); count the minor page faults.
PROBE = """
import json, os, resource, sys
from resrl.environment import set_process_defaults
set_process_defaults()
import torch
a = torch.ones(1 << 20)
def micro_batch():
    xs = [a + i for i in range(%d)]
    del xs
micro_batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(%d):
    micro_batch()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "env": {k: os.environ.get(k) for k in %r}}))
""" % (TENSORS, ROUNDS, [name for name, _, _ in MALLOC_DEFAULTS])


def probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **env_extra}, capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def transparent_huge_pages_always() -> bool:
    """With THP `always`, a 4 MiB block faults in as two huge pages: the counts below assume 4 KiB ones."""
    try:
        return "[always]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.skipif(transparent_huge_pages_always(), reason="transparent huge pages: faults are not per 4 KiB page")
def test_freed_memory_is_reused_without_page_faults():
    tuned = probe({})
    assert tuned["env"] == {name: str(value) for name, _, value in MALLOC_DEFAULTS}  # children inherit them
    every_page = ROUNDS * TENSORS * PAGES
    assert tuned["faults"] < every_page / 10  # the rounds reuse the first one's pages (glibc's default: 25,000)
    # glibc's initial settings, exported by the user (they win): each 4 MiB block is mmapped and
    # returned on free, so every allocation faults its pages in again
    plain = probe({"MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "MALLOC_TRIM_THRESHOLD_": str(128 * 1024)})
    assert plain["env"]["MALLOC_MMAP_THRESHOLD_"] == str(128 * 1024)
    assert plain["faults"] > every_page * 0.9
