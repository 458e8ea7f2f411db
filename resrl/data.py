"""Data preparation: rows with a prompt, a ground-truth answer, a `data_source` and a
prompt id, tokenized with the policy's tokenizer and saved as a Hugging Face dataset.

Every source goes through one path:

    load raw rows (synthetic | local file/folder | saved HF dataset | hub name)
      -> adapt (gsm8k | math | verl)  : question/messages, answer, data_source, prompt id
      -> format the prompt (template or chat template) -> tokenize
      -> drop or truncate over-long prompts -> save

Unusable rows are counted by reason and skipped; when more than
`data.max_bad_fraction` of a split is unusable, preparation fails with a message
naming the fields and showing an example row.
"""
from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from resrl import synthetic
from resrl.errors import UserError
from resrl.rewards.math_equiv import last_boxed
from resrl.rewards.numeric import gsm8k_ground_truth

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")


class DataError(UserError):
    """Input data that cannot be used."""


class BadRow(Exception):
    """One row that cannot be used; `reason` is what gets counted."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class PrepSummary:
    kept: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)   # reason -> rows
    truncated: int = 0

    def as_metrics(self) -> dict[str, float]:
        out = {f"data/{split}_rows": float(n) for split, n in self.kept.items()}
        out.update({f"data/skipped_{reason.replace(':', '_')}": float(n) for reason, n in self.skipped.items()})
        out["data/truncated_prompts"] = float(self.truncated)
        return out

    def lines(self) -> list[str]:
        text = [f"{split}: {n} prompts" for split, n in self.kept.items()]
        text += [f"skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        if self.truncated:
            text.append(f"truncated over-long prompts: {self.truncated}")
        return text


# ----------------------------------------------------------------------------- loading

def _read_file(path: Path) -> list[dict]:
    from datasets import Dataset, load_dataset

    if path.stat().st_size == 0:
        raise DataError(f"data file '{path}' is empty")
    try:
        if path.suffix == ".arrow":
            return Dataset.from_file(str(path)).to_list()
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}[path.suffix]
        return load_dataset(kind, data_files=str(path), split="train").to_list()
    except Exception as exc:  # noqa: BLE001 - garbage, another encoding, a truncated file: the user's to fix
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:  # datasets wraps the parser's error
            root = root.__cause__ or root.__context__
        detail = " ".join(f"{type(root).__name__}: {root}".split())[:300]
        if path.suffix in (".jsonl", ".json"):  # the parser's message often misses the cause: find the row
            detail = _json_problem(path) or detail
        raise DataError(f"data file '{path}' cannot be read as {path.suffix[1:]} ({detail})") from None


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _json_problem(path: Path) -> str | None:
    """The first row of a JSON (lines) file that cannot be used, and why, read with Python's own
    decoder: invalid UTF-8, a lone surrogate (a `\\udXXX` escape no UTF-8 text can hold), bad JSON.
    None when it finds nothing (then the parser's own message stands)."""

    data = path.read_bytes()
    lines = data.split(b"\n") if path.suffix == ".jsonl" or not data.lstrip().startswith(b"[") else [data]
    for number, raw in enumerate(lines, 1):
        where = f"line {number}" if len(lines) > 1 else "the file"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return (f"{where} is not UTF-8: byte 0x{raw[exc.start]:02x} at column {exc.start + 1} ({exc.reason}); "
                    "save the file as UTF-8")
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError as exc:
            return f"{where} is not valid JSON: {exc}"
        for value in _strings(row):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                char = value[exc.start]
                return (f"{where} holds a lone surrogate \\u{ord(char):04x} in a string (half of a UTF-16 pair, "
                        "not a character); fix or drop that row")
    return None


def load_raw_splits(path: str, split_train: str, split_test: str) -> dict[str, list[dict]]:
    """Rows per split from a file, a folder of split files, a saved dataset, or a hub name."""
    from datasets import load_from_disk

    p = Path(path)
    if p.is_file():
        if p.suffix not in FILE_SUFFIXES:
            raise DataError(f"data.path '{p}': unsupported file type '{p.suffix}' (use {', '.join(FILE_SUFFIXES)})")
        return {split_train: _read_file(p)}
    if p.is_dir():
        if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
            loaded = load_from_disk(str(p))
            if hasattr(loaded, "keys"):
                return {name: loaded[name].to_list() for name in loaded.keys()}
            return {split_train: loaded.to_list()}
        out = {}
        for split in (split_train, split_test):
            files = sorted(f for f in p.iterdir() if f.name.startswith(split) and f.suffix in FILE_SUFFIXES)
            if files:
                out[split] = [row for f in files for row in _read_file(f)]
        if not out:
            raise DataError(f"data.path '{p}' holds no '{split_train}'/'{split_test}' files "
                            f"({', '.join(FILE_SUFFIXES)}) and is not a saved Hugging Face dataset")
        return out
    if path.startswith((".", "/", "~")) or path.endswith(FILE_SUFFIXES):
        raise DataError(f"data.path '{path}' does not exist")
    try:  # a hub dataset name
        from datasets import load_dataset

        loaded = load_dataset(path)
    except Exception as exc:
        raise DataError(f"data.path '{path}' is not a local path, and the Hugging Face hub dataset '{path}' "
                        f"could not be loaded ({type(exc).__name__}: {str(exc)[:200]}). Without hub access, "
                        "download it elsewhere and point data.path at the files.") from None
    return {name: loaded[name].to_list() for name in loaded.keys()}


# ----------------------------------------------------------------------------- adapters

def _need_text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise BadRow(f"missing_field:{name}")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"not_text:{name}")
    if not value.strip():
        raise BadRow("empty_prompt" if name in ("question", "problem", "prompt") else f"empty_field:{name}")
    return value


