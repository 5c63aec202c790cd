"""The ground floor of train/: what every room shares and nothing of train/ beneath it.

- settings.py: the typed settings of a run (training, output, runtime, multitask; the machinery tasks
  declare their own settings with);
- console.py: progress that never goes quiet (a bar on a terminal, a heartbeat line elsewhere).
"""
