# Optional variant: TensorFlow Serving with ScaNN's custom ops. Only a retrieval model pushed
# with `push.retrieval_index: scann_ops` needs it (ScaNN's ops in the graph); stock
# tensorflow/serving answers "Op type not registered 'Scann...'" for that model, and the
# gateway then falls back to exact search. The default exports run on the stock image
# (Dockerfile here); compose.yaml says how to switch.
#
# There is no published base to pull: google/tf-serving-scann, ScaNN's build, stopped at
# TensorFlow 2.11, and the server's TensorFlow must be the one that exported the SavedModel
# (TF 2.20 / scann 1.4.2, constraints.txt). Build one from source as ScaNN's README describes
# (TF Serving 2.20.0's Bazel workspace with `@scann//scann/scann_ops/cc:scann_ops` linked into
# //tensorflow_serving/model_servers:tensorflow_model_server, installed at
# /usr/bin/tensorflow_model_server as in the stock image), tag it
# ${SCANN_SERVING_IMAGE}:${SCANN_SERVING_TAG}, and build this file on it.
ARG SCANN_SERVING_IMAGE=tf-serving-scann
ARG SCANN_SERVING_TAG=2.20.0
FROM ${SCANN_SERVING_IMAGE}:${SCANN_SERVING_TAG}

# Below, the same as the stock Dockerfile: swapping the two changes only the base.
COPY docker/tf-serving/monitoring.config /etc/tf-serving/monitoring.config
EXPOSE 8500 8501
ENTRYPOINT ["/usr/bin/tensorflow_model_server"]
CMD ["--port=8500", "--rest_api_port=8501", "--model_config_file=/models/models.config", "--allow_version_labels_for_unavailable_models=true"]
