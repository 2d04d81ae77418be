"""Train: `python train.py mode=teacher|ld3|dsno [key=value ...]` (see configs/<mode>.yaml)."""
import sys

from learnsteps.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
