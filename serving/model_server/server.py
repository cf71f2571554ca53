"""The model server process: gRPC and REST over one model manager, with TF Serving's flags.

Startup follows ``tensorflow_model_server``: build the ``ModelServerConfig`` (from
``--model_config_file``, or one model from ``--model_name``/``--model_base_path``), load
every model's aspired versions and wait for them, *then* open the gRPC port and the REST
port. A config that cannot be applied (a label on a version that is not loaded yet, a
relative base path, a version that fails to load) stops startup with
``Failed to start server. Error: ...``, as TF Serving does.

While running: base paths are polled every ``--file_system_poll_wait_seconds`` (new
versions load, old ones unload per policy), and ``models.config`` is re-read every
``--model_config_file_poll_wait_seconds`` when that is above 0 (TF Serving's default is 0:
the file is read once, and changes arrive through HandleReloadConfigRequest).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.model_server import config as cfg
from serving.model_server.errors import ServingError
from serving.model_server.manager import CoreOptions, ServerCore
from serving.model_server.metrics import PROMETHEUS_PATH, Metrics

log = logging.getLogger("serving.model_server")


@dataclass
class ServerOptions:
    """``tensorflow_model_server``'s flags that this server honours (same names, same defaults).

    Two differ on purpose: ``rest_api_port`` defaults to 8501 (the binary's default is 0,
    REST off, but the ``tensorflow/serving`` image passes 8501, and that is what production
    runs); and Prometheus is on at ``/monitoring/prometheus/metrics`` unless a
    ``monitoring_config_file`` says otherwise (the binary needs that file to turn it on).
    ``host`` is not a TF Serving flag: TF Serving listens on all interfaces, tests bind
    loopback.
    """

    # Each field is the flag ``--<name>``; ``help`` is what ``recsys serve model-server --help``
    # says of it (the command's flags are generated from these fields, in this order).
    port: int = field(default=8500, metadata={"help": "gRPC port (PredictionService, ModelService)."})
    rest_api_port: int = field(
        default=8501, metadata={"help": "REST port; 0 turns REST off (the binary's default)."}
    )
    model_config_file: str = field(
        default="", metadata={"help": "models.config (ModelServerConfig text proto)."}
    )
    model_config_file_poll_wait_seconds: int = field(
        default=0, metadata={"help": "Re-read models.config; 0: never."}
    )
    model_name: str = field(
        default="default", metadata={"help": "One model's name (without --model_config_file)."}
    )
    model_base_path: str = field(
        default="", metadata={"help": "One model's base path: <path>/<version>/saved_model.pb."}
    )
    file_system_poll_wait_seconds: int = field(
        default=1, metadata={"help": "Poll base paths for versions; 0: once."}
    )
    allow_version_labels_for_unavailable_models: bool = field(
        default=False,
        metadata={"help": "Let a new label point at a version that is not loaded yet (also =true|false)."},
    )
    max_num_load_retries: int = field(default=5, metadata={"help": "Retries of a failed version load."})
    load_retry_interval_micros: int = field(
        default=60_000_000, metadata={"help": "Wait between load retries."}
    )
    num_load_threads: int = field(default=0, metadata={"help": "Parallel loads."})
    enable_model_warmup: bool = field(
        default=True,
        metadata={"help": "Replay assets.extra/tf_serving_warmup_requests at load (also =true|false)."},
    )
    num_request_iterations_for_warmup: int = field(
        default=1, metadata={"help": "Replays of each warm-up record."}
    )
    saved_model_tags: str = field(default="serve", metadata={"help": "Meta graph tags, comma separated."})
    monitoring_config_file: str = field(
        default="", metadata={"help": "MonitoringConfig (prometheus_config) text proto."}
    )
    # Threads per op and ops at once; 0 lets TensorFlow choose (one per core). Under many
    # concurrent requests, 1 per op wastes less CPU on splitting small ops (docs/scaling.md).
    tensorflow_intra_op_parallelism: int = field(
        default=0, metadata={"help": "Threads per op; 0: TensorFlow's choice."}
    )
    tensorflow_inter_op_parallelism: int = field(
        default=0, metadata={"help": "Ops run at once; 0: TensorFlow's choice."}
    )
    # Threads handling gRPC calls; 0: tensorflow_model_server's default, 4 per core. Python
    # runs one at a time (the GIL), so on a few cores fewer threads mean fewer hand-offs
    # (bench/serving passes 2 on 2 cores).
    grpc_max_threads: int = field(
        default=0, metadata={"help": "Threads that handle gRPC calls; 0: 4 per core."}
    )
    host: str = field(
        default="0.0.0.0", metadata={"help": "Interface to bind (not a TF Serving flag; it binds all)."}
    )
    # Not a TF Serving flag: Python modules imported before any load to register custom ops
    # (``scann.scann_ops``), the stand-in's version of a server *built* with those ops
    # (docker/tf-serving/scann.Dockerfile). Empty, as stock TF Serving: a ScaNN SavedModel fails
    # to load.
    custom_op_modules: str = field(
        default="",
        metadata={
            "help": "Not a TF Serving flag: modules to import for custom ops, e.g. scann.scann_ops "
            "(what a ScaNN build of TF Serving links in)."
        },
    )

    # Not TF Serving flags: the reload RPC (HandleReloadConfigRequest) can point the server at
    # any folder it can read, so the stand-in closes it unless asked, and then accepts only
    # base paths under the model root. Stock TF Serving has no such switch: keep its gRPC port
    # off any public network (docker/compose.yaml publishes neither of its ports).
    allow_reload_config: bool = field(
        default=False,
        metadata={
            "help": "Not a TF Serving flag: accept HandleReloadConfigRequest (refused otherwise; "
            "also =true|false)."
        },
    )
    model_root: str = field(
        default="",
        metadata={
            "help": "Not a TF Serving flag: a reload's base paths must lie under this folder; "
            "empty: the folder of --model_config_file (or of --model_base_path)."
        },
    )

    def reload_root(self) -> str | None:
        """The folder a reload's base paths must lie under; None when reloads are refused."""
        if not self.allow_reload_config:
            return None
        source = self.model_config_file or self.model_base_path
        return self.model_root or (os.path.dirname(os.path.abspath(source)) if source else None)

    def core_options(self) -> CoreOptions:
        return CoreOptions(
            file_system_poll_wait_seconds=self.file_system_poll_wait_seconds,
            max_num_load_retries=self.max_num_load_retries,
            load_retry_interval_micros=self.load_retry_interval_micros,
            num_load_threads=self.num_load_threads,
            allow_version_labels_for_unavailable_models=self.allow_version_labels_for_unavailable_models,
            enable_model_warmup=self.enable_model_warmup,
            num_request_iterations_for_warmup=self.num_request_iterations_for_warmup,
            saved_model_tags=tuple(t for t in self.saved_model_tags.split(",") if t),
        )


