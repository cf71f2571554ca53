"""``models.config`` and version policies: which models to serve, and which versions of each.

TF Serving reads a ``ModelServerConfig`` in protobuf text format, for example::

    model_config_list {
      config {
        name: "ranking"
        base_path: "/models/ranking"
        model_platform: "tensorflow"
        model_version_policy { specific { versions: 3 versions: 4 } }
        version_labels { key: "stable" value: 3 }
        version_labels { key: "canary" value: 4 }
      }
    }

Each model's ``base_path`` holds one folder per version, named by an integer
(``/models/ranking/4/saved_model.pb``); anything else in it is ignored. The version policy
picks the *aspired* versions among those on disk: ``latest { num_versions: N }`` (the
default, with N = 1), ``specific { versions: ... }`` or ``all {}``. Labels name versions
(``stable``, ``canary``) so a client can ask for a role instead of a number; the manager
checks them against what is loaded (see ``manager.ServerCore.reload_config``).

Everything here is pure (no TensorFlow): parsing, validation and policy resolution, so it is
unit-tested without a server. The protos are the official ones from
``tensorflow-serving-api``, so a file that this module accepts is one that
``tensorflow_model_server`` accepts, and the other way round.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.model_server.errors import ServingError, invalid_argument

if TYPE_CHECKING:
    from tensorflow_serving.config.model_server_config_pb2 import ModelConfig, ModelServerConfig

TENSORFLOW_PLATFORM = "tensorflow"
# The file TF Serving's SavedModel loader needs in a version folder (or its text twin).
SAVED_MODEL_FILES = ("saved_model.pb", "saved_model.pbtxt")
# A version folder name: TF Serving parses it as a 64-bit integer and ignores the rest.
_VERSION_RE = re.compile(r"^[0-9]+$")


def protos() -> Any:
    """``model_server_config_pb2``, imported on first use.

    The serving protos import TensorFlow (3 s), so they are not imported with this module;
    Keras 2 is selected first, as everywhere in the project.
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from tensorflow_serving.config import model_server_config_pb2

    return model_server_config_pb2


def parse_model_server_config(text: str, source: str = "<string>") -> ModelServerConfig:
    """Parse ``models.config`` text into the official ``ModelServerConfig`` proto.

    Args:
        text: protobuf text format, as ``tensorflow_model_server --model_config_file`` reads.
        source: a name for error messages (the file path).

    Raises:
        ServingError: INVALID_ARGUMENT naming the file, as TF Serving's ``ParseProtoTextFile``.
    """
    from google.protobuf import text_format

    config = protos().ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as e:
        raise invalid_argument(f"Invalid protobuf file: '{source}' ({e})") from None
    return config


