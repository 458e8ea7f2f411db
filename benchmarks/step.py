"""One RL step by stage: resrl's default run beside TRL's GRPOTrainer doing the same work.

    python benchmarks/step.py [--steps 5] [--warmup 2] [--skip-trl] [--config conf/default.yaml] [key=value ...]

Both sides start from the same warm-started policy (the config's, built and cached if needed) and
run RL steps 1 .. warmup+steps on the same prompts: TRL's training set is the list of train rows
resrl's session drew for those steps, in that order, with TRL's shuffling off. Same batch (prompts x
samples per prompt), optimizer steps per RL step (`trainer.mini_batches` x `epochs`, as TRL's
`steps_per_generation` / `gradient_accumulation_steps` / `num_iterations`), micro-batch, max new
tokens, temperature / top-p / top-k, PPO clip (and verl's dual clip as TRL's `delta`), token-mean
loss (TRL's `dapo`), no KL, and the optimizer: torch AdamW with the same lr, betas, eps, weight
decay and linear warm-up (handed to TRL's trainer as `optimizers=`), gradient clipping. TRL samples
with Hugging Face `generate` (`use_vllm=False`) and is rewarded by resrl's own verifier (the
config's reward function, called through `resrl.evaluation.score_samples`).

resrl runs in this project's .venv: a `TrainingSession` (the flow's live rollout engine and DeepSpeed
trainer) called as the flow's tasks call it, without Prefect or MLflow, with the run-folder I/O the
flow does per step (rollouts file written and read back, checkpoint, manifest). TRL runs in its own
virtual environment, `.cache/bench-trl-venv`, made on first use: it reads this .venv's
site-packages (a .pth file calling `site.addsitedir`), so only trl and what the .venv lacks
(accelerate) are installed into it. Each side runs in a child process of its own, one after the
other; its peak RSS is the child's (wait4).

Stages (seconds; median over the measured steps, after the warm-up steps):

- rollout: sampling (resrl: the config's `rollout.backend`, on the CPU `auto` = HF generate; TRL: HF
  generate), the verifier, building the batch
  (resrl's `time/rollout_s`; TRL: `_generate` + `_calculate_rewards`);
- old log-probs: the no-grad scoring pass before the update (resrl: `PolicyTrainer.score`, with
  ResRL's hidden states and token weights; TRL: its no-grad `_get_per_token_logps_and_entropies`);
- update: the loss passes and optimizer steps (resrl: `time/update_s` less the scoring pass and
  the diagnostics; TRL: the RL step less the two above, so also its advantages and bookkeeping);
- weight sync: the new weights into the sampler (`time/weight_sync_s`; TRL samples from the model itself);
- RL step: the wall time of the above, each step (resrl: rollout + update + sync, without the
  diagnostics; TRL: from the first optimizer step's begin to the last one's end); its median, and
  the ratio resrl / TRL;
- run-folder I/O: what the flow adds to every step (rollouts file, checkpoint, manifest);
- diagnostics: the displacement diagnostics, every `algorithm.diagnostics_every` steps (from a step
  that ran them; one extra step if none of the measured ones did);
- evaluation: one held-out evaluation (`time/eval_s`), every `eval.every` steps;
- a step as a default run pays it: RL step + I/O + diagnostics and evaluations spread over the
  run's `trainer.steps` (Prefect's and MLflow's own costs are not counted).

What stays different: the advantages (TRL has GRPO's group-normalized ones; resrl runs the config's
algorithm, ResRL by default: add `algorithm.name=grpo` to compare like with like, the compute
differs by ResRL's token weights, ~1 % of an update), the sampler (resrl's
Gumbel-max sampler that also keeps hidden states, or vLLM with `rollout.backend=vllm`), resrl's update
running each group's prompt once (`trainer.share_prompts`; TRL runs it in every sample), TRL's token-mean normalizer (the generation batch's token count over its optimizer steps,
resrl's each mini-batch's own), resrl's scoring pass also computing entropy and hidden states, and
the samples themselves (each side's own random draws, so response lengths differ a little: the
table prints them). TRL's process has vLLM and DeepSpeed hidden (`pip install trl` brings neither).

The timings come from what the session already logs (time/rollout_s, time/update_s,
time/weight_sync_s, time/eval_s) plus this script's wrappers around `PolicyTrainer.score`,
`negative_interference` and `positive_logp` (instance attributes, set here); nothing in the
library is changed. Run it on a quiet machine: each side uses all cores in turn (both use torch's
default thread count, or OMP_NUM_THREADS when set). The first run also builds what is missing:
the warm-start (the default's is copied from its published build, resrl/published.py; another
config's is trained, ~3 min on 2 quiet cores; cached in run.cache_dir) and the TRL venv (~2 min).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from resrl.environment import set_process_defaults  # noqa: E402

set_process_defaults()  # before vLLM is imported

TRL_VERSION = "1.16.0"
TRL_VENV = ROOT / ".cache" / "bench-trl-venv"
STAGES = ("rollout", "old_logp", "update", "weight_sync")
LABELS = {"rollout": "rollout (sampling + verifier)", "old_logp": "old log-probs (scoring pass)",
          "update": "update (loss passes + optimizer)", "weight_sync": "weight sync to the sampler",
          "step": "RL step", "io": "run-folder I/O (rollouts, checkpoint)"}


# ----------------------------------------------------------------------------- the two workers

def _clock(obj, name: str, spent: Counter, stage: str, when=None) -> None:
    """Add the seconds of every call of `obj.name` (when `when()` holds) to spent[stage]."""
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        if when is not None and not when():
            return inner(*args, **kwargs)
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - t
    setattr(obj, name, timed)


def run_resrl(job: dict) -> dict:
    """resrl's session, steps 1 .. warmup+steps as the flow runs them, then diagnostics and an evaluation."""
    import torch

    from resrl.batch import RolloutBatch
    from resrl.checkpoint import checkpoint_dir, prune_checkpoints, write_manifest
    from resrl.config import load_config
    from resrl.run_state import rollout_path
    from resrl.schedule import diagnostics_due
    from resrl.session import TrainingSession

    cfg = load_config(job["config"], job["overrides"])
    prepared, rdir = job["prepared"], Path(job["tmp"]) / "resrl-run"
    t0 = time.perf_counter()
    session = TrainingSession(cfg, prepared, prepared["policy_dir"], None)
    start = time.perf_counter() - t0
    spent: Counter = Counter()
    _clock(session.trainer, "score", spent, "old_logp")
    _clock(session.trainer, "negative_interference", spent, "diagnostics")
    _clock(session.trainer, "positive_logp", spent, "diagnostics")

    def one_step(step: int) -> dict:
        spent.clear()
        t = time.perf_counter()
        batch, roll = session.rollout(step)
        rollout_wall = time.perf_counter() - t
        t = time.perf_counter()  # the flow's rollout task writes the batch, its update task reads it
        batch = RolloutBatch.load(batch.save(rollout_path(rdir, step)))
        io = time.perf_counter() - t
        t = time.perf_counter()
        upd = session.update(step, batch)
        update_wall = time.perf_counter() - t
        t = time.perf_counter()  # the checkpoint and its commit, as flows/train.py does every step
        ckpt = checkpoint_dir(rdir, step)
        session.save_checkpoint(ckpt, step)
        write_manifest(ckpt, step, mlflow_run_id="benchmark", config_hash="benchmark")
        prune_checkpoints(rdir, cfg.run.keep_checkpoints, committed=step)
        io += time.perf_counter() - t
        return {"rollout": roll["time/rollout_s"], "old_logp": spent["old_logp"],
                "update": upd["time/update_s"] - spent["old_logp"] - spent["diagnostics"],
                "weight_sync": upd["time/weight_sync_s"], "diagnostics": spent["diagnostics"],
                "step": rollout_wall + update_wall - spent["diagnostics"], "io": io,
                "reward": roll["train/reward_mean"], "length": roll["train/response_length"],
                "diagnosed": diagnostics_due(step, cfg.algorithm)}

    n = job["warmup"] + job["steps"]
    steps, indices = [], []
    for step in range(1, n + 1):
        indices.append(session.prompt_indices(step))
        steps.append(one_step(step))
        print(f"resrl step {step}/{n}: {steps[-1]['step']:.2f} s", flush=True)
    extras: dict = {}
    if not job["skip_extras"]:
        diagnosed = [s["diagnostics"] for s in steps[job["warmup"]:] if s["diagnosed"]]
        if diagnosed:
            extras["diagnostics"] = statistics.median(diagnosed)
            extras["diagnostics_from"] = f"{len(diagnosed)} measured step(s)"
        else:  # the next step the schedule gives them to, run for them alone
            every = cfg.algorithm.diagnostics_every
            d = every * (n // every + 1)
            extras["diagnostics"] = one_step(d)["diagnostics"]
            extras["diagnostics_from"] = f"an extra step {d}"
        t = time.perf_counter()
        session.evaluate(n)
        extras["eval"] = time.perf_counter() - t
        held_out = len(session.test_set) if cfg.eval.num_prompts is None else cfg.eval.num_prompts
        extras["eval_shape"] = f"{min(held_out, len(session.test_set))} x {cfg.eval.k}"
    result = {"threads": torch.get_num_threads(), "start": start, "steps": steps, "indices": indices,
              "extras": extras, "sampler": type(session.engine).__name__}
    session.close()
    return result


TRL_LOSS = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "seq-mean-token-sum-norm": "dr_grpo"}


