"""Command line: `lfm2vl generate` (streamed answer to a prompt with images), `lfm2vl convert`
(transformers <-> orbax checkpoints) and `lfm2vl train` (supervised fine-tuning). All argument parsing
lives here; library modules take plain arguments.

Errors the user can fix (a missing model, an unreadable image, a bad flag value, a refused target) print
one `error:` line and exit with status 2; anything else is a bug in this package: one line saying so, exit
status 1, and `--debug` shows its traceback. `lfm2vl batch` exits with status 3 when it ran to the end but
some requests failed (their error records are in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from .compile_cache import add_compile_cache_argument, setup_compile_cache
from .config import QUANT_SCHEMES, REMAT_POLICIES, ConfigError, Quantization, default_dtype_name
from .errors import Lfm2VlError
from .inference.batch_io import MAX_LINE_BYTES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x's default
EXIT_SOME_REQUESTS_FAILED = 3  # `batch` ran to the end, with error records; 1 is a bug, 2 a user error


def add_debug_argument(p: argparse.ArgumentParser, top_level: bool = False) -> None:
    """`--debug`: tracebacks instead of one-line errors. Accepted before or after the subcommand (a
    subcommand's parser must not reset what the top-level one read, hence SUPPRESS there)."""
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top_level else argparse.SUPPRESS,
        help="show the full traceback of any error",
    )


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer a prompt about images, streaming the text")
    add_debug_argument(p)
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face Hub id")
    p.add_argument("--image", action="append", default=[], help="image file (repeatable; in prompt order)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", help="optional system message")
    p.add_argument(
        "--tools",
        help="JSON file: a list of tool (function) schemas, rendered by the chat template; the answer's "
        "tool calls are then printed as JSON lines after it",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="default: generation_config.json's max_new_tokens (or max_length), else 256",
    )
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
    add_quantize_arguments(p)
    add_compile_cache_argument(p)
    p.set_defaults(run=run_generate)


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        help="weight-only quantization at load time: int8 (per output channel) or int4 (group-wise)",
    )
    p.add_argument("--quant-group-size", type=int, help="inputs per int4 scale (default 64)")
    p.add_argument(
        "--quantize-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --quantize: quantize the embedding / LM head too (default on)",
    )


def _quantize_options(args: argparse.Namespace) -> dict:
    """from_pretrained's quantization options, checked now (before anything is read or written)."""
    if args.quantize is None:
        if args.quant_group_size is not None:
            raise ConfigError("--quant-group-size is for --quantize int4")
        return {}
    Quantization(args.quantize, args.quant_group_size, args.quantize_embeddings)
    return {
        "quantize": args.quantize,
        "quant_group_size": args.quant_group_size,
        "quantize_embeddings": args.quantize_embeddings,
    }


def _sampling_options(args: argparse.Namespace) -> dict:
    """The sampling options of `generate` and `batch` (None: unset, the checkpoint's default applies)."""
    return {
        "do_sample": args.do_sample or None,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }


def run_generate(args: argparse.Namespace) -> int:
    from .api import Lfm2VlForConditionalGeneration
    from .processing.processor import Lfm2VlProcessor
    from .processing.tool_calls import parse_tool_calls

    content = [{"type": "image", "path": path} for path in args.image]
    content.append({"type": "text", "text": args.prompt})
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
    tools = _read_tools(args.tools) if args.tools else None
    processor = Lfm2VlProcessor.from_pretrained(args.model)
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, tools=tools
    )
    dtype = args.dtype or default_dtype_name()
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        args.model,
        dtype=DTYPES[dtype],
        scan_layers=args.scan_layers,
        progress=sys.stderr.isatty(),
        **_quantize_options(args),
    )
    processor.check_model(model.config.image_token_id)
    model.default_max_new_tokens = 256  # the CLI's, where generation_config.json does not say
    options = _sampling_options(args)
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
    if tools is not None:  # the markers are special tokens: decoded without skipping them
        for call in parse_tool_calls(processor.decode(generated, skip_special_tokens=False)):
            sys.stdout.write("tool call: " + json.dumps(call["function"], ensure_ascii=False) + "\n")
    return 0


