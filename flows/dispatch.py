"""The `stage` flow: one stage task, by name, as a flow run on a work pool.

Deployed twice (deployments/prefect.yaml): `gpu-stage` on the `gpu` pool and `cpu-stage` on the
`cpu` pool. A deployed audit does not call it directly: a stage task that is not in the store and
belongs to another pool starts it (tasks/_stage.py), passing the task's own parameters as JSON
(store references, configs), and reads back the artifact reference it returns.
"""

from __future__ import annotations

import importlib
import typing
from typing import Any

from prefect import Task, flow
from prefect.states import Completed, State
from pydantic import TypeAdapter


def resolve(task: str) -> Task:
    """The stage task named ``module:attribute``; only tasks of the `tasks` package."""
    module, _, attribute = task.partition(":")
    if not module.startswith("tasks.") or not attribute:
        raise ValueError(f"not a stage task of this package: {task!r}")
    obj = getattr(importlib.import_module(module), attribute, None)
    if not isinstance(obj, Task):
        raise ValueError(f"{task!r} is not a Prefect task")
    return obj


def typed(stage: Task, parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON parameters turned back into what the task's annotations say (refs, configs)."""
    hints = typing.get_type_hints(stage.fn)
    return {
        name: TypeAdapter(hints[name]).validate_python(value) if name in hints else value
        for name, value in parameters.items()
    }


@flow(name="stage", persist_result=True)
def stage(task: str, parameters: dict[str, Any]) -> State:
    """Run one stage task (``tasks.<module>:<task>``) here; end in its state ("Cached" or not)."""
    stage_task = resolve(task)
    state = stage_task(**typed(stage_task, parameters), return_state=True)
    return Completed(name=state.name, message=state.message, data=state.result())
