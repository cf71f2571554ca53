"""A stand-in for ``tensorflow_model_server``, which is not installable here.

The TensorFlow Serving binary is not on PyPI nor in Debian, so this package serves the
same SavedModels over the same APIs: gRPC ``PredictionService`` (Predict,
GetModelMetadata) and ``ModelService`` (GetModelStatus, HandleReloadConfigRequest) on
``--port`` (8500), and the REST API on ``--rest_api_port`` (8501), from the same model base
path and ``models.config``, with TF Serving's version policies, labels, polling, warm-up,
status codes and error messages. Clients use the official ``tensorflow_serving.apis``
stubs or plain REST JSON and cannot tell the difference.

Production runs the real server: the stock ``tensorflow/serving`` image at the exporting
TensorFlow's version, or a ScaNN build of it (``docker/tf-serving/scann.Dockerfile``) for
SavedModels that embed ScaNN ops.

Modules: ``config`` (models.config, version policies), ``manager`` (loading, unloading,
labels, status), ``servable`` (one loaded SavedModel, warm-up), ``tensors`` (wire formats),
``grpc_service``, ``rest``, ``metrics``, ``server`` (the process and its flags).

Nothing is imported with the package (TensorFlow comes with the serving protos): import
``serving.model_server.server`` for ``ModelServer``, ``ServerOptions`` and ``run_model_server``.
"""
