"""Reading rows from files or `datasets`, and turning SFT rows into token ids and loss masks.

Bad input stops with a message that names the file and line (malformed JSONL), the row and the
missing fields, or says the data set is empty. Every row read is a `Row` that remembers its file and
line (JSONL) or row number, so that an error found after shuffling and splitting still names it.
Over-long examples are truncated or skipped as configured, and counted.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from align.config import DataConfig


class DataError(ValueError):
    """Input data that cannot be used; the message says where and why."""


class Row(dict):
    """A data row (a plain dict to every reader) that knows where it came from."""

    __slots__ = ("origin",)

    def __init__(self, data: dict[str, Any], origin: str) -> None:
        super().__init__(data)
        self.origin = origin  # "data.jsonl:12" (file and line) or "data.parquet row 3" (1-based)


def row_origin(row: dict, index: int, source: str) -> str:
    """Where `row` came from for an error message: its `Row.origin`, else `source row <index + 1>`."""
    return getattr(row, "origin", None) or f"{source} row {index + 1}"


def missing_fields(row: dict, fields: tuple[str, ...] | list[str]) -> list[str]:
    """The `fields` that `row` lacks or holds empty (null, "" or []): nothing to train on."""
    return [f for f in fields if row.get(f) is None or (isinstance(row.get(f), (str, list)) and not row.get(f))]


def read_rows(path: str, split: str = "train", max_examples: int | None = None) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON / Parquet file, or of a locally cached `datasets` name."""
    p = Path(path).expanduser()
    if not path:
        raise DataError("data.path is empty: give a JSONL / JSON / Parquet file or a datasets name")
    if p.suffix in (".jsonl", ".gz") or p.name.endswith(".jsonl.gz"):
        rows = _read_jsonl(p)  # Rows with their line numbers
    elif p.suffix == ".json":
        rows = [Row(r, f"{p} row {i}") for i, r in enumerate(_read_json(p), 1)]
    elif p.suffix == ".parquet":
        if not p.is_file():
            raise DataError(f"data file not found: {p}")
        import pyarrow.parquet as pq

        rows = [Row(r, f"{p} row {i}") for i, r in enumerate(pq.read_table(p).to_pylist(), 1)]
    elif p.exists():
        raise DataError(f"{p}: unsupported data file type (use .jsonl, .json or .parquet)")
    else:
        rows = [Row(r, f"{path} ({split}) row {i}") for i, r in enumerate(_read_datasets(path, split), 1)]
    if max_examples is not None:
        rows = rows[:max_examples]
    if not rows:
        raise DataError(f"{path}: the data set is empty (no rows)")
    return rows