def run_trl(job: dict) -> dict:
    """TRL's GRPOTrainer on the prompts resrl drew, step for step; per-RL-step stage times."""
    # The venv sees the .venv's packages, vLLM and DeepSpeed among them; `pip install trl` has neither,
    # and TRL (is_vllm_available) and accelerate would import them (~160 MB, 400 modules) though
    # use_vllm=False and no DeepSpeed plugin use them: hidden, so this process is TRL's own stack.
    sys.modules["vllm"] = sys.modules["deepspeed"] = None
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from resrl.algorithms import get_algorithm
    from resrl.config import load_config
    from resrl.data import load_prepared
    from resrl.evaluation import score_samples
    from resrl.rewards import load_reward_function

    cfg = load_config(job["config"], job["overrides"])
    r, t, loss = cfg.rollout, cfg.trainer, cfg.loss
    train = load_prepared(Path(job["prepared"]["dataset_dir"]))["train"]
    rows = [train[i] for step in job["indices"] for i in step]
    cols = ("prompt", "answer", "data_source", "extra_info")
    dataset = datasets.Dataset.from_list([{c: row[c] for c in cols} for row in rows])
    policy = job["prepared"]["policy_dir"]
    tokenizer = AutoTokenizer.from_pretrained(policy)
    # TRL tokenizes the prompt text itself; resrl's prompt_token_ids came from the same text
    retokenized = sum(tokenizer(row["prompt"])["input_ids"] != list(row["prompt_token_ids"]) for row in rows)

    # the batch shape of resrl's DeepSpeed config: mini-batches of micro-batches
    batch = r.prompts_per_step * r.n
    mini = batch // t.mini_batches
    micro = min(t.micro_batch_size, mini)
    accumulation = -(-mini // t.micro_batch_size)
    if micro * accumulation * t.mini_batches != batch:
        raise SystemExit(f"batch {batch} does not split into {t.mini_batches} mini-batches of {accumulation} "
                         f"micro-batches of {micro}: pick rollout/trainer sizes that divide")
    agg = get_algorithm(cfg.algorithm.name).effective_loss_agg(loss.agg)
    opt_per_rl = t.mini_batches * t.epochs
    n = job["warmup"] + job["steps"]

    reward_fn = load_reward_function(cfg.reward.function)
    seen = {"reward": [], "length": []}

    def verifier(prompts, completions, completion_ids, answer, data_source, extra_info, **_):
        """resrl's verifier, as its rollouts call it (a failing call scores 0, too many fail the step)."""
        scored_rows = [{"answer": a, "data_source": s, "extra_info": e}
                       for a, s, e in zip(answer, data_source, extra_info)]
        scores, _ = score_samples(reward_fn, scored_rows, [[(ids, text)] for ids, text in
                                                           zip(completion_ids, completions)],
                                  cfg.reward.max_error_fraction)
        seen["reward"].append(sum(scores) / len(scores))
        seen["length"].append(sum(map(len, completion_ids)) / len(completion_ids))
        return scores

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.adam_eps,
                            weight_decay=t.weight_decay)
    warm = max(1, t.warmup_steps * opt_per_rl)  # resrl's warmup_schedule: linear, then constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    args = GRPOConfig(
        output_dir=str(Path(job["tmp"]) / "trl-out"), report_to="none", save_strategy="no",
        logging_steps=10**6, disable_tqdm=True, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, use_vllm=False, seed=cfg.seed, shuffle_dataset=False,
        dataloader_num_workers=0, remove_unused_columns=False, log_completions=False,
        max_steps=n * opt_per_rl,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation * t.mini_batches, num_iterations=t.epochs, num_generations=r.n,
        max_completion_length=r.max_tokens, temperature=r.temperature, top_p=r.top_p,
        top_k=r.top_k if r.top_k > 0 else 0,
        loss_type=TRL_LOSS.get(agg, "dapo"), mask_truncated_completions=False,
        scale_rewards="none" if cfg.algorithm.name == "dr_grpo" else "group",
        epsilon=loss.clip_low, epsilon_high=loss.clip_high, delta=loss.dual_clip,
        beta=loss.kl_coef, entropy_coef=loss.entropy_coef,
        learning_rate=t.lr, adam_beta1=t.betas[0], adam_beta2=t.betas[1], adam_epsilon=t.adam_eps,
        weight_decay=t.weight_decay, max_grad_norm=t.grad_clip)

    spent: Counter = Counter()
    steps: list[dict] = []

    class StepClock(TrainerCallback):
        """An RL step is `opt_per_rl` optimizer steps: from the first one's begin to the last one's end."""
        began = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % opt_per_rl == 0:
                spent.clear()
                self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % opt_per_rl == 0:
                wall = time.perf_counter() - self.began
                rollout = spent["generate"] + spent["reward"]
                steps.append({"rollout": rollout, "old_logp": spent["old_logp"],
                              "update": wall - rollout - spent["old_logp"], "step": wall,
                              "reward": seen["reward"][-1], "length": seen["length"][-1]})
                print(f"TRL step {len(steps)}/{n}: {wall:.2f} s", flush=True)

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=model, reward_funcs=[verifier], args=args, train_dataset=dataset,
                          processing_class=tokenizer, optimizers=(opt, sched), callbacks=[StepClock()])
    start = time.perf_counter() - t0
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict of metrics
    _clock(trainer, "_generate", spent, "generate")
    _clock(trainer, "_calculate_rewards", spent, "reward")
    _clock(trainer, "_get_per_token_logps_and_entropies", spent, "old_logp", when=lambda: not torch.is_grad_enabled())
    trainer.train()
    return {"threads": torch.get_num_threads(), "start": start, "steps": steps, "trl": trl.__version__,
            "retokenized": retokenized, "loss_type": f"{args.loss_type} (resrl's {agg})",
            "shape": f"per_device_train_batch_size {micro}, gradient_accumulation_steps {accumulation}, "
                     f"steps_per_generation {args.steps_per_generation}, num_iterations {t.epochs}"}


