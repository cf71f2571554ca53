"""The Spark session that Feast's Spark offline store, its compute engine and GX share.

Feast starts a session from its store config only when none is active, and PySpark picks the
Python of its worker processes from ``PYSPARK_PYTHON`` when the first session starts. So the
session is started here, once per process, before any of them runs: with the properties of
``spark`` (``SparkConfig.properties``) and, on a local master, workers that run this
interpreter (they unpickle Feast's functions, so they must import what this process imports).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from recsys.config import SparkConfig


def spark_session(config: SparkConfig) -> SparkSession:
    """The process's Spark session, started with ``config`` if there is none yet."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    # Py4J logs its connection's close at INFO from the interpreter's exit, after the streams
    # are gone: a traceback of the logging module at the end of every run that used Spark.
    logging.getLogger("py4j").setLevel(logging.WARNING)
    if config.master.startswith("local"):
        # A cluster's executors run the Python of their own image; only a local master's
        # workers are forked from here, and the PATH's python3 may not have Feast.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    conf = SparkConf().setAll(list(config.properties().items()))
    return SparkSession.builder.config(conf=conf).getOrCreate()
