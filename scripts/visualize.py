"""Write ViT pictures (patch grid, position-embedding similarity, attention per head, attention rollout)
for an image and a checkpoint or a fresh model:

    python scripts/visualize.py --image cat.jpg --checkpoint run.ckpt --out viz/ --layer -1
    python scripts/visualize.py --image cat.jpg --model tiny --out viz/
"""

from clipforge.viz.cli import cli

if __name__ == "__main__":
    raise SystemExit(cli())
