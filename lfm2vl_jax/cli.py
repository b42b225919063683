"""Command line: `lfm2vl generate` (streamed answer to a prompt with images) and `lfm2vl convert`
(transformers <-> orbax checkpoints). All argument parsing lives here; library modules take plain
arguments.

Errors the user can fix (a missing model, an unreadable image, a bad flag value, a refused target) print
one line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from .errors import Lfm2VlError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x's default


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about images, streaming the text")
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face Hub id")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; in prompt order)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", help="optional system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="default: float32 on CPU (faster there), bfloat16 elsewhere",
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stacked, scanned text layers (default: one array per layer, faster decoding)",
    )
    p.set_defaults(run=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .api import Lfm2VlForConditionalGeneration
    from .processing.processor import Lfm2VlProcessor

    content = [{"type": "image", "path": path} for path in args.image]
    content.append({"type": "text", "text": args.prompt})
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    processor = Lfm2VlProcessor.from_pretrained(args.model)
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        args.model, dtype=DTYPES[dtype], scan_layers=args.scan_layers, progress=sys.stderr.isatty()
    )
    options = {
        "do_sample": args.do_sample or None,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    generated: list[int] = []
    printed = ""
    for step in model.stream(**inputs, max_new_tokens=args.max_new_tokens, seed=args.seed, **options):
        generated.append(int(step[0]))
        # Decode the whole answer each time: a character may span several tokens.
        text = processor.decode(generated, skip_special_tokens=True)
        if text.startswith(printed):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write("\n")
    return 0


def _conversion_arguments(p: argparse.ArgumentParser, src_help: str, dst_help: str, to_hf: bool) -> None:
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("dst", metavar="DST", help=dst_help)
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: as stored)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    if to_hf:
        p.add_argument(
            "--max-shard-size",
            default=DEFAULT_MAX_SHARD_SIZE,
            help=f"split the weights into shards above this size (default {DEFAULT_MAX_SHARD_SIZE})",
        )


def add_hf_to_orbax_arguments(p: argparse.ArgumentParser) -> None:
    _conversion_arguments(
        p, "transformers checkpoint directory or hub id", "orbax checkpoint directory to create", False
    )
    p.set_defaults(run=run_hf_to_orbax, command="convert")


def add_orbax_to_hf_arguments(p: argparse.ArgumentParser) -> None:
    _conversion_arguments(
        p,
        "orbax checkpoint directory (written by hf-to-orbax)",
        "transformers checkpoint directory to create",
        True,
    )
    p.set_defaults(run=run_orbax_to_hf, command="convert")


def _report_written(out) -> int:
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({size / 1e9:.2f} GB)")
    return 0


def run_hf_to_orbax(args: argparse.Namespace) -> int:
    from .checkpoint.orbax import hf_to_orbax

    return _report_written(hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite, not args.quiet))


def run_orbax_to_hf(args: argparse.Namespace) -> int:
    from .checkpoint.orbax import orbax_to_hf

    out = orbax_to_hf(args.src, args.dst, args.dtype, args.overwrite, args.max_shard_size, not args.quiet)
    return _report_written(out)


def _convert_parser(sub: argparse._SubParsersAction) -> None:
    convert = sub.add_parser("convert", help="convert checkpoints (transformers <-> orbax)")
    direction = convert.add_subparsers(dest="direction", required=True)
    add_hf_to_orbax_arguments(
        direction.add_parser("hf-to-orbax", help="transformers checkpoint -> orbax checkpoint")
    )
    add_orbax_to_hf_arguments(
        direction.add_parser("orbax-to-hf", help="orbax checkpoint -> transformers checkpoint")
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfm2vl", description="LFM2-VL vision-language models in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _convert_parser(sub)
    return parser


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Runs a parsed command: a user's mistake (`Lfm2VlError`) or an I/O error (unreadable source, full
    disk, no permission) becomes one `error:` line and exit status 2."""
    try:
        return args.run(args)
    except (Lfm2VlError, OSError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args, f"lfm2vl {args.command}")


if __name__ == "__main__":
    sys.exit(main())
