"""CLI: python -m convert {torch2jax,jax2torch} ... (see --help of each)."""
from __future__ import annotations

import argparse
import sys

from convert import FAMILIES
from convert.errors import ConversionError


def _parser() -> argparse.ArgumentParser:
  families = "\n".join(f"  {name:14s} {f.summary}" for name, f in FAMILIES.items())
  parser = argparse.ArgumentParser(
      prog="python -m convert", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert between original PyTorch checkpoints and jaxlm model directories.",
      epilog=f"families:\n{families}")
  sub = parser.add_subparsers(dest="command", required=True)
  t2j = sub.add_parser(
      "torch2jax", formatter_class=argparse.RawDescriptionHelpFormatter,
      help="original checkpoint -> jaxlm model directory",
      description="Read an original checkpoint (never executing pickled code) and write a jaxlm model "
                  "directory: config.json, Orbax params/, tokenizer.json.",
      epilog=f"families:\n{families}")
  t2j.add_argument("--family", choices=sorted(FAMILIES), help="checkpoint format; detected from the file if omitted")
  t2j.add_argument("--src", required=True, help="checkpoint file (or Hugging Face folder for llama)")
  t2j.add_argument("--out", required=True, help="model directory to create (must not exist unless --overwrite)")
  t2j.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  j2t = sub.add_parser(
      "jax2torch", formatter_class=argparse.RawDescriptionHelpFormatter,
      help="jaxlm model directory or training workdir -> original checkpoint",
      description="Write a jaxlm model (model directory, or training workdir) in an original format, "
                  "loadable by the original code with strict key matching.",
      epilog=f"families:\n{families}")
  j2t.add_argument("--src", required=True, help="model directory, or training workdir (see --which)")
  j2t.add_argument("--out", required=True,
                   help="file to write (a folder for llama); an existing directory gets the original file name")
  j2t.add_argument("--family", choices=sorted(FAMILIES),
                   help="target format; defaults to the model's own family (where it was imported from, "
                        "or model.family of a training run)")
  j2t.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint of a training workdir to export (default latest)")
  j2t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  for f in FAMILIES.values():  # values an original checkpoint does not store
    f.add_arguments(t2j.add_argument_group(f"{f.name} options"))
  return parser


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  from convert import api  # imports jax: only after argument parsing (fast --help)
  try:
    if args.command == "torch2jax":
      path = api.torch2jax(args.src, args.out, family=args.family, options=args, overwrite=args.overwrite)
    else:
      path = api.jax2torch(args.src, args.out, family=args.family, which=args.which, options=args,
                           overwrite=args.overwrite)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
