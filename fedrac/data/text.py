"""Text data: a table's text column(s) tokenised once (``datasets.map``, cached on disk).

A text dataset is any table a ``dataset`` config reads (``files``: CSV / JSON lines /
Parquet; ``hub``; ``_target_``) with ``dataset.text_column`` (and optional
``text_pair_column``) and, for classification, ``label_column`` (strings are mapped to
ids: ``dataset.label_names`` or their sorted values). For ``task=causal_lm`` the loss
covers every token of ``text_column``, or only the response when
``prompt_column`` / ``response_column`` are given. Rows are tokenised with the model's
tokenizer (``dataset.tokenizer``, filled in from ``model.tokenizer`` / ``model.path``),
truncated to ``max_length``, and cached under ``<cache_dir>/tokenized/``. Split datasets
hold ``input_ids`` (``token_type_ids``, ``loss_mask``) and ``label`` columns;
:func:`token_data` turns one into a :class:`TokenData` that pads per batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fedrac.data.sources import TABLE_FORMATS, Arrays, DataConfigError, _check_exists

TEXT_KEYS = ("text_column", "prompt_column", "messages_column")
AUTO = "auto"  # dataset.text_column=auto (task=causal_lm's default): TRL's format by its columns
# TRL's dataset formats, recognised by their columns, in the order they are looked for
TRL_FORMATS = (("conversational", ("messages",)), ("prompt-completion", ("prompt", "completion")),
               ("language modelling", ("text",)))
PAD_KEY = "fedrac_pad_token_id"  # in a tokenised dataset's info.description (JSON)


def is_text(cfg: Mapping[str, Any]) -> bool:
    """Whether a ``dataset`` config describes text (a text or prompt column is named)."""
    return any(cfg.get(k) for k in TEXT_KEYS)


@dataclass
class TokenData:
    """Tokenised rows of one split; :meth:`collate` pads a batch to its longest row."""

    input_ids: list[torch.Tensor]
    labels: torch.Tensor | None
    pad_id: int
    token_type_ids: list[torch.Tensor] | None = None
    loss_mask: list[torch.Tensor] | None = None
    eval_batch_size: int = 64

    def __len__(self) -> int:
        return len(self.input_ids)

    def collate(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask`` (``token_type_ids``, ``loss_mask``) of rows
        ``idx``, right-padded to the longest of them."""
        rows = [int(i) for i in idx]
        width = max(len(self.input_ids[i]) for i in rows)
        out = {"input_ids": torch.full((len(rows), width), self.pad_id, dtype=torch.long),
               "attention_mask": torch.zeros(len(rows), width, dtype=torch.long)}
        extra = {k: getattr(self, k) for k in ("token_type_ids", "loss_mask")
                 if getattr(self, k) is not None}
        for k in extra:
            out[k] = torch.zeros(len(rows), width, dtype=torch.long)
        for j, i in enumerate(rows):
            n = len(self.input_ids[i])
            out["input_ids"][j, :n] = self.input_ids[i]
            out["attention_mask"][j, :n] = 1
            for k, column in extra.items():
                out[k][j, :n] = column[i]
        return out


def _ragged(col: pa.ChunkedArray | pa.Array) -> list[torch.Tensor]:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    offsets = col.offsets.to_numpy()
    values = torch.from_numpy(np.array(col.flatten().to_numpy(zero_copy_only=False),
                                         dtype=np.int64))
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]


def token_data(ds: Any) -> TokenData:
    """A tokenised split (columns ``input_ids``, ``label``, ...) as :class:`TokenData`."""
    table = ds.with_format("arrow")[:]
    info = json.loads(ds.info.description or "{}") if ds.info.description else {}
    names = table.column_names
    labels = torch.from_numpy(np.array(table["label"].to_numpy(), dtype=np.int64)) \
        if "label" in names else None
    return TokenData(
        input_ids=_ragged(table["input_ids"]), labels=labels,
        pad_id=int(info.get(PAD_KEY, 0)),
        token_type_ids=_ragged(table["token_type_ids"]) if "token_type_ids" in names else None,
        loss_mask=_ragged(table["loss_mask"]) if "loss_mask" in names else None)


