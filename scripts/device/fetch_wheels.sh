#!/usr/bin/env bash
# Download, on a machine with PyPI, the wheels that the lent GPU machine (Python 3.12, torch, torchvision,
# timm, lightning and transformers already installed, no network) needs to run clipforge's benchmarks
# beside open_clip. They land in .whl/ (git-ignored), which the device tool carries: `carry: [".whl"]`.
#
#   bash scripts/device/fetch_wheels.sh          # open_clip + clipforge's config/data dependencies
#   bash scripts/device/fetch_wheels.sh --all    # also what the loader benchmark (scikit-image photos,
#                                                # open_clip_train's pandas) and plots (matplotlib) import
#
# Then on the device: bash scripts/device/measure_all.sh  (installs .whl/*.whl into /tmp/site first).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
pkgs=(
  open_clip_torch==3.3.0 ftfy wcwidth               # the peer (see ../shared/peer/README.md)
  hydra-core==1.3.2 omegaconf==2.3.0              # configs (antlr4 below: it ships as source only)
  webdataset==1.0.2 braceexpand                      # loader and its open_clip baseline
)
if [[ "${1:-}" == "--all" ]]; then
  pkgs+=(matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil six pandas pytz tzdata
         scikit-image lazy-loader imageio tifffile networkx pytest pluggy iniconfig)
fi
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${pkgs[@]}"
# pure Python, published as an sdist only: build its wheel here
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
du -sh .whl
ls .whl
