"""Admin actions of the gateway: apply ``models.config`` to the model server, promote, roll back.

All of them need the API key (``serving.gateway.security``) and none takes a path: the
files they read are the configured ``<models dir>/models.load.config`` and ``models.config``.

``reload_models`` is the one way a push or a label move (the canary DAG's promote or
rollback, ``recsys canary``) reaches the model server: the gateway's refresh thread runs it
within one ``gateway.refresh_seconds`` of a change to ``models.config``
(``serving.gateway.config_sync``), and ``POST /v1/admin/reload`` runs it at once and answers
with the result. The server never polls the file. It goes in TF Serving's two steps: first
the load config (every version either config needs, labels as they were), then, only when
every labelled version is AVAILABLE on the server and offers the signature the gateway
calls, ``models.config`` with the new labels. A version that fails to load or does not fit
(a corrupted export, another model's SavedModel) is refused: the server keeps the labels it
had (and drops what it loaded for the refused ones), ``models.config`` on disk is put back
to them (so the gateway, the canary analysis and the server agree on what serves), and the
refusal names each model, version, state and error.

``promote`` runs the same checks on the canary before moving any label, so a canary that
is not serving can never become stable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from recsys.config import Settings
from recsys.model_registry import (
    LOAD_CONFIG,
    MODELS_CONFIG,
    apply_lock,
    config_proto,
    read_config_proto,
    read_models_config,
    registry_lock,
    restore_labels,
    rollout_in_progress,
    serving_labels,
)
from serving.clients import ModelServerError

log = logging.getLogger("serving.gateway.admin")

# The signature the gateway calls on each role's model (CandidateChain.candidates, ModelCalls.rank).
SIGNATURES = {"retrieval": "retrieve", "ranking": "rank"}
# A call that failed with one of these never reached the server's decision: try again later.
UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# A person's promote or rollback, recorded with the canary analysis' numbers at that moment
# (``components.canary.manual``): the entry point that starts the gateway passes it in, so the
# serving side never imports a pipeline step. It raises to refuse, with the reason as message.
ManualRollout = Callable[[Settings, Literal["promote", "rollback"], str], dict[str, Any]]


class AdminRefused(RuntimeError):
    """An admin action that was checked and refused; ``problems`` names each reason."""

    def __init__(
        self, action: str, problems: list[str], detail: dict[str, Any] | None = None, retry: bool = False
    ) -> None:
        super().__init__(f"{action} refused: " + "; ".join(problems))
        self.action, self.problems, self.detail = action, problems, detail or {}
        # The model server could not be reached: nothing was checked or refused; try again.
        self.retry = retry


def _roles(settings: Settings) -> dict[str, str]:
    return {settings.push.retrieval_model: "retrieval", settings.push.ranking_model: "ranking"}


def check_versions(client: Any, settings: Settings, wanted: dict[str, set[int]], timeout: float) -> list[str]:
    """Wait until each wanted version is AVAILABLE or has failed; return what is wrong with each.

    A version is fine when the server reports it AVAILABLE and its metadata has the
    signature the gateway calls; it is wrong when it ends (END: load failed), stays
    unloaded past ``timeout``, or lacks the signature.
    """
    problems: list[str] = []
    deadline = time.monotonic() + timeout
    roles = _roles(settings)
    for model, versions in sorted(wanted.items()):
        for v in sorted(versions):
            state, error = "UNKNOWN", ""
            while True:
                try:
                    rows = client.status(model, v, timeout=5)
                    state = rows[0].state if rows else "UNKNOWN"
                    error = f"{rows[0].error_code}: {rows[0].error_message}" if rows else ""
                except ModelServerError as e:
                    state, error = "UNKNOWN", f"{e.code}: {e.message}"
                if state in ("AVAILABLE", "END") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if state != "AVAILABLE":
                problems.append(f"{model} version {v} is {state} on the model server ({error.strip()})")
                continue
            signature = SIGNATURES.get(roles.get(model, ""))
            if signature is None:
                continue
            try:
                signatures = client.metadata(model, v, timeout=5)
            except ModelServerError as e:
                problems.append(f"{model} version {v}: metadata failed ({e.code}: {e.message})")
                continue
            if signature not in signatures:
                problems.append(
                    f"{model} version {v} is incompatible: no signature {signature!r} "
                    f"(it has {sorted(signatures)})"
                )
    return problems


def serves(client: Any, settings: Settings, target: dict[str, dict[str, Any]]) -> bool:
    """True when the server already serves ``target``'s labels: each label resolves to the
    version ``models.config`` names, and each of those is AVAILABLE with the gateway's signature.

    Nothing needs applying then, and nothing is: sending the load config again (the labels as
    they were) would put the previous labels back in service for the length of the checks.
    """
    wanted: dict[str, set[int]] = {}
    for model, spec in target.items():
        for label, version in spec["labels"].items():
            try:
                if client.label_version(model, label, timeout=5) != int(version):
                    return False
            except ModelServerError as e:
                if e.code in UNREACHABLE:
                    raise  # no answer is no evidence: send nothing (the caller tries again)
                return False  # the server does not know the label, or its version is not loaded
            wanted.setdefault(model, set()).add(int(version))
    return not check_versions(client, settings, wanted, timeout=0.0)


def reload_models(gateway: Any, timeout: float = 60.0) -> dict[str, Any]:
    """Apply the load config, check every labelled version, then apply ``models.config``.

    One applier at a time (``apply_lock``, across gateways); a server that already serves the
    labels of ``models.config`` is left as it is (``serves``).

    Returns:
        {"applied": True, "changed": bool, "labels": {model: labels}} when the server now
        serves the labels (``changed``: whether this call had to apply them).

    Raises:
        AdminRefused: a labelled version failed to load or is incompatible; nothing was
            relabelled, ``models.config`` was put back to the labels still serving and the
            server told to drop what it loaded for the refused ones. With ``retry`` set, the
            model server could not be reached: nothing was decided.
    """
    settings: Settings = gateway.settings
    base = settings.models_dir
    refused: AdminRefused | None = None
    with apply_lock(base):
        # Both files read under the registry's lock: a push, promote or rollback writes them
        # together under it, so the load config and models.config applied here belong together.
        with registry_lock(base):
            target = read_models_config(base)
            load = read_config_proto(base, LOAD_CONFIG)
            serve = read_config_proto(base)
        if not target:
            raise AdminRefused("reload", [f"no {base / MODELS_CONFIG}: nothing has been pushed"])
        labels = {m: s["labels"] for m, s in target.items()}
        try:
            changed = not serves(gateway.client, settings, target)
            if changed:
                refused = _apply(gateway, target, load, serve, timeout)
        except ModelServerError as e:
            unreachable = e.code in UNREACHABLE
            what = "model server did not answer" if unreachable else "model server refused the config"
            raise AdminRefused("reload", [f"{what}: {e.code}: {e.message}"], retry=unreachable) from None
    gateway.refresh()
    if refused is not None:
        raise refused
    return {"applied": True, "changed": changed, "labels": labels}


def _apply(
    gateway: Any, target: dict[str, dict[str, Any]], load: Any, serve: Any, timeout: float
) -> AdminRefused | None:
    """TF Serving's two steps; the refusal (labels put back) when a labelled version is not fit."""
    settings: Settings = gateway.settings
    if load is not None:
        gateway.client.reload_config(load)
    wanted = {m: {int(v) for v in spec["labels"].values()} for m, spec in target.items()}
    problems = check_versions(gateway.client, settings, wanted, timeout)
    if not problems:
        gateway.client.reload_config(serve)
        return None
    _raise_if_unreachable(gateway.client, target)  # a server gone mid-way refused nothing
    # Put models.config back to the labels the server still serves (those of the load
    # config), so every reader agrees that the refused version does not serve.
    # Only if models.config still says what was refused: a writer since is not undone.
    previous = restore_labels(settings.models_dir, refused=target)
    if previous:
        try:  # the same labels, without the refused versions: the server unloads them
            gateway.client.reload_config(config_proto(previous))
        except ModelServerError as e:
            log.warning("could not unload the refused versions: %s: %s", e.code, e.message)
    log.warning("reload refused: %s", "; ".join(problems))
    return AdminRefused("reload", problems, {"serving": {m: s["labels"] for m, s in previous.items()}})