# ---------------------------------------------------------------- reading the table


def _read_table(path: Any, key: str) -> Any:
    from datasets import load_dataset

    p = _check_exists(path, key)
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.suffix.lower() in TABLE_FORMATS]
        if len(files) != 1:
            raise DataConfigError(f"{key}={str(path)!r} is a folder with {len(files)} tables; "
                                  "allowed for text: one .csv / .jsonl / .json / .parquet file")
        p = files[0]
    suffix = p.suffix.lower()
    if suffix not in TABLE_FORMATS:
        raise DataConfigError(f"{key}={str(p)!r} has format {suffix!r}; allowed for text: "
                              ".csv, .json, .jsonl, .parquet")
    try:
        return load_dataset(TABLE_FORMATS[suffix], data_files=str(p), split="train")
    except Exception as err:  # noqa: BLE001
        raise DataConfigError(f"{key}={str(p)!r} is not a readable {suffix} table: "
                              f"{str(err).splitlines()[0]}") from err


def read_text_tables(cfg: Mapping[str, Any]) -> tuple[Any, Any | None]:
    """The train table and the optional test table of a text dataset config."""
    from datasets import Dataset, load_dataset

    name = cfg.get("name")
    if cfg.get("_target_"):
        from hydra.utils import instantiate

        try:
            obj = instantiate({"_target_": cfg["_target_"], **(cfg.get("kwargs") or {})})
        except Exception as err:  # noqa: BLE001
            raise DataConfigError(f"dataset._target_={cfg['_target_']!r} failed: "
                                  f"{str(err).splitlines()[0]}") from err
        train, test = (obj.get("train"), obj.get("test")) if isinstance(obj, Mapping) \
            else (obj, None)
        if not isinstance(train, Dataset):
            raise DataConfigError(f"dataset._target_={cfg['_target_']!r} returned "
                                  f"{type(train).__name__}; allowed for text: a datasets.Dataset"
                                  " (or a dict with 'train' and 'test')")
        return train, test
    if name == "files":
        train = _read_table(cfg.get("path"), "dataset.path")
        test = _read_table(cfg["test_path"], "dataset.test_path") if cfg.get("test_path") \
            else None
        return train, test
    if name == "hub":
        try:
            train = load_dataset(str(cfg["path"]), cfg.get("subset"),
                                 split=str(cfg.get("split", "train")))
            test = load_dataset(str(cfg["path"]), cfg.get("subset"),
                                split=str(cfg["test_split"])) if cfg.get("test_split") else None
        except Exception as err:  # noqa: BLE001
            raise DataConfigError(f"dataset.path={cfg.get('path')!r}: cannot load it from the "
                                  f"Hugging Face hub: {str(err).splitlines()[0]}") from err
        return train, test
    raise DataConfigError(f"dataset.text_column={cfg.get('text_column')!r} needs a table; "
                          f"allowed with dataset={name}: none (use dataset=files, hub or custom)")


def trl_columns(have: Sequence[str], where: str) -> dict[str, str]:
    """The roles of a table in one of TRL's formats, recognised by its columns: ``messages``
    (conversational), ``prompt`` + ``completion``, or ``text``."""
    have = list(have)
    for fmt, needed in TRL_FORMATS:
        present = [c for c in needed if c in have]
        if present and len(present) < len(needed):
            missing = [c for c in needed if c not in have]
            raise DataConfigError(
                f"dataset.text_column=auto: {where} has {present} but no {missing} column "
                f"(TRL's {fmt} format needs {list(needed)}); allowed: a table with 'messages', "
                "'prompt' and 'completion', or 'text'; or name the columns (dataset.text_column, "
                "or prompt_column and response_column)")
        if present:
            return {"messages": "messages"} if fmt == "conversational" else \
                {"prompt": "prompt", "response": "completion"} if "prompt" in needed else \
                {"text": "text"}
    raise DataConfigError(f"dataset.text_column=auto: {where} has none of TRL's columns "
                          f"(its columns: {', '.join(have)}); allowed: 'messages' "
                          "(conversational), 'prompt' + 'completion', or 'text'; or name the "
                          "columns (dataset.text_column, or prompt_column and response_column)")


