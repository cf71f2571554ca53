# The recommendation gateway: `recsys serve gateway`, on the production profile (Feast on
# Redis, events on Redis Streams, TensorFlow Serving by host and port).
# Build from the repository root: docker build -f docker/gateway.Dockerfile -t recsys-gateway:latest .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TF_USE_LEGACY_KERAS=1 \
    TF_CPP_MIN_LOG_LEVEL=2 \
    RECSYS_PROFILE=production

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 50000 --create-home --home-dir /home/recsys recsys

WORKDIR /opt/recsys
COPY pyproject.toml constraints.txt README.md ./
COPY recsys/ recsys/
COPY components/ components/
COPY serving/ serving/
COPY entrypoints/ entrypoints/
RUN pip install -c constraints.txt -e .
COPY feature_repo/ feature_repo/
COPY conf/ conf/

USER recsys
EXPOSE 8080
# The command tests/integration/serving/test_production_gateway.py runs (with a loopback host).
ENTRYPOINT ["recsys"]
CMD ["serve", "gateway", "--host", "0.0.0.0", "--port", "8080"]
