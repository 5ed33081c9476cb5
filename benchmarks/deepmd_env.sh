#!/usr/bin/env bash
# Builds the DeePMD-kit reference environment that benchmarks/train_vs_deepmd.py compares against:
# DeePMD-kit 3.2.0 (PyTorch backend only, CPU) compiled from its sdist against the torch on disk here
# (2.13.0+cpu, kept by constraints.txt), in a venv that sees this interpreter's site-packages.
#
#   bash benchmarks/deepmd_env.sh            # -> prints the interpreter, e.g. /root/dpvenv/bin/python
#   DPVENV=/somewhere bash benchmarks/deepmd_env.sh
#
# Idempotent: an existing venv whose `deepmd.pt` imports and whose `dp --pt -h` runs is left as it is.
# The C++ build takes ~5-10 min on 2 cores (MAKEFLAGS/CMAKE_BUILD_PARALLEL_LEVEL follow nproc).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VENV="${DPVENV:-/root/dpvenv}"
VERSION="${DEEPMD_VERSION:-3.2.0}"
PYTHON="${PYTHON:-python3}"
BUILD="${DPBUILD:-$VENV/src}"

check() {
    (cd /tmp && "$VENV/bin/python" -c "import deepmd.pt.train.training" && "$VENV/bin/dp" --pt -h) >/dev/null 2>&1
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "$VENV/bin/python"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/pip" install -c "$REPO/constraints.txt")

# build requirements (the backend's own are installed by hand: --no-build-isolation keeps pip away from torch)
"${PIP[@]}" scikit-build-core packaging dependency_groups setuptools_scm hatch-fancy-pypi-readme cmake ninja
# run-time requirements of deepmd-kit (those not already in the base interpreter are installed into the venv)
"${PIP[@]}" numpy scipy pyyaml "dargs>=0.4.7" typing_extensions h5py wcmatch einops packaging ml_dtypes \
    mendeleev array-api-compat lmdb msgpack mpich e3nn

mkdir -p "$BUILD"
SDIST="$BUILD/deepmd_kit-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    # only deepmd-kit itself from source (its build back-end's dependencies may come as wheels)
    "$VENV/bin/pip" download --no-deps --no-binary deepmd-kit -d "$BUILD" "deepmd-kit==$VERSION"
fi

export DP_VARIANT=cpu DP_ENABLE_TENSORFLOW=0 DP_ENABLE_PYTORCH=1
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
"$VENV/bin/pip" install -c "$REPO/constraints.txt" --no-build-isolation --no-deps "$SDIST"

cd /tmp
"$VENV/bin/python" -c "import deepmd, deepmd.pt, torch; print('deepmd', deepmd.__version__, 'torch', torch.__version__)" >&2
"$VENV/bin/dp" --pt -h >/dev/null
echo "$VENV/bin/python"