def text_columns(cfg: Mapping[str, Any], task: str,
                 have: Sequence[str] | None = None, where: str = "the table") -> dict[str, str]:
    """The columns a text dataset reads, by role (``text``, ``pair``, ``prompt``, ...);
    ``text_column=auto`` picks TRL's format from the table's columns ``have``."""
    if task == "causal_lm" and cfg.get("text_column") == AUTO and have is not None:
        cols = trl_columns(have, where)
        if cfg.get("group_column"):
            cols["group"] = str(cfg["group_column"])
        return cols
    cols = {role: cfg.get(f"{role}_column") for role in ("text", "text_pair", "prompt",
                                                          "response", "messages")}
    cols = {k: str(v) for k, v in cols.items() if v}
    if task == "classification":
        if "text" not in cols:
            raise DataConfigError("dataset.text_column=None is not set; allowed: the table's "
                                  "text column (task=classification)")
        cols["label"] = str(cfg.get("label_column") or "label")
    elif ("prompt" in cols) != ("response" in cols):
        raise DataConfigError("dataset.prompt_column and dataset.response_column go together; "
                              f"got prompt={cols.get('prompt')!r}, "
                              f"response={cols.get('response')!r}")
    elif "prompt" not in cols and "text" not in cols and "messages" not in cols:
        raise DataConfigError("dataset.text_column=None is not set; allowed: auto (TRL's "
                              "formats), the table's text column, prompt_column and "
                              "response_column, or messages_column (task=causal_lm)")
    if task == "causal_lm" and "messages" in cols:
        cols = {"messages": cols["messages"]}
    elif task == "causal_lm" and "prompt" in cols:
        cols.pop("text", None)
    if cfg.get("group_column"):
        cols["group"] = str(cfg["group_column"])
    return cols


def chat_segments(tok: Any, messages: Sequence[Mapping[str, Any]],
                  loss_from: int = 0) -> list[tuple[str, bool]]:
    """A conversation rendered with the tokenizer's chat template, cut into ``(text, loss)``
    pieces: each message's own text, loss on the assistant turns from ``loss_from`` on; the
    template's generation prompt before an assistant turn belongs to the turn before it."""
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        assistant = m.get("role") == "assistant"
        if assistant:  # the header the template puts before a reply is prompt, not loss
            head = tok.apply_chat_template(list(messages[:i]), tokenize=False,
                                           add_generation_prompt=True) if i else ""
            if head.startswith(done) and len(head) > len(done):
                out.append((head[len(done):], False))
                done = head
        text = tok.apply_chat_template(list(messages[:i + 1]), tokenize=False)
        if not text.startswith(done):
            raise DataConfigError("dataset.messages_column: the tokenizer's chat template "
                                  "rewrites earlier turns when a turn is added; allowed: a "
                                  "template that renders a conversation turn by turn")
        out.append((text[len(done):], assistant and i >= loss_from))
        done = text
    return [(t, loss) for t, loss in out if t]


def check_columns(table: Any, cols: Mapping[str, str], where: str) -> None:
    """One line naming the key of the first column the table lacks."""
    have = list(table.column_names)
    for role, column in cols.items():
        if column not in have:
            raise DataConfigError(f"dataset.{role}_column={column!r} is not a column of {where}; "
                                  f"allowed: {', '.join(have)}")


def check_missing_text(table: Any, cols: Mapping[str, str], where: str = "the table") -> None:
    """One line naming the key, the column, ``where`` and the first data row (1-based) whose
    text is missing (NaN / empty cell / null)."""
    import pyarrow.compute as pc

    data = getattr(table, "data", None)
    for role, column in cols.items():
        if data is None or column not in data.column_names:
            continue
        col = data.column(column)
        if col.null_count:
            row = pc.index(pc.is_null(col), True).as_py()
            raise DataConfigError(
                f"dataset.{role}_column={column!r} has no text in data row {row + 1} of {where} "
                f"(a missing value, NaN; {col.null_count} rows in all); allowed: text in every "
                "row (drop or fill those rows)")