def read_model_server_config(path: str | os.PathLike[str]) -> ModelServerConfig:
    """Read and parse a ``models.config`` file (see ``parse_model_server_config``)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ServingError("NOT_FOUND", f"{path}; {e.strerror}") from None
    return parse_model_server_config(text, str(path))


def single_model_config(model_name: str, model_base_path: str) -> ModelServerConfig:
    """The config that ``--model_name`` / ``--model_base_path`` stand for (one model, latest 1)."""
    config = protos().ModelServerConfig()
    model = config.model_config_list.config.add()
    model.name = model_name
    model.base_path = model_base_path
    model.model_platform = TENSORFLOW_PLATFORM
    return config


def model_platform(model: ModelConfig) -> str:
    """The platform of a model entry, honouring the deprecated ``model_type`` as TF Serving does."""
    pb = protos()
    if model.model_type != pb.MODEL_TYPE_UNSPECIFIED:
        if model.model_platform:
            raise invalid_argument(
                "Illegal setting both ModelServerConfig::model_type (deprecated) "
                "and ModelServerConfig::model_platform."
            )
        if model.model_type == pb.TENSORFLOW:
            return TENSORFLOW_PLATFORM
        raise invalid_argument(f"ModelServerConfig::model_type choice {model.model_type} not supported.")
    if not model.model_platform:
        raise invalid_argument(
            "Illegal setting neither ModelServerConfig::model_type (deprecated) "
            "nor ModelServerConfig::model_platform."
        )
    return model.model_platform


def _is_relative(uri: str) -> bool:
    # TF Serving accepts URIs (gs://, s3://) and absolute paths; a bare relative path is
    # refused because it would depend on the server's working directory.
    return "://" not in uri and not os.path.isabs(uri)


def validate_model_server_config(
    config: ModelServerConfig, previous: ModelServerConfig | None = None
) -> None:
    """Refuse a config that TF Serving's ``ServerCore::ReloadConfig`` would refuse.

    Checks, in TF Serving's order: only ``model_config_list`` configs (a transition from
    one list to another); unique model names; absolute base paths; a known platform
    (``tensorflow``, the only one this server has); no model changing platform.

    Raises:
        ServingError: INVALID_ARGUMENT or FAILED_PRECONDITION with TF Serving's message.
    """
    which = config.WhichOneof("config")
    if which == "custom_model_config" or (
        previous is not None and previous.WhichOneof("config") not in (None, "model_config_list")
    ):
        raise ServingError(
            "FAILED_PRECONDITION",
            "Cannot transition to requested config. It is only legal to transition "
            "from one ModelConfigList to another.",
        )
    names: set[str] = set()
    for model in config.model_config_list.config:
        if model.name in names:
            raise invalid_argument(f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
    for model in config.model_config_list.config:
        if _is_relative(model.base_path):
            raise invalid_argument(
                f"Expected model {model.name} to have an absolute path or URI; "
                f"got base_path()={model.base_path}"
            )
    old_platforms = {m.name: model_platform(m) for m in previous.model_config_list.config} if previous else {}
    for model in config.model_config_list.config:
        platform = model_platform(model)
        if platform != TENSORFLOW_PLATFORM:
            raise invalid_argument(f"Model {model.name} requests unsupported platform {platform}")
        old = old_platforms.get(model.name)
        if old is not None and old != platform:
            raise invalid_argument(
                f"Illegal to change a model's platform. For model {model.name} platform was "
                f"{old} and new platform requested is {platform}"
            )


def list_versions(base_path: str | os.PathLike[str]) -> dict[int, Path]:
    """The version folders under a model's base path: ``{version: folder}``.

    A folder counts when its name is an integer (``"0012"`` is version 12, as TF Serving
    parses it) and it already holds ``saved_model.pb``. Other names (``tmp``, ``1.bak``)
    are ignored, as TF Serving ignores them. A missing base path has no versions.
    """
    base = Path(base_path)
    try:
        entries = list(os.scandir(base))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    versions: dict[int, Path] = {}
    for entry in entries:
        if not entry.is_dir() or not _VERSION_RE.match(entry.name):
            continue
        path = Path(entry.path)
        # A publisher writes saved_model.pb last (TFX Pusher does): until it is there the
        # folder is still being written and loading it would only fail and retry.
        if any((path / f).is_file() for f in SAVED_MODEL_FILES):
            versions.setdefault(int(entry.name), path)
    return versions


def policy_name(model: ModelConfig) -> str:
    """``latest``, ``specific`` or ``all`` (an unset policy is ``latest``)."""
    return model.model_version_policy.WhichOneof("policy_choice") or "latest"


def aspired_versions(model: ModelConfig, on_disk: Iterable[int]) -> list[int]:
    """The versions a model's policy asks to serve, given the versions on disk, highest first.

    - ``latest { num_versions: N }``: the N highest (N below 1 counts as 1, and an unset
      policy is ``latest`` with N = 1, TF Serving's default);
    - ``specific { versions: [...] }``: those of the listed versions that are on disk;
    - ``all {}``: every version on disk.

    Args:
        model: the model's entry in ``models.config``.
        on_disk: integer versions found under its base path.

    Returns:
        The aspired versions, highest first.
    """
    present = sorted(set(on_disk), reverse=True)
    policy = model.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return present
    if choice == "specific":
        wanted = set(policy.specific.versions)
        return [v for v in present if v in wanted]
    n = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return present[:n]


def version_labels(model: ModelConfig) -> dict[str, int]:
    """The ``version_labels`` map of a model entry as a plain dict."""
    return dict(model.version_labels)


def config_to_text(config: ModelServerConfig) -> str:
    """Protobuf text of a config: what a ``models.config`` file holds."""
    from google.protobuf import text_format

    return text_format.MessageToString(config)
