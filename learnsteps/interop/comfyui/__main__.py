"""python -m learnsteps.interop.comfyui install COMFYUI_DIR: add learnsteps' nodes to a ComfyUI installation."""
import argparse
import sys

from . import install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learnsteps.interop.comfyui", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("install", help="write custom_nodes/learnsteps/ into a ComfyUI folder")
    ins.add_argument("comfyui_dir")
    args = parser.parse_args(argv)
    try:
        folder = install(args.comfyui_dir)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {folder}; put schedule files in {folder.parents[1] / 'models' / 'learnsteps'} and restart ComfyUI "
          f"(learnsteps must be installed in ComfyUI's Python environment)")
    return 0


raise SystemExit(main())