def label_ids(values: Sequence[Any], names: Sequence[str] | None, key: str) -> np.ndarray:
    """Labels as int64 ids: integers kept, strings mapped by their index in ``names``."""
    from fedrac.data.sources import integer_labels

    arr = np.asarray(values)
    if arr.dtype.kind not in "USO":
        return integer_labels(arr, key)
    if names is None:
        raise DataConfigError(f"{key}: string labels need dataset.label_names to map them")
    index = {str(n): i for i, n in enumerate(names)}
    unknown = sorted({str(v) for v in arr.tolist()} - set(index))
    if unknown:
        raise DataConfigError(f"{key}: labels {unknown[:5]} are not in dataset.label_names="
                              f"{list(names)}; allowed: those names")
    return np.array([index[str(v)] for v in arr.tolist()], dtype=np.int64)


def label_names_of(cfg: Mapping[str, Any], *columns: Sequence[Any]) -> list[str] | None:
    """``dataset.label_names``, else the sorted distinct values when they are strings."""
    given = cfg.get("label_names")
    if given:
        return [str(v) for v in given]
    values = [v for col in columns if col is not None for v in col]
    if not values or not any(isinstance(v, str) for v in values):
        return None
    return sorted({str(v) for v in values})


# ---------------------------------------------------------------- tokenising


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode() if not isinstance(
            part, bytes) else part)
        h.update(b"\x00")
    return h.hexdigest()[:20]


def _table_digest(table: Any, columns: Sequence[str]) -> bytes:
    h = hashlib.sha256()
    for c in columns:
        for chunk in table.data.column(c).chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(memoryview(buf))
    return h.digest()


