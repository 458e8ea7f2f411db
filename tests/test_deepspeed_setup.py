"""DeepSpeed's CPU start builds nothing: its shared-memory comm op (gcc, ~40 s on a new machine,
used only by tensor-parallel inference) is kept out of the trainer's process group."""
import os
import subprocess
import sys
import textwrap

import pytest


@pytest.mark.slow  # a fresh process importing the whole stack
def test_trainer_start_builds_no_deepspeed_op(tmp_path, micro_model):
    ext = tmp_path / "torch_extensions"  # an empty extension cache: DeepSpeed would build its op into it
    code = textwrap.dedent(f"""
        from resrl.environment import set_process_defaults
        set_process_defaults()
        import torch
        from resrl.config import load_config
        from resrl.trainer import PolicyTrainer
        cfg = load_config(None, ["trainer.device=cpu", "rollout.prompts_per_step=2", "rollout.n=2"])
        PolicyTrainer({str(micro_model)!r}, cfg, rollout_batch_size=4)
        import deepspeed.comm.comm as dsc
        assert torch.distributed.is_initialized()
        print("shm op:", dsc.cdb.shm_comm_op)
    """)
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "shm op: None" in out.stdout
    assert not ext.exists() or not any(ext.rglob("*.so")), "DeepSpeed built an op"
