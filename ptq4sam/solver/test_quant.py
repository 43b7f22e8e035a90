"""Evaluate (and quantize) a box-prompted SAM instance segmenter on COCO.

    python ptq4sam/solver/test_quant.py --config projects/configs/<detector>/<model>.py \
        --q_config exp/config66.yaml [--quant-encoder] [--fp] [--show-dir DIR] [--work-dir W]
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from ptq4sam.solver.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
