#!/usr/bin/env bash
# Every GPU figure the open issues ask for, in one device-tool command (about 8 minutes on one H100),
# clipforge and open_clip measured side by side in the same process each time. Writes JSON lines and
# tables to $OUT (or ./device-out) and prints them.
#
#   device run, carry [".whl"]:  bash scripts/device/measure_all.sh [train|loss|loader|fsdp2|tests|check ...]
#
# Wheels: bash scripts/device/fetch_wheels.sh on a machine with PyPI first.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-device-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  # only the wheels whose distribution the machine lacks: its own numpy-built packages stay in charge
  mapfile -t wheels < <(python3 - <<'PY'
import glob, importlib.metadata as md
for w in sorted(glob.glob(".whl/*.whl")):
    name = w.split("/")[-1].split("-")[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        print(w)
PY
)
  if [[ ${#wheels[@]} -gt 0 ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}"
  fi
  echo "installed from .whl: ${wheels[*]:-nothing (all present)}"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/env.txt"
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
need = ["open_clip", "hydra", "omegaconf", "webdataset", "braceexpand", "lightning", "timm", "matplotlib", "pandas"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
print("missing modules:", missing or "none")
PY
parts=("$@")
[[ ${#parts[@]} -eq 0 ]] && parts=(train loss loader)
for part in "${parts[@]}"; do
  case $part in
    train)  # issue: GPU speed (both models, both losses, compile, Lightning loop, token reduction)
      python3 -m clipforge.bench.step --models vit_b16:256 vit_b32:512 --losses clip siglip --compile \
        --lightning --token-reduction model.vision.patch_dropout=0.5 model.text.context_length=32 \
        2>&1 | tee "$OUT/train_step.txt" ;;
    loss)   # issue: losses (batch 8,192 ... 262,144, d = 768)
      python3 scripts/benchmark_loss.py --device cuda 2>&1 | tee "$OUT/loss.txt" ;;
    loader) # issue: data (GPU JPEG decode beside the CPU loaders)
      python3 scripts/benchmark_loader.py --gpu-decode 2>&1 | tee "$OUT/loader.txt" ;;
    fsdp2)  # issue 17: FSDP2 ran on 2 CPU processes (gloo); here on the GPU(s): NCCL, bf16-mixed, sharded
            # checkpoint directories, consolidation (about a minute; the data set is small)
      d=/tmp/clipforge-fsdp2
      python3 -m clipforge.train trainer=ddp trainer/strategy=fsdp2 debug=fast trainer.max_steps=20 \
        data.num_train=4096 data.num_heldout=256 paths.data_dir=/tmp/clipforge-data hydra.run.dir="$d" \
        callbacks.periodic_checkpoint.every_n_train_steps=10 2>&1 | tee "$OUT/fsdp2.txt"
      python3 -m clipforge.checkpoint "$d/checkpoints/last.ckpt" "$d/consolidated.ckpt" --force 2>&1 \
        | tee -a "$OUT/fsdp2.txt" ;;
    tests)  # the CUDA-only tests (pytest must be on the machine or among the wheels)
      python3 -m pytest -q -p no:cacheprovider -m gpu tests 2>&1 | tee "$OUT/gpu_tests.txt" ;;
    check) ;;  # only the environment report above
    *) echo "unknown part $part (train | loss | loader | fsdp2 | tests | check)"; exit 2 ;;
  esac
done