def _raise_if_unreachable(client: Any, target: dict[str, dict[str, Any]]) -> None:
    try:
        client.status(next(iter(target)), None, timeout=5)
    except ModelServerError as e:
        if e.code in UNREACHABLE:
            raise


def move_canary(
    gateway: Any,
    action: Literal["promote", "rollback"],
    reason: str,
    manual_rollout: ManualRollout | None,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """Promote (after checking the canary serves) or roll back, record it, apply it to the server.

    Raises:
        AdminRefused: no rollout in progress, or (promote) a canary version that is not
            AVAILABLE on the model server or lacks the gateway's signature; or no
            ``manual_rollout`` was given to this gateway.
    """
    settings: Settings = gateway.settings
    if manual_rollout is None:
        raise AdminRefused(action, ["this gateway was started without rollout control"])
    serving = serving_labels(settings)
    if not serving:
        raise AdminRefused(action, ["nothing has been pushed: no models.config"])
    if action == "promote":
        if not rollout_in_progress(serving):
            raise AdminRefused(action, [f"no canary in rollout: stable and canary are {serving['stable']}"])
        wanted = {m: {v} for m, v in serving["canary"].items()}
        # No waiting: a canary that is not AVAILABLE right now has served nothing to judge.
        problems = check_versions(gateway.client, settings, wanted, timeout=0.0)
        if problems:
            raise AdminRefused(action, problems, {"serving": serving})
    try:
        record = manual_rollout(settings, action, reason or f"{action} through the gateway's admin API")
    except RuntimeError as e:
        raise AdminRefused(action, [str(e)]) from None
    applied = reload_models(gateway, timeout=timeout)
    return {"action": action, "labels": record.get("labels"), "applied": applied["applied"]}
