"""Tasks: what a model is trained and evaluated for (``conf/task/<name>.yaml``)."""

from __future__ import annotations

from collections.abc import Mapping

from fedrac.settings.typed import DataSettings
from fedrac.tasks.base import Task, call_model, logits_of
from fedrac.tasks.causal_lm import CausalLM
from fedrac.tasks.classification import Classification

TASKS: dict[str, Task] = {t.name: t for t in (Classification(), CausalLM())}
CLASSIFICATION = TASKS["classification"]


def get_task(name: str) -> Task:
    """The task named ``name`` (``classification``, ``causal_lm``)."""
    if name not in TASKS:
        raise ValueError(f"task={name!r} is not a task; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def task_of(data: DataSettings) -> Task:
    """The task of a run's data settings (``classification`` when it names none)."""
    task = data.task
    return get_task(str(task.get("name", "classification") if isinstance(task, Mapping)
                        else task))


__all__ = ["CLASSIFICATION", "TASKS", "CausalLM", "Classification", "Task", "call_model",
           "get_task", "logits_of", "task_of"]
