"""The model registry: ``<models>/models.config`` and the version labels in it, one owner.

A model server watches ``<base>/<model>/`` for integer-named version folders; ``models.config``
(TF Serving's ModelServerConfig, text format) says which versions to keep loaded and which
*labels* point at them. Two labels drive a rollout: ``stable`` (what most traffic gets) and
``canary`` (the newest version, tried by a slice of traffic until promoted or rolled back).

TF Serving refuses a label on a version it has not loaded, so a label move writes
``models.load.config`` first (every version either config needs, labels as they were) and
then ``models.config``; a server applies them in that order. Every read-modify-write of the
two files (push, promote, rollback, the gateway putting back labels a server refused) holds
``registry_lock``, so two writers never interleave.

Writing the files changes nothing on a running server: the gateway applies them to it with
HandleReloadConfigRequest (``serving.gateway.config_sync``, within one refresh period of the
write, under ``apply_lock``); the server reads ``models.config`` itself only when it starts.

The model server reads ``models.config`` with its own parser, as ``tensorflow_model_server``
reads its ``--model_config_file``: it stands in for that binary and knows nothing of this
project. Everything else reads and writes the files through this module.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from recsys.storage import fsync_path

if TYPE_CHECKING:
    from recsys.config import Settings

MODELS_CONFIG = "models.config"
# The same versions with the labels as they were: a server applies this first (load), then
# models.config (label), since TF Serving refuses a label on a version not loaded yet.
LOAD_CONFIG = "models.load.config"
LABELS = ("stable", "canary")
_LOCK_FILE = ".labels.lock"
_APPLY_LOCK_FILE = ".apply.lock"


class RegistryError(RuntimeError):
    """``models.config`` cannot take the change asked for (nothing pushed, labels missing)."""


def integer_versions(model_dir: Path) -> list[int]:
    """Version folders of one model (integer names only, as TF Serving sees them), ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def _parse(path: Path) -> Any:
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    return text_format.Parse(path.read_text(), model_server_config_pb2.ModelServerConfig())


def read_models_config(base_path: Path, name: str = MODELS_CONFIG) -> dict[str, dict[str, Any]]:
    """``models.config`` as {model: {"base_path", "versions", "labels"}}; {} when absent."""
    path = Path(base_path) / name
    if not path.is_file():
        return {}
    return {
        c.name: {
            "base_path": c.base_path,
            "versions": list(c.model_version_policy.specific.versions),
            "labels": dict(c.version_labels),
        }
        for c in _parse(path).model_config_list.config
    }


def read_config_proto(base_path: Path, name: str = MODELS_CONFIG) -> Any:
    """``models.config`` (or ``models.load.config``) as TF Serving's ``ModelServerConfig`` proto,
    what a model server's ``HandleReloadConfigRequest`` takes; None when the file is absent."""
    path = Path(base_path) / name
    return _parse(path) if path.is_file() else None