def _read_tools(path: str) -> list[dict]:
    """`--tools FILE.json`: a list of JSON objects (tool schemas)."""
    try:
        tools = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise Lfm2VlError(f"--tools {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise Lfm2VlError(f"--tools {path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise Lfm2VlError(f"--tools {path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise Lfm2VlError(f"--tools {path}: must hold a JSON list of tool objects (function schemas)")
    return tools


def _batch_parser(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "batch",
        help="answer every request of a JSONL file (continuous batching)",
        description="Generates for each line of --input ({'id', 'messages', ...}) and appends one result "
        "line per request to --output as it finishes. Exit status: 0 if every request succeeded, 1 if "
        "some failed (their lines say why), 2 on an error that stops the run.",
    )
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face Hub id")
    p.add_argument("--input", required=True, type=Path, help="requests, one JSON object per line")
    p.add_argument("--output", required=True, type=Path, help="results file (JSONL, appended)")
    p.add_argument("--slots", type=int, default=64, help="requests decoded together (default 64)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="default for requests that do not say (default: generation_config.json's, else 256)",
    )
    p.add_argument(
        "--max-length", type=int, default=4096, help="most prompt + new tokens per request (default 4096)"
    )
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0, help="default seed of requests that do not set one")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="default: float32 on CPU (faster there), bfloat16 elsewhere",
    )
    p.add_argument(
        "--mesh", help="shard over devices, e.g. data=2,tensor=4 (slots over data, heads over tensor)"
    )
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stacked, scanned text layers (default: per-layer on CPU, scanned on accelerators)",
    )
    add_quantize_arguments(p)
    p.add_argument("--prefill-batch", type=int, help="most requests prefilled together (default slots/4)")
    p.add_argument("--workers", type=int, help="threads preparing requests (default: CPUs - 1, 1..4)")
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=MAX_LINE_BYTES,
        help=f"longest request line read; longer ones fail unread (default {MAX_LINE_BYTES // 2**20} MiB)",
    )
    p.add_argument("--resume", action="store_true", help="skip the ids already in --output, append the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_compile_cache_argument(p)
    p.set_defaults(run=run_batch)


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Integer options that must be >= 1 when given, named by their flag."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise Lfm2VlError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def check_output_file(output: Path, inputs: Sequence[tuple[str, Path]]) -> None:
    """An output file must not be (through links too) one of the command's input files, and its
    directory must exist."""
    for flag, path in inputs:
        same = os.path.realpath(output) == os.path.realpath(path)
        if not same and output.exists() and path.exists():
            same = os.path.samefile(output, path)  # a hard link
        if same:
            raise Lfm2VlError(f"--output {output} is the {flag} file {path}; write the results elsewhere")
    if not output.parent.is_dir():
        raise Lfm2VlError(f"--output {output}: directory {output.parent} does not exist")
    if output.exists() and not output.is_file() and output != Path(os.devnull):
        raise Lfm2VlError(f"--output {output} is not a regular file")


def check_batch_arguments(args: argparse.Namespace) -> None:
    """Every option of `lfm2vl batch` that can be checked without the model, before anything is read or
    written."""
    check_positive(
        args, ("slots", "max_new_tokens", "max_length", "prefill_batch", "workers", "max_line_bytes")
    )
    if args.resume and args.overwrite:
        raise Lfm2VlError("--resume continues --output and --overwrite replaces it: pass one of them")
    if not args.input.is_file():
        what = "not a regular file" if args.input.exists() else "no such file"
        raise Lfm2VlError(f"--input {args.input}: {what}")
    check_output_file(args.output, [("--input", args.input)])


def run_batch(args: argparse.Namespace) -> int:
    """`lfm2vl batch`: the JSONL requests through `BatchEngine`, one result line each as it finishes."""
    import time

    from tqdm.auto import tqdm

    from .api import Lfm2VlForConditionalGeneration
    from .inference.batch_io import BatchResult, ResultWriter, count_lines, line_id, read_requests
    from .parallel.mesh import make_mesh, parse_mesh
    from .processing.processor import Lfm2VlProcessor

    check_batch_arguments(args)
    quantize_options = _quantize_options(args)
    # Every check that reads only, then the model: nothing is written before all have passed.
    writer = ResultWriter(args.output, resume=args.resume, overwrite=args.overwrite)
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    options = _sampling_options(args)
    dtype = args.dtype or default_dtype_name()
    processor = Lfm2VlProcessor.from_pretrained(args.model)
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        args.model,
        dtype=DTYPES[dtype],
        mesh=mesh,
        scan_layers=args.scan_layers,
        progress=not args.quiet and sys.stderr.isatty(),
        **quantize_options,
    )
    engine = model.batch_engine(
        processor,
        slots=args.slots,
        max_length=args.max_length,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        prefill_batch=args.prefill_batch,
        workers=args.workers,
        **options,
    )
    with writer:
        bar = tqdm(total=count_lines(args.input), unit="req", disable=args.quiet or None, dynamic_ncols=True)
        totals = {"stop": 0, "length": 0, "error": 0, "skipped": 0}
        first_line: dict = {}

        def record(result: BatchResult) -> None:
            writer.write(result)
            totals[result.finish_reason] += 1
            bar.update()

        def requests():  # what the engine runs; bad lines, duplicates and done ids are handled here
            for number, item in read_requests(args.input, args.max_line_bytes):
                if item.id in first_line:  # a duplicate is known by its line, the id being taken
                    duplicate = BatchResult.failure(
                        line_id(number),
                        f"line {number}: duplicate id {item.id!r} (first on line {first_line[item.id]})",
                    )
                    item = duplicate
                else:
                    first_line[item.id] = number
                if item.id in writer.done_ids:
                    totals["skipped"] += 1
                    bar.update()
                elif isinstance(item, BatchResult):
                    record(item)
                else:
                    yield item

        start = time.perf_counter()
        with bar:
            for result in engine.run(requests()):
                record(result)
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(
                    f"{engine.stats.completion_tokens / elapsed:.1f} tok/s, "
                    f"{engine.busy_slots}/{args.slots} slots busy, {totals['error']} errors",
                    refresh=False,
                )
    elapsed = max(time.perf_counter() - start, 1e-9)
    tokens = engine.stats.completion_tokens
    print(
        f"lfm2vl batch: {totals['stop'] + totals['length']} done ({totals['stop']} stopped, "
        f"{totals['length']} at the length limit), {totals['error']} failed, {totals['skipped']} skipped "
        f"(already in {args.output}); {tokens} new tokens in {elapsed:.1f} s ({tokens / elapsed:.1f} "
        f"tokens/s), slot occupancy {engine.stats.occupancy:.0%}",
        file=sys.stderr,
    )
    return EXIT_SOME_REQUESTS_FAILED if totals["error"] else 0