def adapt_gsm8k(row: dict, index: int, split: str) -> dict:
    """GSM8K: `question`, and `answer` = worked solution ending in '#### N'."""
    question = _need_text(row, "question")
    answer_field = _need_text(row, "answer")
    truth = gsm8k_ground_truth(answer_field)
    if truth is None:
        raise BadRow("unparseable_answer")
    worked = answer_field.rsplit("####", 1)[0].strip()
    return {"question": question.strip(), "answer": truth, "data_source": "openai/gsm8k",
            "prompt_id": f"gsm8k-{split}-{index}", "solution": f" {worked}\n#### {truth}",
            "extra_info": {"split": split, "index": index}}


def adapt_math(row: dict, index: int, split: str) -> dict:
    """MATH style: `problem`, and an `answer` field or a `solution` with \\boxed{...}."""
    problem = _need_text(row, "problem")
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)  # AIME/AMC-style sets store integer answers
    solution = row.get("solution") or ""
    if not (isinstance(answer, str) and answer.strip()):
        if not solution:
            raise BadRow("missing_field:answer|solution")
        answer = last_boxed(solution)
        if not answer:
            raise BadRow("unparseable_answer")
    return {"question": problem.strip(), "answer": answer.strip(), "data_source": row.get("data_source") or "math",
            "prompt_id": str(row.get("unique_id") or f"math-{split}-{index}"), "solution": solution,
            "extra_info": {"split": split, "index": index, **({"level": row["level"]} if "level" in row else {}),
                           **({"type": row["type"]} if "type" in row else {})}}


def adapt_verl(row: dict, index: int, split: str) -> dict:
    """verl RLVR layout: `prompt` (chat messages), `reward_model.ground_truth`, `data_source`,
    `extra_info`, optional `uid`."""
    prompt = row.get("prompt")
    if prompt is None:
        raise BadRow("missing_field:prompt")
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list) and all(isinstance(m, dict) and "content" in m for m in prompt):
        messages = [{"role": m.get("role", "user"), "content": m["content"]} for m in prompt]
    else:
        raise BadRow("bad_field:prompt")
    if not any(m["role"] == "user" and str(m["content"]).strip() for m in messages):
        raise BadRow("empty_prompt")
    rm = row.get("reward_model")
    if not isinstance(rm, dict) or rm.get("ground_truth") is None:
        raise BadRow("missing_field:reward_model.ground_truth")
    truth = rm["ground_truth"]
    truth = json.dumps(truth) if isinstance(truth, (list, dict)) else str(truth)
    if not truth.strip():
        raise BadRow("unparseable_answer")
    source = row.get("data_source")
    if not source:
        raise BadRow("missing_field:data_source")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        extra = {"value": extra}
    pid = row.get("uid") or extra.get("prompt_id") or f"verl-{split}-{extra.get('index', index)}"
    question = [m["content"] for m in messages if m["role"] == "user"][-1]
    return {"question": question, "messages": messages, "answer": truth, "data_source": source,
            "prompt_id": str(pid), "solution": "", "extra_info": extra}


