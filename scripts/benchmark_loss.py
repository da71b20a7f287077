"""Thin entry point: contrastive-loss forward + backward time and memory, clipforge vs open_clip.

GPU: python scripts/benchmark_loss.py --device cuda        (batch 8,192 ... 262,144 at d = 768)
CPU: python scripts/benchmark_loss.py --batches 1024 2048 --dim 64 --device cpu
"""

from clipforge.losses.benchmark import main

if __name__ == "__main__":
    main()
