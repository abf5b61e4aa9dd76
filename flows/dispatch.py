"""The `stage` flow: one stage task, or one stage group, by name, as a flow run on a work pool.

Deployed twice (deployments/prefect.yaml): `gpu-stage` on the `gpu` pool and `cpu-stage` on the
`cpu` pool. A deployed audit does not call it directly: a stage task that is not in the store and
belongs to another pool starts it (tasks/_stage.py), passing the task's own parameters as JSON
(store references, configs), and reads back the artifact reference it returns. Inside a stage
group (tasks._stage.stage_group: e.g. every model stage of an audit), that first stage
starts it for the whole group instead, with the group's arguments: the group's stages run here
in order, each through the store (served where stored, else computed and stored), and the run
returns the keys it computed; the caller then serves every stage of the group from the store.
"""

from __future__ import annotations

import importlib
from typing import Any

from prefect import Task, flow
from prefect.states import Completed, State

from tasks._stage import GROUP_MARK, from_json, running_here


def resolve(task: str):
    """The stage task (``tasks.<module>:<task>``) or stage group (``flows.<module>:<function>``,
    marked by tasks._stage.stage_group) of this package named ``module:attribute``."""
    module, _, attribute = task.partition(":")
    if not module.startswith(("tasks.", "flows.")) or not attribute:
        raise ValueError(f"not a stage task or group of this package: {task!r}")
    obj = getattr(importlib.import_module(module), attribute, None)
    if isinstance(obj, Task) if module.startswith("tasks.") else getattr(obj, GROUP_MARK, False):
        return obj
    raise ValueError(f"{task!r} is not a stage task or group")


@flow(name="stage", persist_result=True)
def stage(task: str, parameters: dict[str, Any]) -> State:
    """Run one stage task or group here, every stage of it in this flow run; a task ends in its
    state ("Cached" or not) with its artifact reference, a group in the keys it computed."""
    target = resolve(task)
    with running_here() as computed:
        if not isinstance(target, Task):
            target(**from_json(parameters))
            return Completed(message=f"computed {len(computed)} artifacts", data=sorted(computed))
        state = target(**from_json(parameters), return_state=True)
    return Completed(name=state.name, message=state.message, data=state.result())
