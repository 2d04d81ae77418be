"""Evaluate: `python eval.py [key=value ...]` (see configs/eval.yaml): FID/KID over teacher x solver x grid x NFE."""
import sys

from learnsteps.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
