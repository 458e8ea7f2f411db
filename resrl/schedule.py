"""Which RL steps do what: the due-rules of a run, in one place.

Step 0 is the policy before RL; steps 1..`trainer.steps` are RL steps. The last step is always
evaluated and checkpointed, whatever the cadence.
"""
from __future__ import annotations


def eval_due(step: int, cfg) -> bool:
    """Held-out evaluation after `step`: at step 0, every `eval.every` steps and at the last step."""
    return step == 0 or step % cfg.eval.every == 0 or step == cfg.trainer.steps


def missed_eval(step: int, evaluated: list[int], cfg) -> bool:
    """On (re)starting at committed step `step`: its evaluation was due but never recorded
    (step 0, or an interruption between the commit and the evaluation)."""
    return eval_due(step, cfg) and step not in evaluated


def checkpoint_due(step: int, cfg) -> bool:
    """A checkpoint (and a commit of state.json) after RL step `step`."""
    return step % cfg.run.checkpoint_every == 0 or step == cfg.trainer.steps


def diagnostics_due(step: int, algorithm_cfg) -> bool:
    """The likelihood-displacement diagnostics in RL step `step` (resrl/displacement.py)."""
    return step % algorithm_cfg.diagnostics_every == 0