def restore_labels(
    base_path: Path, refused: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Put ``models.config`` back to the labels of ``models.load.config`` (those a server still
    serves after refusing the new ones), under the registry's lock; returns them ({}: none).

    With ``refused`` (the ``models.config`` that was refused, as read before), nothing is
    written when the file no longer says that: another writer (a push, a rollback) replaced
    it since, and its labels are not this caller's to undo.
    """
    with registry_lock(Path(base_path)):
        current = read_models_config(base_path)
        if refused is not None and current != refused:
            return {}
        previous = read_load_labels(base_path)
        # Nothing rewritten when it already says that: a reader watching the file for changes
        # (the gateway's config_sync) must not see a change that is none, or it would retry.
        if previous and previous != current:
            write_models_config(Path(base_path) / MODELS_CONFIG, previous)
    return previous


def read_load_labels(base_path: Path) -> dict[str, dict[str, Any]]:
    """``models.load.config``'s labels as a models.config (only the versions they name)."""
    out = {}
    for name, m in read_models_config(base_path, LOAD_CONFIG).items():
        labels = {k: int(v) for k, v in m["labels"].items()}
        if labels:
            versions = sorted(set(labels.values()))
            out[name] = {"base_path": m["base_path"], "versions": versions, "labels": labels}
    return out


def config_proto(models: Mapping[str, Mapping[str, Any]]) -> Any:
    """{model: {"base_path", "versions", "labels"}} as TF Serving's ``ModelServerConfig`` proto."""
    from tensorflow_serving.config import model_server_config_pb2

    cfg = model_server_config_pb2.ModelServerConfig()
    for name, m in models.items():
        c = cfg.model_config_list.config.add()
        c.name = name
        c.base_path = str(m["base_path"])
        c.model_platform = "tensorflow"
        c.model_version_policy.specific.versions.extend(sorted(set(m["versions"])))
        for label, version in sorted(m["labels"].items()):
            c.version_labels[label] = version
    return cfg


def write_models_config(path: Path, models: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write a ModelServerConfig (text format) atomically: a server never reads half a file."""
    from google.protobuf import text_format

    cfg = config_proto(models)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w") as f:
        f.write(text_format.MessageToString(cfg))
        f.flush()
        os.fsync(f.fileno())  # the content is on disk before the name points at it...
    os.replace(tmp, path)
    fsync_path(path.parent)  # ...and the rename itself survives a power loss
    return path


def write_registry(
    base_path: Path, load: Mapping[str, Mapping[str, Any]], serve: Mapping[str, Mapping[str, Any]]
) -> None:
    """Write ``models.load.config`` (``load``), then ``models.config`` (``serve``).

    A server applies them in that order, so a reader that finds the new ``models.config``
    also finds every version it labels in the load config. Call it holding ``registry_lock``.
    """
    write_models_config(Path(base_path) / LOAD_CONFIG, load)
    write_models_config(Path(base_path) / MODELS_CONFIG, serve)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    # flock is per open file: two threads of one process exclude each other as two processes do.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def registry_lock(base: Path) -> Iterator[None]:
    """Hold the registry's lock: the DAG and a person at the CLI may move labels at once."""
    with _flock(Path(base) / _LOCK_FILE):
        yield


@contextlib.contextmanager
def apply_lock(base: Path) -> Iterator[None]:
    """Hold the lock of applying the registry to a model server (``models.load.config``, then
    ``models.config``), apart from ``registry_lock`` so that writers never wait on a load.

    One applier at a time, across threads and gateway processes: otherwise one could send the
    load config (the labels as they were) after another had sent the new labels, and put a
    rolled-back canary in service again for the length of a check.
    """
    with _flock(Path(base) / _APPLY_LOCK_FILE):
        yield


def version_for_label(base_path: Path, model: str, label: str = "stable") -> int:
    """The version a label of ``models.config`` points at; names the labels there if absent."""
    models = read_models_config(Path(base_path))
    if model not in models:
        raise FileNotFoundError(f"model {model!r} is not in {Path(base_path) / MODELS_CONFIG}: push first")
    labels = models[model]["labels"]
    if label not in labels:
        raise KeyError(f"model {model!r} has no version labelled {label!r}; labels: {labels}")
    return int(labels[label])


def model_names(settings: Settings) -> list[str]:
    """The models pushed together under one version: retrieval, then ranking."""
    return [settings.push.retrieval_model, settings.push.ranking_model]


def serving_labels(settings: Settings) -> dict[str, dict[str, int]]:
    """{"stable": {model: version}, "canary": {model: version}} from ``models.config`` ({} if none)."""
    models = read_models_config(settings.models_dir)
    labels: dict[str, dict[str, int]] = {label: {} for label in LABELS}
    for name in model_names(settings):
        for label in labels:
            if name in models and label in models[name]["labels"]:
                labels[label][name] = int(models[name]["labels"][label])
    return labels if any(labels.values()) else {}


def rollout_in_progress(serving: Mapping[str, Mapping[str, int]]) -> bool:
    """True while some model's canary label points elsewhere than its stable label."""
    return bool(serving) and any(serving["canary"].get(m) != v for m, v in serving["stable"].items())


def move_labels(settings: Settings, action: Literal["promote", "rollback"]) -> dict[str, Any]:
    """Promote (stable := canary) or roll back (canary := stable) both models in ``models.config``.

    ``models.load.config`` is written first with every version either config needs and the
    labels as they were. After the move, ``models.config`` keeps only the labelled versions
    loaded (the other one unloads), as a push does.

    Returns:
        {"before": {model: labels}, "after": {model: labels}, "changed": bool}.

    Raises:
        RegistryError: no ``models.config``, a model missing from it, or the target version's
            folder missing on disk.
    """
    base = settings.models_dir
    with registry_lock(base):
        current = read_models_config(base)
        if not current:
            raise RegistryError(f"no {base / MODELS_CONFIG}: nothing has been pushed")
        new = {name: dict(m) for name, m in current.items()}
        load = {name: dict(m) for name, m in current.items()}
        before, after = {}, {}
        for name in model_names(settings):
            if name not in current or not set(LABELS) <= set(current[name]["labels"]):
                raise RegistryError(
                    f"model {name!r} has no stable and canary labels in {base / MODELS_CONFIG}"
                )
            labels = {k: int(v) for k, v in current[name]["labels"].items()}
            target = labels["canary"] if action == "promote" else labels["stable"]
            model_dir = Path(current[name]["base_path"])
            if target not in integer_versions(model_dir):
                raise RegistryError(f"{name} version {target} is not on disk under {model_dir}")
            moved = {**labels, "stable": target, "canary": target}
            before[name], after[name] = labels, moved
            new[name] = {**current[name], "versions": sorted(set(moved.values())), "labels": moved}
            load[name] = {
                **current[name],
                "versions": sorted(set(current[name]["versions"]) | set(moved.values())),
                "labels": labels,
            }
        changed = before != after
        if changed:
            write_registry(base, load, new)
    return {"before": before, "after": after, "changed": changed}
