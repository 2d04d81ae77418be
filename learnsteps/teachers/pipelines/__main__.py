"""`python -m learnsteps.teachers.pipelines encode MODEL --conditions prompts.txt --out FILE`: a pipeline's prompt
embeddings, encoded once by its own text encoders, for `conditions=FILE` (conditions.py)."""
from __future__ import annotations

import argparse
import sys

from ..network import TeacherLoadError
from .conditions import encode_conditions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learnsteps.teachers.pipelines",
                                     description="Precompute a diffusers pipeline's prompt embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode prompts with the pipeline's own text encoders into a file")
    enc.add_argument("model", help="the pipeline: a local directory or a hub id in the Hugging Face cache")
    enc.add_argument("--conditions", required=True, help="a prompt file, one prompt per line")
    enc.add_argument("--out", required=True, help="the .safetensors file to write")
    enc.add_argument("--negative-prompt", default=None,
                     help="the negative prompt (default: the pipeline's own unconditional input)")
    enc.add_argument("--max-sequence-length", type=int, default=0,
                     help="the text length the pipeline is called with (default: its own default)")
    enc.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 for the text encoders")
    args = parser.parse_args(argv)
    if not args.out.endswith(".safetensors"):
        print(f"error: --out {args.out}: the file must end in .safetensors", file=sys.stderr)
        return 2
    try:
        path = encode_conditions(args.model, args.conditions, args.out, args.negative_prompt,
                                 args.max_sequence_length, args.dtype)
    except TeacherLoadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{path}: the embeddings of {args.conditions}; use conditions={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
