#!/usr/bin/env bash
# Every GPU figure of issue 20 in ONE device-tool call (at most 8 minutes on one H200, installs included),
# clipforge and open_clip side by side; everything lands in $OUT (or ./device-out), summary.md first.
#
#   device tool: carry [".whl"], timeout_s 540, command: bash scripts/device/measure_all.sh
#   a rerun of some parts:   bash scripts/device/measure_all.sh --only loss profile
#   on CPU (tests/test_measure_all.py runs it): bash scripts/device/measure_all.sh --dry-run
#
# The parts, their budgets and the summary are in src/clipforge/bench/device.py. Wheels: run
# scripts/device/fetch_wheels.sh where PyPI is reachable, before the call.
set -uo pipefail
export MEASURE_T0=${MEASURE_T0:-$(date +%s)}  # the parts' deadline counts from here, installs included
cd "$(dirname "$0")/../.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/clipforge-device.XXXXXX") && trap 'rm -rf "$tmp"' EXIT
# clipforge laid out as its wheel installs it (pyproject.toml maps conf/ to the package clipforge.conf)
mkdir -p "$tmp/src" && cp -r src/clipforge "$tmp/src/" && cp -r conf "$tmp/src/clipforge/conf"
export PYTHONPATH=$tmp/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# only the wheels whose distribution the machine lacks: its own builds (numpy, torch, ...) stay in charge
mapfile -t wheels < <(python3 -m clipforge.bench.device --missing-wheels .whl)
if [[ ${#wheels[@]} -gt 0 ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$tmp/site" "${wheels[@]}" 2>&1 | tail -3
  export PYTHONPATH=$PYTHONPATH:$tmp/site
fi
echo "installed from .whl: ${wheels[*]:-nothing} ($(( $(date +%s) - MEASURE_T0 )) s)" | tee "$OUT/env.txt"
python3 -m clipforge.bench.device --out "$OUT" "$@"
