"""Thin entry point: contrastive-loss forward + backward time and memory, clipforge vs open_clip.

GPU: python scripts/benchmark_loss.py --device cuda        (batch 8,192 ... 262,144 at d = 768)
CPU: python scripts/benchmark_loss.py --batches 1024 2048 --dim 64 --device cpu
W gloo processes on CPU, ring vs gather vs open_clip (local batches):
     python scripts/benchmark_loss.py --world-sizes 2 4 8 --batches 512 1024 --dim 256
"""

from clipforge.bench.losses import main

if __name__ == "__main__":
    main()