def _tokenizer_digest(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        text = repr(sorted(tok.get_vocab().items()))
    else:  # without the truncation/padding state a previous call left on it
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)
        spec.pop("padding", None)
        text = json.dumps(spec, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def tokenize(table: Any, cfg: Mapping[str, Any], task: str, cols: Mapping[str, str]) -> Any:
    """``table`` with ``input_ids`` (``token_type_ids``, ``loss_mask``) added, cached on disk."""
    from fedrac.models.hf import load_tokenizer

    max_length = cfg.get("max_length", 128)
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= 0:
        raise DataConfigError(f"dataset.max_length={max_length!r} is not allowed; allowed: an "
                              "integer > 0 (tokens per example)")
    source = cfg.get("tokenizer")
    if not source:
        raise DataConfigError("dataset.tokenizer=None: text needs a tokenizer; allowed: "
                              "model=hf with model.path or model.tokenizer")
    tok = load_tokenizer(str(source))
    roles = [r for r in ("text", "text_pair", "prompt", "response", "messages") if r in cols]
    check_missing_text(table, {r: cols[r] for r in roles},
                       repr(str(cfg["path"])) if cfg.get("path") else "the table")
    chat = "messages" in cols or ("prompt" in cols and len(table) and
                                  isinstance(table[0][cols["prompt"]], list))
    if task == "causal_lm" and chat and not getattr(tok, "chat_template", None):
        key = "dataset.messages_column" if "messages" in cols else "dataset.prompt_column"
        raise DataConfigError(
            f"{key}={cols.get('messages') or cols.get('prompt')!r} holds conversations (TRL's "
            f"conversational format), but dataset.tokenizer={str(source)!r} has no chat "
            "template; allowed: a tokenizer with a chat_template (an instruct / chat model's), "
            "or a table with 'text', or 'prompt' and 'completion' strings")
    cache = Path(os.path.expanduser(str(cfg.get("cache_dir") or os.environ.get(
        "FEDRAC_CACHE", "~/.cache/fedrac")))) / "tokenized"
    cache.mkdir(parents=True, exist_ok=True)
    digest = _digest(_table_digest(table, [cols[r] for r in roles]), _tokenizer_digest(tok),
                     max_length, task, {r: cols[r] for r in roles},
                     getattr(tok, "chat_template", None) if chat else None, 2)
    eos = tok.eos_token_id

    def encode(batch: dict[str, list]) -> dict[str, list]:
        if task == "classification":
            pair = batch[cols["text_pair"]] if "text_pair" in cols else None
            enc = tok(batch[cols["text"]], pair, truncation=True, max_length=max_length)
            out = {"input_ids": enc["input_ids"]}
            if "token_type_ids" in enc:
                out["token_type_ids"] = enc["token_type_ids"]
            return out
        ids, masks = [], []
        if chat:  # conversations: the chat template, loss on the (completion's) assistant turns
            if "messages" in cols:
                convs = [(list(m), 0) for m in batch[cols["messages"]]]
            else:
                convs = [(list(p) + list(c), len(p)) for p, c in
                         zip(batch[cols["prompt"]], batch[cols["response"]], strict=True)]
            for messages, loss_from in convs:
                row, mask = [], []
                for text, loss in chat_segments(tok, messages, loss_from):
                    piece = tok(text, add_special_tokens=False)["input_ids"]
                    row += piece
                    mask += [int(loss)] * len(piece)
                ids.append(row[:max_length])
                masks.append(mask[:max_length])
        elif "prompt" in cols:
            prompts = tok(batch[cols["prompt"]])["input_ids"]
            answers = tok(batch[cols["response"]], add_special_tokens=False)["input_ids"]
            for p, r in zip(prompts, answers, strict=True):
                r = r + ([eos] if eos is not None else [])
                ids.append((p + r)[:max_length])
                masks.append(([0] * len(p) + [1] * len(r))[:max_length])
        else:
            for t in tok(batch[cols["text"]], truncation=True, max_length=max_length)["input_ids"]:
                if eos is not None and len(t) < max_length and (not t or t[-1] != eos):
                    t = t + [eos]
                ids.append(t)
                masks.append([1] * len(t))
        return {"input_ids": ids, "loss_mask": masks}

    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        out = table.map(encode, batched=True, cache_file_name=str(cache / f"{digest}.arrow"),
                        load_from_cache_file=True, new_fingerprint=digest)
    finally:
        if was:
            datasets.enable_progress_bars()
    too_short = sum(1 for n in out.with_format("arrow")["input_ids"].combine_chunks()
                    .value_lengths().to_numpy() if n == 0) if len(out) else 0
    if too_short:
        raise DataConfigError(f"dataset.max_length={max_length}: {too_short} rows have no "
                              "tokens; allowed: rows with text")
    out.info.description = json.dumps({PAD_KEY: int(tok.pad_token_id)})
    return out


def text_arrays(table: Any, cols: Mapping[str, str], names: Sequence[str] | None,
                task: str, where: str) -> Arrays:
    """Row indices as ``x`` (so the generic split and selection code applies), labels, groups."""
    n = len(table)
    if task == "classification":
        y = label_ids(table[cols["label"]], names,
                      f"dataset.label_column={cols['label']!r} of {where}")
    else:
        y = np.zeros(n, dtype=np.int64)
    groups = np.asarray([str(v) for v in table[cols["group"]]]) if "group" in cols else None
    return Arrays(np.arange(n, dtype=np.int64)[:, None], y, groups)


def finish_split(tokenised: Any, rows: Arrays, keep: Sequence[str]) -> Any:
    """The tokenised rows named by ``rows.x`` with their (re-mapped) ``label`` column, as an
    in-memory dataset (no cache file per split)."""
    from datasets import Dataset, DatasetInfo
    from datasets.table import InMemoryTable

    idx = pa.array(rows.x[:, 0].astype(np.int64))
    columns = [c for c in ("input_ids", "token_type_ids", "loss_mask", *keep)
               if c in tokenised.column_names]
    table = tokenised.with_format("arrow").select_columns(columns)[:].take(idx)
    table = table.append_column("label", pa.array(rows.y.astype(np.int64), pa.int64()))
    return Dataset(InMemoryTable(table), info=DatasetInfo(
        description=tokenised.info.description))
