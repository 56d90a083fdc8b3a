"""CLI: python -m convert {torch2jax,jax2torch} ... (see --help of each)."""
from __future__ import annotations

import argparse
import sys

from convert import FAMILIES
from convert.differences import ALLOW_FLAG, SUFFIX
from convert.errors import ConversionError
from jaxlm import errors


def _common() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--verbose", action="store_true",
                      help="print the traceback of an error too (also JAXLM_VERBOSE=1)")
  return common


def _parser() -> argparse.ArgumentParser:
  families = "\n".join(f"  {name:14s} {f.summary}" for name, f in FAMILIES.items())
  parser = argparse.ArgumentParser(
      prog="python -m convert", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Convert between original PyTorch checkpoints and jaxlm model directories.",
      epilog=f"families:\n{families}")
  sub = parser.add_subparsers(dest="command", required=True)
  t2j = sub.add_parser(
      "torch2jax", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
      help="original checkpoint -> jaxlm model directory",
      description="Read an original checkpoint (never executing pickled code) and write a jaxlm model "
                  "directory: config.json, Orbax params/, tokenizer.json.",
      epilog=f"families:\n{families}")
  t2j.add_argument("--family", choices=sorted(FAMILIES), help="checkpoint format; detected from the file if omitted")
  t2j.add_argument("--src", required=True, help="checkpoint file (or Hugging Face folder for llama)")
  t2j.add_argument("--out", required=True, help="model directory to create (must not exist unless --overwrite)")
  t2j.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  j2t = sub.add_parser(
      "jax2torch", parents=[_common()], formatter_class=argparse.RawDescriptionHelpFormatter,
      help="jaxlm model directory or training workdir -> original checkpoint",
      description="Write a jaxlm model (model directory, or training workdir) in an original format, "
                  "loadable by the original code with strict key matching.",
      epilog=f"families:\n{families}")
  j2t.add_argument("--src", required=True, help="model directory, or training workdir (see --which)")
  j2t.add_argument("--out", required=True,
                   help="file to write (a folder for llama and hrm_text1); an existing directory, or a path ending "
                        "in /, gets the file under the original's own name inside it")
  j2t.add_argument("--family", choices=sorted(FAMILIES),
                   help="target format; defaults to the model's own family (where it was imported from, "
                        "or model.family of a training run)")
  j2t.add_argument("--which", choices=("latest", "best"), default="latest",
                   help="checkpoint of a training workdir to export (default latest)")
  j2t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
  j2t.add_argument(ALLOW_FLAG, action="store_true",
                   help="export even when the original code computes differently from this model (e.g. "
                        "a causal model for the original YingGem, which attends to later tokens); the differences "
                        f"are recorded in <out>{SUFFIX}")
  for f in FAMILIES.values():  # values an original checkpoint does not store
    f.add_arguments(t2j.add_argument_group(f"{f.name} options"))
  return parser


def _convert(args: argparse.Namespace) -> int:
  from convert import api  # imports jax: only after argument parsing (fast --help)
  try:
    if args.command == "torch2jax":
      path = api.torch2jax(args.src, args.out, family=args.family, options=args, overwrite=args.overwrite)
    else:
      path = api.jax2torch(args.src, args.out, family=args.family, which=args.which, options=args,
                           overwrite=args.overwrite, allow_different_computation=args.allow_different_computation)
  except ConversionError as e:
    # Bad input (exit 2, its own message), even when raised while handling an OSError (the FileNotFoundError
    # behind "not a model directory"): jaxlm.errors would otherwise report that OSError and exit 1.
    e.__context__ = None
    raise
  print(path)
  return errors.EXIT_OK


def main(argv=None) -> int:
  """Exit codes (jaxlm.errors): 0 written; 2 bad input (a ConversionError, a missing --src), nothing written;
  1 a file-system failure (one line naming the path), --out left as it was."""
  args = _parser().parse_args(argv)
  return errors.run_command(lambda: _convert(args), sys.argv if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