@dataclass(frozen=True)
class Adapter:
    """A source's row adapter, and the fields it reads (named when too many rows are unusable)."""
    adapt: Callable[[dict, int, str], dict]
    fields: str


ADAPTERS = {
    "gsm8k": Adapter(adapt_gsm8k, "`question`, and `answer` = worked solution ending in '#### N'."),
    "math": Adapter(adapt_math, "`problem`, and an `answer` field or a `solution` with \\boxed{...}."),
    "verl": Adapter(adapt_verl, "`prompt` (chat messages), `reward_model.ground_truth`, `data_source`, "
                                "`extra_info`, optional `uid`."),
}
DATA_SOURCES = ("synthetic", *ADAPTERS)  # the generated task, then the adapters for files
OVERLONG_PROMPTS = ("drop", "truncate")  # what data preparation does with a prompt over data.max_prompt_tokens


def adapt_split(rows: list[dict], source: str, split: str, summary: PrepSummary, max_bad: float) -> list[dict]:
    adapter = ADAPTERS[source]
    out, bad, example = [], Counter(), None
    for i, row in enumerate(rows):
        try:
            out.append(adapter.adapt(row, i, split))
        except BadRow as b:
            bad[b.reason] += 1
            example = example or (b.reason, row)
    summary.skipped.update(bad)
    if rows and sum(bad.values()) / len(rows) > max_bad:
        reason, row = example
        shown = json.dumps({k: (str(v)[:80] + "..." if len(str(v)) > 80 else v) for k, v in row.items()},
                           default=str)
        raise DataError(
            f"{sum(bad.values())} of {len(rows)} {split} rows cannot be used as data.source={source} "
            f"(more than data.max_bad_fraction={max_bad}): {dict(bad)}. Expected fields: "
            f"{adapter.fields} Example row ({reason}): {shown}")
    return out


# ----------------------------------------------------------------------------- prompts

def format_prompt(row: dict, data_cfg, tokenizer) -> str:
    """The prompt text of a row, by the `data` section's chat template or prompt template."""
    messages = row.get("messages") or [{"role": "user", "content": row["question"]}]
    if data_cfg.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.use_chat_template=true but the model's tokenizer has no chat template")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return data_cfg.prompt_template.format(question=row["question"])


def usable_rows(rows, data_cfg, tokenizer, summary: PrepSummary):
    """Prepared rows in order, over-long prompts (over the `data` section's max_prompt_tokens)
    dropped or truncated (its overlong_prompts)."""
    limit = data_cfg.max_prompt_tokens
    for row in rows:
        prompt = format_prompt(row, data_cfg, tokenizer)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            if data_cfg.overlong_prompts == "drop":
                summary.skipped["overlong_prompt"] += 1
                continue
            ids = ids[-limit:]
            prompt = tokenizer.decode(ids)
            summary.truncated += 1
        yield {"prompt": prompt, "prompt_token_ids": ids, "question": row["question"],
               "messages": json.dumps(row.get("messages") or []), "answer": str(row["answer"]),
               "data_source": row["data_source"], "prompt_id": str(row["prompt_id"]),
               "extra_info": json.dumps(row.get("extra_info") or {}), "solution": row.get("solution") or ""}