def initial_config(options: ServerOptions) -> cfg.ModelServerConfig:
    """The config the server starts from (``--model_config_file`` wins over the single-model flags)."""
    if options.model_config_file:
        return cfg.read_model_server_config(options.model_config_file)
    if options.model_base_path:
        return cfg.single_model_config(options.model_name, options.model_base_path)
    raise ServingError(
        "INVALID_ARGUMENT",
        "Both server_options.model_base_path and server_options.model_config_file are empty!",
    )


def prometheus_path(options: ServerOptions) -> str | None:
    """Where metrics are served: the monitoring config's ``prometheus_config`` if one is given."""
    if not options.monitoring_config_file:
        return PROMETHEUS_PATH
    # MonitoringConfig is not among tensorflow-serving-api's protos; its two fields are
    # read off the text directly.
    text = Path(options.monitoring_config_file).read_text()
    if not re.search(r"enable\s*:\s*true", text):
        return None
    m = re.search(r'path\s*:\s*"([^"]*)"', text)
    return m.group(1) if m and m.group(1) else PROMETHEUS_PATH


def apply_tensorflow_threading(intra_op: int, inter_op: int) -> None:
    """Set TensorFlow's thread pools (the ``--tensorflow_*_parallelism`` flags); 0 leaves TF's choice.

    Raises:
        ServingError: FAILED_PRECONDITION when TensorFlow already ran in this process (the
            pools are fixed at its first op), so a flag is never silently ignored.
    """
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as e:
        raise ServingError(
            "FAILED_PRECONDITION",
            f"tensorflow_intra_op_parallelism={intra_op}, tensorflow_inter_op_parallelism={inter_op}: "
            f"TensorFlow is already initialized in this process ({e})",
        ) from None
    log.info(
        "TensorFlow threads: intra-op %d, inter-op %d",
        tf.config.threading.get_intra_op_parallelism_threads(),
        tf.config.threading.get_inter_op_parallelism_threads(),
    )