def _read_jsonl(p: Path) -> list[Row]:
    """Parse JSONL line by line, so that a bad line is reported by its number."""
    import gzip

    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    opener = gzip.open if p.suffix == ".gz" else open
    rows = []
    with opener(p, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(Row(row, f"{p}:{lineno}"))
    return rows


def _read_json(p: Path) -> list[dict[str, Any]]:
    """A JSON file holding a list of objects (or {"data": [...]})."""
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{p}: expected a list of objects")
    return data


def _read_datasets(name: str, split: str) -> list[dict[str, Any]]:
    """A `datasets` name, from the local cache only (no hub is reachable)."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:  # datasets raises many types for "not found"
        raise DataError(f"data.path={name!r} is neither a file nor a cached datasets name: {exc}") from None


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): a seeded random `fraction` of rows held out for eval."""
    if fraction <= 0:
        return rows, []
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    n_eval = max(1, int(round(len(rows) * fraction)))
    held = set(idx[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


# ----------------------------------------------------------------------------- SFT encoding
@dataclass
class Encoded:
    """Token ids and the loss mask of one example."""

    input_ids: list[int]  # (L,)
    loss_mask: list[int]  # (L,) 1 where the loss trains


@dataclass
class EncodeStats:
    """What encoding did to the data: counts of truncated and skipped examples."""

    total: int = 0  # rows seen
    truncated: int = 0  # rows cut to max_length
    skipped: int = 0  # rows dropped (too long with overlong=skip, or nothing left to train on)
    reasons: dict[str, int] = field(default_factory=dict)  # why rows were skipped


def _as_messages(value: Any) -> list[dict[str, str]] | None:
    """value if it is a chat message list, else None."""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    return None


def _segments(row: dict, cfg: DataConfig, tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """The row as (token ids, trains?) segments, in order."""
    use_chat = cfg.template == "chat" or (cfg.template == "auto" and tokenizer.chat_template)
    if row.get(cfg.messages_field) is not None:  # Parquet / datasets rows hold absent columns as None
        messages = _as_messages(row[cfg.messages_field])
        if messages is None:
            raise DataError(f"{where}: field '{cfg.messages_field}' must be a list of {{role, content}} messages")
        if not tokenizer.chat_template:
            raise DataError(f"{where}: chat messages need a tokenizer with a chat template")
        segs, done = [], []
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            prefix = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            before = "".join(done)
            segs.append((tokenizer(prefix[len(before):], add_special_tokens=False)["input_ids"], False))
            segs.append((tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"], True))
            done = [full]
        if not segs:
            raise DataError(f"{where}: the conversation has no assistant message to train on")
        return segs
    missing = missing_fields(row, (cfg.prompt_field, cfg.completion_field))
    if missing:
        raise DataError(f"{where}: missing or empty field(s) {missing}; SFT rows look like "
                        f"{{'{cfg.messages_field}': [{{'role': ..., 'content': ...}}, ...]}} or "
                        f"{{'{cfg.prompt_field}': ..., '{cfg.completion_field}': ...}} (this row has: "
                        f"{sorted(row)}; data.messages_field / prompt_field / completion_field name the columns)")
    prompt, completion = row[cfg.prompt_field], row[cfg.completion_field]
    if use_chat:
        p_msgs = _as_messages(prompt) or [{"role": "user", "content": str(prompt)}]
        c_msgs = _as_messages(completion) or [{"role": "assistant", "content": str(completion)}]
        prefix = tokenizer.apply_chat_template(p_msgs, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(p_msgs + c_msgs, tokenize=False)
        return [(tokenizer(prefix, add_special_tokens=False)["input_ids"], False),
                (tokenizer(full[len(prefix):], add_special_tokens=False)["input_ids"], True)]
    p_ids = tokenizer(str(prompt))["input_ids"]
    c_ids = tokenizer(str(completion), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [(p_ids, False), (c_ids, True)]


def encode_sft(rows: list[dict], cfg: DataConfig, tokenizer, source: str = "data") -> tuple[list[Encoded], EncodeStats]:
    """Encode SFT rows (messages, or prompt + completion) with the loss on completion tokens."""
    stats, out = EncodeStats(), []
    for i, row in enumerate(rows):
        stats.total += 1
        segs = _segments(row, cfg, tokenizer, row_origin(row, i, source))
        ids = [t for s, _ in segs for t in s]
        mask = [int(train or not cfg.completion_only_loss) for s, train in segs for _ in s]
        if len(ids) > cfg.max_length:
            if cfg.overlong == "skip":
                stats.skipped += 1
                stats.reasons["too long"] = stats.reasons.get("too long", 0) + 1
                continue
            ids, mask = ids[: cfg.max_length], mask[: cfg.max_length]
            stats.truncated += 1
        if sum(mask[1:]) == 0:  # the prompt alone filled max_length: nothing left to learn
            stats.skipped += 1
            stats.reasons["no completion tokens left"] = stats.reasons.get("no completion tokens left", 0) + 1
            continue
        out.append(Encoded(ids, mask))
    if not out:
        raise DataError(f"{source}: no usable example left after encoding "
                        f"({stats.skipped} of {stats.total} skipped: {stats.reasons}); raise data.max_length")
    return out, stats


def pack(examples: list[Encoded], max_length: int) -> list[list[Encoded]]:
    """Group examples into rows of at most max_length tokens (first-fit decreasing by length)."""
    bins: list[list[Encoded]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        for b, r in enumerate(room):
            if len(ex.input_ids) <= r:
                bins[b].append(ex)
                room[b] -= len(ex.input_ids)
                break
        else:
            bins.append([ex])
            room.append(max_length - len(ex.input_ids))
    return bins


def collate(rows: list[list[Encoded]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad rows (each one or several packed examples) to the longest in the batch.

    Packed examples get position ids that restart at 0, and a block-diagonal causal attention
    mask, so no example attends to another one packed beside it.
    """
    lengths = [sum(len(e.input_ids) for e in row) for row in rows]
    T = max(lengths)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segment = torch.zeros((B, T), dtype=torch.long)  # 0 = padding, k = k-th packed example
    for b, row in enumerate(rows):
        t = 0
        for k, ex in enumerate(row, 1):
            n = len(ex.input_ids)
            input_ids[b, t:t + n] = torch.tensor(ex.input_ids)
            lab = torch.tensor(ex.input_ids)
            lab[torch.tensor(ex.loss_mask) == 0] = -100
            labels[b, t:t + n] = lab
            position_ids[b, t:t + n] = torch.arange(n)
            segment[b, t:t + n] = k
            t += n
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if any(len(row) > 1 for row in rows):
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] > 0)  # (B, T, T)
        allowed = same & causal
        allowed |= torch.eye(T, dtype=torch.bool)  # padding rows attend to themselves: no NaN
        batch["attention_mask"] = allowed[:, None]  # (B, 1, T, T) boolean mask, True = attend
    else:
        batch["attention_mask"] = (segment > 0).long()
    return batch
