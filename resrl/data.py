"""Data preparation: rows with a prompt, a ground-truth answer, a `data_source` and a
prompt id, tokenized with the policy's tokenizer and saved as a Hugging Face dataset.

Every source goes through one path: load raw rows -> adapt them to
(question | messages, answer, data_source, prompt_id, [solution]) -> format the prompt
-> tokenize -> drop or truncate over-long prompts -> save. Unusable rows are counted
by reason and skipped; too many of them fail the preparation with an example.
"""
from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from resrl import synthetic

DATA_SOURCES = ("synthetic",)
COLUMNS = ("prompt", "prompt_token_ids", "answer", "data_source", "prompt_id", "extra_info", "solution")


class DataError(ValueError):
    """Input data that cannot be used."""


@dataclass
class PrepSummary:
    kept: dict[str, int] = field(default_factory=dict)
    skipped: Counter = field(default_factory=Counter)   # reason -> rows
    truncated: int = 0

    def as_metrics(self) -> dict[str, float]:
        out = {f"data/{split}_rows": float(n) for split, n in self.kept.items()}
        out.update({f"data/skipped_{reason}": float(n) for reason, n in self.skipped.items()})
        out["data/truncated_prompts"] = float(self.truncated)
        return out

    def lines(self) -> list[str]:
        text = [f"{split}: {n} prompts" for split, n in self.kept.items()]
        text += [f"skipped ({reason}): {n}" for reason, n in sorted(self.skipped.items())]
        if self.truncated:
            text.append(f"truncated over-long prompts: {self.truncated}")
        return text


def raw_rows(cfg) -> dict[str, list[dict]]:
    """Adapted rows per split: question (or messages), answer, data_source, prompt_id, solution?"""
    if cfg.data.source == "synthetic":
        return synthetic.generate_rows(cfg.data.synthetic, cfg.seed)
    raise DataError(f"data.source '{cfg.data.source}' is not supported")


def format_prompt(row: dict, cfg, tokenizer) -> str:
    if cfg.data.use_chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("data.use_chat_template=true but the model's tokenizer has no chat template")
        messages = row.get("messages") or [{"role": "user", "content": row["question"]}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if row.get("messages"):
        return "\n".join(m["content"] for m in row["messages"]) if not row.get("question") else \
            cfg.data.prompt_template.format(question=row["question"])
    return cfg.data.prompt_template.format(question=row["question"])


def prepare_rows(rows: list[dict], cfg, tokenizer, summary: PrepSummary, split: str) -> list[dict]:
    out = []
    limit = cfg.data.max_prompt_tokens
    for row in rows:
        prompt = format_prompt(row, cfg, tokenizer)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if len(ids) > limit:
            if cfg.data.overlong_prompts == "drop":
                summary.skipped["overlong_prompt"] += 1
                continue
            ids = ids[-limit:]
            prompt = tokenizer.decode(ids)
            summary.truncated += 1
        out.append({"prompt": prompt, "prompt_token_ids": ids, "answer": str(row["answer"]),
                    "data_source": row["data_source"], "prompt_id": str(row["prompt_id"]),
                    "extra_info": json.dumps(row.get("extra_info") or {}),
                    "solution": row.get("solution") or ""})
    summary.kept[split] = len(out)
    return out


def _take(rows: list[dict], n, seed: int) -> list[dict]:
    if n is None or n >= len(rows):
        return rows
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def prepare_dataset(cfg, tokenizer, out_dir: Path) -> PrepSummary:
    """Build the train/test dataset for `cfg` into out_dir (a `datasets.DatasetDict`)."""
    from datasets import Dataset, DatasetDict

    summary = PrepSummary()
    splits = raw_rows(cfg)
    dd = {}
    for split, n in (("train", cfg.data.num_train), ("test", cfg.data.num_test)):
        rows = prepare_rows(_take(splits[split], n, cfg.seed), cfg, tokenizer, summary, split)
        if not rows:
            raise DataError(f"data preparation left no {split} prompts ({', '.join(summary.lines())})")
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