class ModelServer:
    """A running model server: manager, gRPC server, REST server and config-file poller.

    Use ``start()`` / ``stop()`` (or ``serve_forever()`` for the command line).
    """

    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.metrics = Metrics()
        self.core = ServerCore(options.core_options(), self.metrics)
        self.grpc_server: Any = None
        self.grpc_port = 0
        self.rest_port = 0
        self._uvicorn: Any = None
        self._rest_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._config_text: str | None = None
        self._poller: threading.Thread | None = None

    def start(self) -> None:
        """Load the initial models, then open the ports. Raises ``ServingError`` if startup fails."""
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before the serving protos import TF
        import importlib

        apply_tensorflow_threading(
            self.options.tensorflow_intra_op_parallelism, self.options.tensorflow_inter_op_parallelism
        )
        for module in (m.strip() for m in self.options.custom_op_modules.split(",")):
            if module:
                importlib.import_module(module)
        config = initial_config(self.options)
        if self.options.model_config_file:
            self._config_text = Path(self.options.model_config_file).read_text()
        self.core.reload_config(config)

        from serving.model_server.grpc_service import create_grpc_server

        threads = self.options.grpc_max_threads or 4 * (os.cpu_count() or 1)
        self.grpc_server, self.grpc_port = create_grpc_server(
            self.core, self.metrics, self.options.port, self.options.host, threads, self.options.reload_root()
        )
        self.grpc_server.start()
        host, port = self.options.host, self.grpc_port
        log.info("Running gRPC ModelServer at %s:%d (%d threads) ...", host, port, threads)
        if self.options.rest_api_port > 0:
            self._start_rest()
        if self.options.model_config_file and self.options.model_config_file_poll_wait_seconds > 0:
            self._poller = threading.Thread(target=self._poll_config_file, name="config-poll", daemon=True)
            self._poller.start()

    def _start_rest(self) -> None:
        import uvicorn

        from serving.model_server.rest import create_app

        app = create_app(self.core, self.metrics, prometheus_path(self.options))
        config = uvicorn.Config(
            app,
            host=self.options.host,
            port=self.options.rest_api_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._uvicorn = uvicorn.Server(config)
        # uvicorn only captures signals on the main thread; serve_forever owns them here.
        self._rest_thread = threading.Thread(target=self._uvicorn.run, name="rest", daemon=True)
        self._rest_thread.start()
        for _ in range(200):
            if self._uvicorn.started or not self._rest_thread.is_alive():
                break
            self._stop.wait(0.05)
        if not self._uvicorn.started:
            raise OSError(
                f"could not start the REST server on {self.options.host}:{self.options.rest_api_port}"
            )
        self.rest_port = self.options.rest_api_port
        log.info("Exporting HTTP/REST API at:%s:%d ...", self.options.host, self.rest_port)

    def _poll_config_file(self) -> None:
        # As TF Serving's PollFilesystemAndReloadConfig: the file is applied at every poll,
        # changed or not, so with polling on it overrides HandleReloadConfigRequest.
        path = self.options.model_config_file
        while not self._stop.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                text = Path(path).read_text()
                self.core.reload_config(cfg.parse_model_server_config(text, path))
                if text != self._config_text:
                    log.info("Reloaded model config from %s", path)
                self._config_text = text
            except (OSError, ServingError) as e:
                # A bad poll is logged and the models keep serving as they were.
                log.error("PollFilesystemAndReloadConfig failed to ReloadConfig: %s", e)

    def stop(self) -> None:
        self._stop.set()
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._rest_thread is not None:
            self._rest_thread.join(timeout=5)
        if self.grpc_server is not None:
            self.grpc_server.stop(grace=1).wait(timeout=5)
        self.core.stop()

    def serve_forever(self) -> None:
        """Block until SIGINT or SIGTERM, then shut down cleanly."""
        done = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: done.set())
        try:
            while not done.wait(1.0):
                pass
        finally:
            self.stop()


def run_model_server(options: ServerOptions) -> int:
    """Start, serve until a signal, and return the exit status (255 when startup fails, like TF)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = ModelServer(options)
    try:
        server.start()
    except (ServingError, OSError) as e:
        log.error("Failed to start server. Error: %s", e)
        server.stop()
        return 255
    server.serve_forever()
    return 0
