"""Loader throughput, clipforge vs open_clip's get_wds_dataset on the same shards (clipforge.bench.loader).

python scripts/benchmark_loader.py --num-samples 2000 --workers 1 [--gpu-decode]
"""

from clipforge.bench.loader import main

if __name__ == "__main__":
    main()
