"""Greedy decoding with the LocCa decoder of a SigLIP 2-style checkpoint: same as the `clipforge-caption`
command.

python scripts/caption.py checkpoint=last.ckpt image=shape.png [task=box ref="the red circle"]
"""

from clipforge.caption_cli import main

if __name__ == "__main__":
    main()
