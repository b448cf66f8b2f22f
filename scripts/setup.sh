#!/usr/bin/env bash
# Set up a fresh machine (Debian, root or sudo): system packages, the Python venv
# in .venv/, and the Apache Kafka jars from Maven Central. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
# kcat (Debian, BSD-2): the tests' producer of raw header bytes that confluent-kafka cannot write
command -v kcat >/dev/null 2>&1 || need+=(kcat)
command -v python3 >/dev/null 2>&1 || need+=(python3 python3-venv)
# chromium (Debian, BSD-3 and others): the headless browser tests/integration/test_dashboard_browser.py
# loads `ulens dashboard` in
command -v chromium >/dev/null 2>&1 || need+=(chromium)
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]} with apt-get"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch from PyPI is the large CUDA build (it also runs on the CPU); pip's cache keeps
# later runs fast.
echo "setup: installing the project and its dependencies into .venv (first run downloads torch)"
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/ulens services fetch >/dev/null
# Rubin's alert schemas and sample packets: data files of lsst-alert-packet (GPLv3) from
# PyPI, kept in ~/.cache/ulens/rubin-schemas/ (env ULENS_RUBIN_SCHEMAS); never installed
.venv/bin/ulens rubin fetch-schemas --quiet >/dev/null
echo "setup: done"