def _conversion_arguments(p: argparse.ArgumentParser, src_help: str, dst_help: str, to_hf: bool) -> None:
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("dst", metavar="DST", help=dst_help)
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: as stored)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint files of an existing DST")
    p.add_argument(
        "--keep-other-files",
        action="store_true",
        help="write into a DST holding files that are not a checkpoint's (they are kept)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_debug_argument(p)
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

    out = hf_to_orbax(args.src, args.dst, args.dtype, args.overwrite, not args.quiet, args.keep_other_files)
    return _report_written(out)


def run_orbax_to_hf(args: argparse.Namespace) -> int:
    from .checkpoint.orbax import orbax_to_hf

    out = orbax_to_hf(
        args.src,
        args.dst,
        args.dtype,
        args.overwrite,
        args.max_shard_size,
        not args.quiet,
        args.keep_other_files,
    )
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


def _train_parser(sub: argparse._SubParsersAction) -> None:
    # Only the flags given appear in the namespace (SUPPRESS), so that they override --config's values,
    # which override `SFTConfig`'s defaults.
    p = sub.add_parser(
        "train",
        help="fine-tune on JSONL conversations (see train/README.md)",
        argument_default=argparse.SUPPRESS,
    )
    add_debug_argument(p)
    p.add_argument("--config", help="YAML file of options named as these flags; flags given here win")
    p.add_argument("--model", help="checkpoint directory or Hugging Face Hub id")
    p.add_argument("--data", help="JSONL conversations (image paths relative to the file)")
    p.add_argument("--output", help="run directory: metrics.jsonl, checkpoints/, final/")
    p.add_argument("--eval-data", help="JSONL conversations to evaluate on")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: at the end)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run (default 1000)")
    p.add_argument("--batch-size", type=int, help="conversations per step over all devices (default 8)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, help="peak learning rate (default 2e-5)")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps, then cosine decay (default 0)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, help="clip the global gradient norm (default 1; 0: off)")
    p.add_argument("--seed", type=int, help="data order and adapter initialisation (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (weights stay float32)")
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (default 100)")
    p.add_argument("--keep", type=int, help="checkpoints kept (default 3)")
    p.add_argument("--resume", action="store_true", help="continue from the output's last checkpoint")
    p.add_argument("--freeze", help="components that do not train: vision,projector,language")
    p.add_argument("--lr-multiplier", help="per-component learning-rate factors, e.g. vision=0.1")
    p.add_argument("--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights")
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (scale alpha/rank; default 8)")
    p.add_argument("--lora-targets", help="LoRA targets among attn,mlp,conv (default: all)")
    p.add_argument("--lora-dropout", type=float, help="dropout on LoRA's inputs, in [0, 1) (default 0)")
    p.add_argument("--init-adapters", help="start the LoRA adapters from this peft adapter directory")
    p.add_argument("--quantize", choices=QUANT_SCHEMES, help="QLoRA: hold the frozen base int8 or int4")
    p.add_argument("--quant-group-size", type=int, help="inputs per int4 scale (default 64)")
    p.add_argument("--max-length", type=int, help="longest conversation in tokens (default 2048)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad data lines")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="what the backward pass recomputes (default none)")
    p.add_argument(
        "--scan-layers", action=argparse.BooleanOptionalAction, help="scanned text layers (default on)"
    )
    p.add_argument("--loss-chunk-tokens", type=int, help="tokens per cross-entropy chunk (default 2048)")
    p.add_argument("--data-threads", type=int, help="image preprocessing threads (default 4)")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in RUN_DIR/tensorboard")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU where it is not known")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument("--coordinator-address", help="multi-process: process 0's host:port")
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index")
    p.add_argument(
        "--coordinator-timeout", type=int, help="multi-process: seconds to wait for all processes (300)"
    )
    p.add_argument(
        "--keep-other-files",
        action="store_true",
        help="train into an --output holding other files (they are kept)",
    )
    p.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="skip an update whose loss or gradient is NaN/inf instead of stopping the run",
    )
    add_compile_cache_argument(p)
    p.set_defaults(run=run_train, command="train")


