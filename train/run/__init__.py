"""A run as a value and as a folder: its spec and identity, and the folder's one owner.

- spec.py: `RunSpec`, its identity (what counts, what does not) and its name;
- folder.py: where a spec's folder is, the rules for starting, resuming and finishing it;
- lock.py, state.py, log.py: its lock, its state as its files show it, its log.jsonl (no torch, so a
  launcher's job process that only watches folders stays light);
- checkpoint.py: crash-safe checkpoints; index.py: the grid's runs.tsv; legacy.py: older folders renamed;
- trained.py, experts.py: a finished run read back (its model; X-LoRA's experts from runs).

Beneath it: train/tasks/ and train/base/. It never imports train/trainer/ or train/cli/.
"""
