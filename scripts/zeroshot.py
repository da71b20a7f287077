"""Zero-shot classification (CLIP, Radford et al., 2021): same as the `clipforge-zeroshot` command.

python scripts/zeroshot.py checkpoint=last.ckpt eval/dataset=imagefolder eval.dataset.root=/data/val classnames=imagenet
"""

from clipforge.eval.cli import main

if __name__ == "__main__":
    main()