def train_options(args: argparse.Namespace) -> dict:
    """The run's options: --config's YAML values, overridden by the flags given."""
    from .training.config import TrainingError

    values = {}
    if "config" in args:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise TrainingError(f"--config {args.config}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise TrainingError(f"--config {args.config}: expected a mapping of options")
        values.update(loaded)
    cli_only = ("run", "command", "config", "quiet", "debug", "compile_cache")
    given = {k: v for k, v in vars(args).items() if k not in cli_only}
    values.update(given)
    if getattr(args, "quiet", False):
        values["progress"] = False
    return values


def run_train(args: argparse.Namespace) -> int:
    import json

    from .training.config import SFTConfig
    from .training.trainer import SFTTrainer

    source = f"--config {args.config}" if "config" in args else "lfm2vl train"
    summary = SFTTrainer(SFTConfig.from_dict(train_options(args), source)).train()
    print(json.dumps(summary))
    return 0


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model over HTTP with OpenAI's chat completion API (continuous batching)",
        description="An OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, /health, "
        "/metrics) on the continuous-batching engine; see docs/serve.md. Needs the 'serve' extra.",
    )
    add_debug_argument(p)
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face Hub id")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument(
        "--max-model-len", type=int, default=4096, help="most prompt + new tokens per request (default 4096)"
    )
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429s")
    p.add_argument("--top-k", type=int, help="top-k of sampling requests (a static shape; default: off)")
    p.add_argument("--decode-chunk", type=int, default=8, help="decode steps between looks at the slots")
    p.add_argument("--workers", type=int, default=2, help="threads decoding and preprocessing images")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LFM2VL_API_KEY)")
    p.add_argument("--allowed-local-media-path", type=Path, help="serve file:// images under this directory")
    p.add_argument(
        "--allow-remote-media", action="store_true", help="fetch http(s) image URLs (default: refused)"
    )
    p.add_argument(
        "--media-fetch-timeout", type=float, default=10, help="seconds per image fetch (default 10)"
    )
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default 32 MB)")
    p.add_argument("--request-timeout", type=float, help="seconds before a request is given up (504)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="default: float32 on CPU (faster there), bfloat16 elsewhere",
    )
    p.add_argument("--mesh", help="shard over devices, e.g. data=2,tensor=4 (slots over data)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    """`lfm2vl serve`: loads the model, then serves until interrupted."""
    import os

    try:
        import uvicorn

        from .serving.app import create_app
        from .serving.chat import ServerSettings
    except ImportError as err:
        message = f"lfm2vl serve needs the 'serve' extra (pip install 'lfm2vl-jax[serve]'): {err}"
        raise Lfm2VlError(message) from None
    from .api import Lfm2VlForConditionalGeneration
    from .parallel.mesh import make_mesh, parse_mesh
    from .processing.processor import Lfm2VlProcessor

    for name in ("slots", "max_model_len", "decode_chunk", "workers"):
        if getattr(args, name) < 1:
            raise Lfm2VlError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_queue < 0 or (args.top_k is not None and args.top_k < 0):
        raise Lfm2VlError("--max-queue and --top-k must be >= 0")
    if args.max_body_mb <= 0 or args.media_fetch_timeout <= 0:
        raise Lfm2VlError("--max-body-mb and --media-fetch-timeout must be > 0")
    if args.allowed_local_media_path is not None and not args.allowed_local_media_path.is_dir():
        raise Lfm2VlError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    processor = Lfm2VlProcessor.from_pretrained(args.model)
    model = Lfm2VlForConditionalGeneration.from_pretrained(
        args.model,
        dtype=DTYPES[args.dtype or default_dtype_name()],
        mesh=mesh,
        progress=sys.stderr.isatty(),
    )
    top_k = args.top_k if args.top_k is not None else model.generation_config.get("top_k", 0)
    settings = ServerSettings(
        model_name=args.served_model_name or args.model,
        max_model_len=args.max_model_len,
        slots=args.slots,
        max_queue=args.max_queue,
        top_k=top_k,
        decode_chunk=args.decode_chunk,
        workers=args.workers,
        api_key=args.api_key or os.environ.get("LFM2VL_API_KEY") or None,
        allowed_local_media_path=args.allowed_local_media_path,
        max_body_bytes=int(args.max_body_mb * 2**20),
        request_timeout=args.request_timeout,
        allow_remote_media=args.allow_remote_media,
        media_fetch_timeout=args.media_fetch_timeout,
    )
    uvicorn.run(
        create_app(model, processor, settings), host=args.host, port=args.port, log_level=args.log_level
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lfm2vl", description="LFM2-VL vision-language models in JAX")
    add_debug_argument(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _batch_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    _serve_parser(sub)
    return parser


def run_command(args: argparse.Namespace, prog: str) -> int:
    """Runs a parsed command. A user's mistake (`Lfm2VlError`) or an I/O error (unreadable source, full
    disk, no permission) becomes one `error:` line and exit status 2; anything else is a bug: one line
    saying so and exit status 1. With `--debug`, every error keeps its traceback."""
    if getattr(args, "debug", False):
        return args.run(args)
    try:
        return args.run(args)
    except (Lfm2VlError, OSError) as err:
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)  # one line, whatever it holds
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        message = (str(err).strip().splitlines() or [""])[0]
        print(
            f"{prog}: internal error (a bug in lfm2vl-jax, please report it): {type(err).__name__}: "
            f"{message} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "compile_cache" in args:
        setup_compile_cache(args.compile_cache)
    return run_command(args, f"lfm2vl {args.command}")


if __name__ == "__main__":
    sys.exit(main())
