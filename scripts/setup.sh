#!/usr/bin/env bash
# Set up napari-unetpp in ./.venv on a fresh machine: system libraries for Qt/OpenGL (Debian/Ubuntu, when root),
# torch 2.13.0 first (CPU machines here get a local CPU wheel; Linux GPU machines get CUDA torch from PyPI),
# then the project in editable mode with its Qt binding and test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES="xvfb xauth libgl1-mesa-dri libgl1 libegl1 libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0
  libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-shape0 libdbus-1-3 libfontconfig1"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  missing=""
  for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "setup: installing system packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
  fi
elif ! command -v Xvfb >/dev/null 2>&1; then
  echo "setup: note: Xvfb is missing; the GUI tests need it (apt-get install xvfb, or run them on a desktop)." >&2
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[all,testing,docs]"
.venv/bin/python -c "import torch, napari_unetpp; print(f'setup: napari-unetpp {napari_unetpp.__version__}, torch {torch.__version__}, ready in .venv')"
