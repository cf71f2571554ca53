#!/usr/bin/env bash
# Install the system packages the tests use: servers started on loopback (their own instances,
# own ports), a Java runtime for Spark and a headless browser.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then need+=(postgresql); fi
# Spark (the scale-out offline store, GX on Spark) runs in a JVM: PySpark 4 needs Java 17+.
if ! { command -v java >/dev/null 2>&1 && java -version 2>&1 | grep -Eq 'version "(1[7-9]|2[0-9])'; }; then
  need+=(openjdk-17-jre-headless)
fi
# The Airflow UI test screenshots the DAG page with headless Chromium.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
echo "installing system packages: ${need[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