# ----------------------------------------------------------------------------- TRL's environment

def trl_python() -> Path:
    """The TRL venv's interpreter; the venv is made (and trl installed) when missing."""
    import sysconfig

    python = TRL_VENV / "bin" / "python"
    check = [str(python), "-c", "import trl, accelerate; print(trl.__version__)"]
    if python.exists():
        got = subprocess.run(check, capture_output=True, text=True)
        if got.returncode == 0 and got.stdout.strip() == TRL_VERSION:
            return python
    print(f"making {TRL_VENV} (trl {TRL_VERSION} over {sys.prefix}'s packages) ...", flush=True)
    if not python.exists():  # no pip or setuptools of its own: they would shadow the .venv's
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(TRL_VENV)], check=True)
    own = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    # addsitedir (not a bare path line) so the .venv's own .pth files are read too
    Path(own, "resrl_venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_paths()['purelib']!r})\n")
    # the .venv's pip installs into the new venv what it lacks, seeing the .venv's packages through the .pth
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    f"trl=={TRL_VERSION}"], check=True)
    got = subprocess.run(check, capture_output=True, text=True)
    if got.returncode != 0 or got.stdout.strip() != TRL_VERSION:
        raise SystemExit(f"trl {TRL_VERSION} does not import in {TRL_VENV}:\n{got.stderr}")
    return python


