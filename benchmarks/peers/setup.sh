#!/usr/bin/env bash
# Create benchmarks/peers/.venv with the PyTorch continual-learning peers used by
# benchmarks/peers/run.py:
#   torch 2.14.1 + torchvision 0.29.1, clarena 1.1.0, avalanche-lib 0.6.0, numpy.
#
# One command from a clean machine:   bash benchmarks/peers/setup.sh
# Idempotent: if the venv exists and every pinned package imports at the pinned
# version, it does nothing. Set PEERS_PYTHON to choose the interpreter
# (default: python3, must be >= 3.10 for clarena).
#
# Why torch 2.14.1 (a CUDA build, ~5.5 GB installed) rather than a CPU wheel:
# on this machine the CPU-only torch wheel breaks `import torchvision`, and both
# clarena and avalanche import torchvision. torch==2.14.1 + torchvision==0.29.1
# is the known-working pair (both are served from local disk here). The scripts
# never touch CUDA; they run on CPU with torch.set_num_threads(2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$HERE/.venv"
PY="${PEERS_PYTHON:-python3}"

TORCH_VER=2.14.1
TV_VER=0.29.1
CLARENA_VER=1.1.0
AVALANCHE_VER=0.6.0

if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "setup.sh: warning: $(uname -m) is not x86_64; torch==$TORCH_VER/torchvision==$TV_VER" \
       "may not be available for this architecture" >&2
fi

check() {
  "$VENV/bin/python" - "$TORCH_VER" "$TV_VER" "$CLARENA_VER" "$AVALANCHE_VER" <<'EOF'
import sys
from importlib.metadata import version
want_torch, want_tv, want_cl, want_av = sys.argv[1:5]
def base(v):
    return v.split("+")[0]
ok = True
for dist, want in [("torch", want_torch), ("torchvision", want_tv),
                   ("clarena", want_cl), ("avalanche-lib", want_av)]:
    try:
        got = version(dist)
    except Exception:
        print(f"missing: {dist}"); ok = False; continue
    if base(got) != want:
        print(f"wrong version: {dist} {got} (want {want})"); ok = False
if not ok:
    sys.exit(1)
# The imports the peer scripts need.
import numpy, torch, torchvision, lightning  # noqa: F401
from clarena.cl_algorithms import EWC        # noqa: F401
from clarena.backbones import CLMLP          # noqa: F401
from clarena.heads import HeadsTIL           # noqa: F401
from avalanche.training import EWC as AvEWC  # noqa: F401
from avalanche.models import MultiHeadClassifier  # noqa: F401
print(f"ok: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"clarena {version('clarena')}, avalanche-lib {version('avalanche-lib')}, "
      f"lightning {lightning.__version__}, numpy {numpy.__version__}")
EOF
}

if [[ -x "$VENV/bin/python" ]] && check >/dev/null 2>&1; then
  echo "setup.sh: $VENV already set up: $(check | tail -1)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup.sh: creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"${PIP[@]}" --upgrade pip wheel setuptools >/dev/null
# torch/torchvision first, pinned together, so that the CL libraries' resolver
# keeps them and never swaps in another torch build.
"${PIP[@]}" "torch==$TORCH_VER" "torchvision==$TV_VER" numpy
"${PIP[@]}" "torch==$TORCH_VER" "torchvision==$TV_VER" \
  "clarena==$CLARENA_VER" "avalanche-lib==$AVALANCHE_VER"

echo "setup.sh: checking imports"
check
