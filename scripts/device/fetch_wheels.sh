#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that the lent GPU machine (Python 3.12; torch, torchvision,
# timm, lightning, transformers, matplotlib, pandas, scikit-image and pytest already installed; no
# network) lacks for scripts/device/measure_all.sh: the peer open_clip and clipforge's config and data
# libraries, about 3 MiB. They land in .whl/ (git-ignored), which the device tool carries: carry [".whl"].
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
pkgs=(
  open_clip_torch==3.3.0 ftfy wcwidth               # the peer (see ../shared/peer/README.md)
  hydra-core==1.3.2 omegaconf==2.3.0              # configs (antlr4 below: it ships as source only)
  webdataset==1.0.2 braceexpand                      # loader and its open_clip baseline
)
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
# pure Python, published as an sdist only: build its wheel here
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
ls .whl
