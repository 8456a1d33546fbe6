"""Which Hugging Face datasets lmms-eval tasks need, and whether the offline cache has them.

lmms-eval 0.7.3 loads a task's data with ``datasets.load_dataset(dataset_path, dataset_name,
cache_dir=<datasets cache>)``. With ``HF_DATASETS_OFFLINE=1`` that only succeeds when the
``datasets`` cache holds a prepared copy, at
``<cache>/<namespace>___<snake_case(name)>/<config>/<version>/<hash>/`` (``dataset_info.json`` +
Arrow files), where ``<cache>`` is ``$LMMS_EVAL_DATASETS_CACHE``, else ``$HF_DATASETS_CACHE``,
else ``$HF_HOME/datasets`` (lmms-eval's ``_resolve_hf_datasets_cache_dir``). :func:`missing`
checks every task's dataset up front, so that a run fails before any model work, naming the
task and the dataset, instead of deep inside lmms-eval after the first models were evaluated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetRef:
    """Where an lmms-eval task's data comes from: Hub id, config (None: the default one), split."""

    task: str
    path: str
    name: str | None
    split: str

    @property
    def label(self) -> str:
        return f"{self.path} (config {self.name or 'default'}, split {self.split})"


def task_dataset(task_config: dict, task: str) -> DatasetRef | None:
    """The Hub dataset of a task config (lmms-eval YAML, ``include`` resolved), or None for a task
    whose data are local files (``dataset_kwargs.data_files``, ``load_from_disk``, a local path)
    or that names no ``dataset_path``."""
    path = task_config.get("dataset_path")
    kwargs = task_config.get("dataset_kwargs") or {}
    if not path or kwargs.get("data_files") or kwargs.get("load_from_disk") or Path(str(path)).exists():
        return None
    split = task_config.get("test_split") or task_config.get("validation_split") or "test"
    return DatasetRef(task, str(path), task_config.get("dataset_name"), str(split))


def task_datasets(task_manager, tasks) -> list[DatasetRef]:
    """The Hub datasets of ``tasks`` (lmms-eval task names known to ``task_manager``), read from
    their YAML without importing the tasks' code; tasks on local data are left out."""
    from lmms_eval.utils import load_yaml_config

    refs = []
    for task in tasks:
        entry = task_manager.task_index.get(task) or {}
        yaml_path = entry.get("yaml_path", -1)
        if yaml_path == -1:  # a Python-class task or a group: nothing to check from YAML
            continue
        ref = task_dataset(load_yaml_config(yaml_path, mode="simple"), task)
        if ref is not None:
            refs.append(ref)
    return refs


def datasets_cache_dir() -> Path:
    """The ``datasets`` cache lmms-eval loads task data from (its own resolution rule)."""
    from lmms_eval.api.task import _resolve_hf_datasets_cache_dir

    return Path(_resolve_hf_datasets_cache_dir())


def cache_root(cache_dir: str | Path, repo_id: str) -> Path:
    """``<cache_dir>/<namespace>___<snake_case(name)>``: where ``datasets`` keeps a Hub dataset."""
    from datasets.naming import camelcase_to_snakecase

    ns, _, name = repo_id.rpartition("/")
    leaf = camelcase_to_snakecase(name)
    return Path(cache_dir) / (f"{ns}___{leaf}" if ns else leaf)


def find_cached(cache_dir: str | Path, ref: DatasetRef) -> Path | None:
    """The cached directory ``load_dataset(ref.path, ref.name)`` loads offline (the newest
    ``<config>/<version>/<hash>`` whose ``dataset_info.json`` lists ``ref.split``), or None. The
    lookup of ``datasets``' offline ``cache`` module: config ``ref.name``; without a name, a
    config cached under its own name (``default`` for a Hub dataset without configs)."""
    root = cache_root(cache_dir, ref.path)
    hits = []
    for d in root.glob(f"{ref.name or '*'}/*/*"):
        info = d / "dataset_info.json"
        if not info.is_file():
            continue
        try:
            meta = json.loads(info.read_text())
        except ValueError:
            continue
        if ref.name is None and meta.get("config_name") != d.parts[-3]:
            continue
        if ref.split in (meta.get("splits") or {}):
            hits.append(d)
    return max(hits, key=lambda p: p.stat().st_mtime) if hits else None


def missing(refs: list[DatasetRef], cache_dir: str | Path) -> list[DatasetRef]:
    """The datasets of ``refs`` that are not in the cache ``cache_dir``."""
    return [r for r in refs if find_cached(cache_dir, r) is None]


def missing_message(refs: list[DatasetRef], cache_dir: str | Path, field: str = "eval.tasks") -> str:
    """One line naming every task whose dataset is not cached, and the dataset it needs."""
    what = "; ".join(f"task '{r.task}' needs dataset {r.label}" for r in refs)
    return (f"{field}: {what}: not found in the HF datasets cache {cache_dir} (nothing is downloaded at "
            f"run time: fetch it on a connected machine and copy the cache, docs/evaluation.md)")