def _shuffled(rows: list[dict], n, seed: int) -> list[dict]:
    """All rows in file order, or (when only n are wanted) in a seeded random order."""
    if n is None or n >= len(rows):
        return rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def adapted_splits(cfg, summary: PrepSummary) -> dict[str, list[dict] | None]:
    """Adapted rows for "train" and "test"; "test" is None when the source has one split
    (prepare_dataset then holds out data.num_test of its usable rows)."""
    d = cfg.data
    if d.source == "synthetic":
        return synthetic.generate_rows(d.synthetic, cfg.base_seed)
    if d.path is None:
        raise DataError(f"data.source={d.source} needs data.path (a file, a folder or a hub dataset name)")
    raw = load_raw_splits(str(d.path), d.split_train, d.split_test)
    if d.split_train not in raw:
        raise DataError(f"data.path '{d.path}' has no split '{d.split_train}' (found: {', '.join(raw)})")
    train = adapt_split(raw[d.split_train], d.source, d.split_train, summary, d.max_bad_fraction)
    if d.split_test in raw:
        return {"train": train, "test": adapt_split(raw[d.split_test], d.source, d.split_test, summary,
                                                    d.max_bad_fraction)}
    if d.num_test is None:
        raise DataError(f"data.path '{d.path}' has no '{d.split_test}' split; set data.num_test to hold out "
                        "that many training rows for evaluation")
    return {"train": train, "test": None}


def prepare_dataset(cfg, tokenizer, out_dir: Path) -> PrepSummary:
    """Build the train/test dataset for `cfg` into out_dir (a `datasets.DatasetDict`).

    Rows are picked after over-long prompts are dropped, so each split gets its
    data.num_* rows whenever the source has that many usable ones."""
    from datasets import Dataset, DatasetDict

    d = cfg.data
    summary = PrepSummary()
    splits = adapted_splits(cfg, summary)
    if splits["test"] is None:  # one split: hold out the first usable rows of a seeded shuffle
        pool = list(splits["train"])
        random.Random(cfg.base_seed + 1).shuffle(pool)
        usable = usable_rows(pool, d, tokenizer, summary)
        prepared = {"test": list(itertools.islice(usable, d.num_test))}
        prepared["train"] = list(itertools.islice(usable, d.num_train))
    else:
        prepared = {split: list(itertools.islice(usable_rows(_shuffled(splits[split], n, cfg.base_seed), d,
                                                             tokenizer, summary), n))
                    for split, n in (("train", d.num_train), ("test", d.num_test))}
    dd = {}
    for split in ("train", "test"):
        rows = prepared[split]
        summary.kept[split] = len(rows)
        if not rows:  # e.g. every prompt over data.max_prompt_tokens
            hint = ("; raise data.max_prompt_tokens or set data.overlong_prompts=truncate"
                    if summary.skipped["overlong_prompt"] else "")
            raise DataError(f"data preparation left no {split} prompts ({'; '.join(summary.lines())}){hint}")
        dd[split] = Dataset.from_list(rows)
    DatasetDict(dd).save_to_disk(str(out_dir))
    (out_dir / "summary.json").write_text(json.dumps({"kept": summary.kept, "skipped": dict(summary.skipped),
                                                      "truncated": summary.truncated}))
    return summary


def load_summary(out_dir: Path) -> PrepSummary:
    d = json.loads((out_dir / "summary.json").read_text())
    return PrepSummary(d["kept"], Counter(d["skipped"]), d["truncated"])


def load_prepared(out_dir: Path):
    from datasets import load_from_disk

    return load_from_disk(str(out_dir))


# ----------------------------------------------------------------------------- verl export

def export_verl(prepared_dir: Path, out_dir: Path) -> dict[str, Path]:
    """Write prepared data as verl RLVR parquet files (train.parquet, test.parquet)."""
    import pandas as pd

    data = load_prepared(prepared_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in data.keys():
        records = []
        for i, row in enumerate(data[split]):
            messages = json.loads(row["messages"]) or [{"role": "user", "content": row["question"]}]
            extra = json.loads(row["extra_info"]) or {}
            extra.setdefault("split", split)
            extra.setdefault("index", i)
            records.append({"data_source": row["data_source"], "prompt": messages, "ability": "math",
                            "reward_model": {"style": "rule", "ground_truth": row["answer"]},
                            "extra_info": extra, "uid": row["prompt_id"]})
        paths[split] = out_dir / f"{split}.parquet"
        pd.DataFrame.from_records(records).to_parquet(paths[split])
    return paths
