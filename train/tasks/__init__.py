"""The task registry. Each task file registers itself; one import line per task here.

To add a task: write `train/tasks/<name>.py` (a `Task` subclass decorated with `@register_task`,
see train/tasks/base.py) and add it to the import line below. The entry points, evaluation,
multitask, `experiments/ablate.py` and `experiments/report.py` all loop over `TASKS`.
"""

# Registration order = the order tasks are listed in.
# isort: off
from train.tasks import sentiment, paraphrase, sonnet  # noqa: F401  (registration side effect)
# isort: on

from train.tasks.base import (
    TASKS,
    Task,
    get_task,
    labelled_tasks,
    register_task,
    selection_score,
    settings_classes,
    task_index,
)

__all__ = [
    "TASKS",
    "Task",
    "get_task",
    "labelled_tasks",
    "register_task",
    "selection_score",
    "settings_classes",
    "task_index",
]