# ----------------------------------------------------------------------------- the parent

def run_worker(python: Path, kind: str, job: dict) -> tuple[dict, float]:
    """Run one side in a child process; returns its result and its peak RSS in GiB."""
    path = Path(job["tmp"]) / f"{kind}.json"
    job_file = Path(job["tmp"]) / f"{kind}-job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker", kind, "--job", str(job_file),
                             "--result", str(path)], env=env)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: its peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {kind} side failed (exit {proc.returncode})")
    return json.loads(path.read_text()), usage.ru_maxrss / (1 << 20)


def median(steps: list[dict], key: str) -> float:
    return statistics.median(s[key] for s in steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config")
    ap.add_argument("--steps", type=int, default=5, help="measured RL steps (default 5)")
    ap.add_argument("--warmup", type=int, default=2, help="RL steps run first and not counted (default 2)")
    ap.add_argument("--skip-trl", action="store_true", help="resrl's side only")
    ap.add_argument("--skip-extras", action="store_true", help="no diagnostics step and no evaluation")
    ap.add_argument("overrides", nargs="*", help="config overrides, key=value (applied to both sides)")
    ap.add_argument("--worker", choices=("resrl", "trl"), help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        job = json.loads(Path(args.job).read_text())
        result = (run_resrl if args.worker == "resrl" else run_trl)(job)
        Path(args.result).write_text(json.dumps(result))
        return
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")

    from resrl.config import load_config
    from resrl.prepare import prepare
    from resrl.schedule import diagnostics_due, eval_due

    cfg = load_config(args.config, args.overrides)
    prepared = prepare(cfg, progress=True)  # the warm-started policy; built and cached on the first run
    python = None if args.skip_trl else trl_python()
    r, t = cfg.rollout, cfg.trainer
    print(f"config {' '.join([args.config or 'conf/default.yaml', *args.overrides])} | {cfg.algorithm.name} | "
          f"{r.prompts_per_step} prompts x {r.n} samples, <= {r.max_tokens} new tokens, T {r.temperature} | "
          f"{t.mini_batches * t.epochs} optimizer steps per RL step, micro-batch {t.micro_batch_size} | "
          f"Adam lr {t.lr} | policy {prepared['policy_dir']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        job = {"config": args.config and str(Path(args.config).resolve()), "overrides": args.overrides,
               "prepared": {k: str(Path(prepared[k]).resolve()) for k in ("dataset_dir", "policy_dir")},
               "steps": args.steps, "warmup": args.warmup, "tmp": tmp, "skip_extras": args.skip_extras}
        ours, our_rss = run_worker(Path(sys.executable), "resrl", job)
        theirs, their_rss = (None, None) if python is None else run_worker(python, "trl", {**job,
                                                                                         "indices": ours["indices"]})

    w = args.warmup
    a = ours["steps"][w:]
    b = theirs["steps"][w:] if theirs else None
    print(f"\nresrl: sampler {ours['sampler']}, {ours['threads']} torch threads | "
          + (f"TRL {theirs['trl']}: HF generate, loss_type {theirs['loss_type']}, {theirs['shape']}, "
             f"{theirs['threads']} torch threads, prompts retokenized differently: {theirs['retokenized']}"
             if theirs else "TRL skipped"))
    print(f"median over {len(a)} measured step(s) after {w} warm-up step(s); seconds\n")
    print(f"{'stage':<48} {'resrl':>8} {'TRL':>8} {'resrl/TRL':>10}")

    def row(label, x, y=None, note=""):
        ys = "—" if y is None else f"{y:.2f}"
        ratio = f"{x / y:.2f}" if y else ""
        print(f"{label:<48} {x:8.2f} {ys:>8} {ratio:>10}  {note}".rstrip())

    for key in STAGES:
        row(LABELS[key], median(a, key), median(b, key) if b and key != "weight_sync" else None)
    row("RL step (wall)", median(a, "step"), median(b, "step") if b else None, "<- the comparison")
    row(LABELS["io"], median(a, "io"))
    ex = ours["extras"]
    if ex:
        steps_total = max(t.steps, 1)
        n_diag = sum(diagnostics_due(s, cfg.algorithm) for s in range(1, steps_total + 1))
        n_eval = sum(eval_due(s, cfg) for s in range(0, steps_total + 1))
        row("displacement diagnostics (in a step with them)", ex["diagnostics"],
            note=f"{n_diag} of {steps_total} steps; from {ex['diagnostics_from']}")
        row(f"evaluation ({ex['eval_shape']})", ex["eval"], note=f"{n_eval} in a {steps_total}-step run")
        paid = median(a, "step") + median(a, "io") + (n_diag * ex["diagnostics"] + n_eval * ex["eval"]) / steps_total
        row(f"a step as a {steps_total}-step run pays it", paid, median(b, "step") if b else None,
            "RL step + I/O + diagnostics and evaluations spread over the run")
    print(f"{'start: engines (resrl), GRPOTrainer (TRL)':<48} {ours['start']:8.2f} "
          f"{(theirs['start'] if theirs else float('nan')):8.2f}")
    print(f"{'peak RSS of the process (GiB)':<48} {our_rss:8.2f} {their_rss if their_rss else float('nan'):8.2f}")
    print(f"{'mean reward of the measured steps':<48} {median(a, 'reward'):8.3f} "
          f"{median(b, 'reward') if b else float('nan'):8.3f}  (medians; same prompts, different samples)")
    print(f"{'mean response length (tokens)':<48} {median(a, 'length'):8.1f} "
          f"{median(b, 'length') if b else float('nan'):8.1f}")


if __name__ == "__main__":
    main()
