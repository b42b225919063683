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
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp

from .compile_cache import add_compile_cache_argument, setup_compile_cache
from .config import QUANT_SCHEMES, REMAT_POLICIES, ConfigError, Quantization, default_dtype_name
from .errors import Lfm2VlError
from .inference.batch_io import MAX_LINE_BYTES
from .inference.options import SAMPLING_DEFAULTS, SAMPLING_RANGES
from .inference.sampling import SEED_RANGE
from .inference.shards import check_shard_arguments

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers 5.x's default
EXIT_SOME_REQUESTS_FAILED = 3  # `batch` ran to the end, with error records; 1 is a bug, 2 a user error


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with the parser's default, "(default: X)", unless the default is None or
    unset (then the help says in words what applies) or the option is an on/off flag that is off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ([], argparse.SUPPRESS)
        shown = action.option_strings and not unset
        return f"{text} (default: %(default)s)" if shown and "%(default)" not in text else text


class Parser(argparse.ArgumentParser):
    """`lfm2vl`'s parsers (subcommands' too): help in `HelpFormatter`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


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
    p.add_argument(
        "--image", action="append", default=[], help="image file (repeatable; in prompt order; default: none)"
    )
    p.add_argument(
        "--prompt",
        required=True,
        help="the user message; the images go where it holds the checkpoint's image placeholder (<image> "
        "in the released ones), one per --image, else all before the text",
    )
    p.add_argument("--system", help="system message (default: none)")
    p.add_argument(
        "--tools",
        help="JSON file: a list of tool (function) schemas, rendered by the chat template; the answer's "
        "tool calls are then printed as JSON lines after it (default: no tools)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="most tokens generated (default: generation_config.json's max_new_tokens, or max_length "
        "minus the prompt, else 256)",
    )
    add_dtype_argument(p)
    add_sampling_arguments(p, "sampling seed")
    add_scan_layers_argument(p)
    add_quantize_arguments(p)
    add_compile_cache_argument(p)
    p.set_defaults(run=run_generate)


def add_dtype_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype (default: float32 on CPU, faster there; bfloat16 elsewhere)",
    )


def add_sampling_arguments(p: argparse.ArgumentParser, seed_help: str) -> None:
    """The sampling options of `generate` and `batch`; unset ones take the checkpoint's
    generation_config.json, else transformers' defaults (`inputs.SAMPLING_DEFAULTS`)."""
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    for name, kind, meaning in (
        ("temperature", float, "divides the logits before sampling"),
        ("top_k", int, "sample among the k most likely tokens (0: all)"),
        ("top_p", float, "sample among the most likely tokens holding this probability mass"),
        ("min_p", float, "drop tokens less likely than this times the most likely one"),
        ("repetition_penalty", float, "divides the logits of tokens already seen (1: none)"),
    ):
        p.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            help=f"{meaning} (default: generation_config.json's, else {SAMPLING_DEFAULTS[name]:g})",
        )
    p.add_argument("--seed", type=int, default=0, help=seed_help)


def add_scan_layers_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="text layers stacked and run by lax.scan: compiles faster for deep models, decodes slower "
        "(default: off, one array per layer)",
    )


def check_sampling_arguments(args: argparse.Namespace) -> None:
    """The generation flags of `generate` and `batch` given, checked before anything loads (the
    checkpoint's own values are checked when it is read); the error names the flag."""
    check_positive(args, ("max_new_tokens",))
    if args.top_k is not None and args.top_k < 0:
        raise Lfm2VlError(f"--top-k must be an integer >= 0 (0: off), got {args.top_k}")
    for name, (description, accepts) in SAMPLING_RANGES.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and accepts(value)):
            raise Lfm2VlError(f"--{name.replace('_', '-')} must be {description}, got {value}")
    if not SEED_RANGE[0] <= args.seed <= SEED_RANGE[1]:
        raise Lfm2VlError(f"--seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {args.seed}")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=QUANT_SCHEMES,
        help="weight-only quantization at load time: int8 (per output channel) or int4 (group-wise) "
        "(default: none, float weights)",
    )
    p.add_argument(
        "--quant-group-size", type=int, help="inputs per int4 scale (default: 64 where it divides)"
    )
    p.add_argument(
        "--quantize-embeddings",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --quantize: quantize the embedding / LM head too",
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

    check_sampling_arguments(args)
    tools = _read_tools(args.tools) if args.tools else None
    processor = Lfm2VlProcessor.from_pretrained(args.model)
    content = user_content(args.prompt, args.image, processor.image_token)
    conversation = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": content}
    ]
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
    status = StatusLine(sys.stderr)
    prompt_tokens = int(inputs["attention_mask"].sum())
    status.show(f"compiling the decoder for batch 1 and reading the {prompt_tokens}-token prompt ...")
    try:
        for step in model.stream(**inputs, max_new_tokens=args.max_new_tokens, seed=args.seed, **options):
            status.clear()
            generated.append(int(step[0]))
            # Decode the whole answer each time: a character may span several tokens.
            text = processor.decode(generated, skip_special_tokens=True)
            if text.startswith(printed):
                sys.stdout.write(text[len(printed) :])
                sys.stdout.flush()
                printed = text
    finally:
        status.clear()
    sys.stdout.write("\n")
    if tools is not None:  # the markers are special tokens: decoded without skipping them
        for call in parse_tool_calls(processor.decode(generated, skip_special_tokens=False)):
            sys.stdout.write("tool call: " + json.dumps(call["function"], ensure_ascii=False) + "\n")
    return 0


def user_content(prompt: str, images: Sequence[str], image_token: str) -> list[dict]:
    """`--prompt` and the `--image` files as the user message's content: the images where the prompt holds
    the checkpoint's `image_token` placeholder, when it holds one per image; all before the text when it
    holds none."""
    placed = prompt.count(image_token)
    if placed == 0:
        return [*({"type": "image", "path": path} for path in images), {"type": "text", "text": prompt}]
    if placed != len(images):
        raise Lfm2VlError(
            f"--prompt holds {placed} {image_token} placeholder(s) but {len(images)} --image file(s) were "
            f"given: write one {image_token} per --image where it goes, or none (the images then go before "
            "the text)"
        )
    content: list[dict] = []
    for index, text in enumerate(prompt.split(image_token)):
        if text:
            content.append({"type": "text", "text": text})
        if index < len(images):
            content.append({"type": "image", "path": images[index]})
    return content


class StatusLine:
    """One line saying what the command waits for (compiling), on `stream` only when it is a terminal
    (piped or redirected output gets none), erased before anything else is written."""

    def __init__(self, stream) -> None:
        self.stream = stream if stream.isatty() else None
        self.shown = False

    def show(self, text: str) -> None:
        if self.stream is not None:
            self.stream.write(f"\r\x1b[K{text}")
            self.stream.flush()
            self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


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
        "line per request to --output as it finishes. Exit status: 0 if every request succeeded, "
        f"{EXIT_SOME_REQUESTS_FAILED} if some failed (their lines say why), 2 on an error that stops the "
        "run, 1 on a bug.",
    )
    add_debug_argument(p)
    p.add_argument("--model", required=True, help="checkpoint directory or Hugging Face Hub id")
    p.add_argument("--input", required=True, type=Path, help="requests, one JSON object per line")
    p.add_argument("--output", required=True, type=Path, help="results file (JSONL, appended)")
    p.add_argument("--slots", type=int, default=64, help="requests decoded together")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="for requests that do not say (default: generation_config.json's max_new_tokens, or "
        "max_length minus the prompt, else 256)",
    )
    p.add_argument("--max-length", type=int, default=4096, help="most prompt + new tokens per request")
    add_sampling_arguments(p, "seed of requests that do not set one")
    add_dtype_argument(p)
    p.add_argument(
        "--mesh",
        help="shard over devices, e.g. data=2,tensor=4: slots over data, heads over tensor (default: "
        "one device)",
    )
    add_scan_layers_argument(p)
    p.add_argument(
        "--prefill-batch", type=int, help="most requests prefilled together (default: slots/4, at least 1)"
    )
    add_quantize_arguments(p)
    p.add_argument("--workers", type=int, help="threads preparing requests (default: CPUs - 1, 1..4)")
    p.add_argument(
        "--max-line-bytes",
        type=int,
        default=MAX_LINE_BYTES,
        help="longest request line read, in bytes; longer ones fail unread",
    )
    p.add_argument("--resume", action="store_true", help="skip the ids already in --output, append the rest")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--num-shards",
        type=int,
        help="split the requests (by a hash of id) into N shards... (default: no split)",
    )
    p.add_argument(
        "--shard-index",
        type=int,
        help="...and run shard I only (0 <= I < N; default: none, needed with --num-shards); see batch-merge",
    )
    ray = p.add_argument_group("Ray (the 'ray' extra; see docs/distributed.md)")
    ray.add_argument("--ray", action="store_true", help="run --replicas engine replicas on a Ray cluster")
    ray.add_argument("--ray-address", help="the cluster's HOST:PORT (default: RAY_ADDRESS, else a local one)")
    ray.add_argument("--ray-timeout", type=float, default=30, help="seconds to wait for --ray-address")
    ray.add_argument("--replicas", type=int, default=1, help="engine replicas (Ray actors)")
    ray.add_argument("--replica-cpus", type=float, default=1, help="CPUs per replica")
    ray.add_argument(
        "--replica-gpus", type=float, help="GPUs per replica (e.g. 1: one replica per GPU; default: none)"
    )
    ray.add_argument(
        "--replica-tpus", type=float, help="TPU chips per replica (e.g. 4: one per TPU host; default: none)"
    )
    ray.add_argument(
        "--ray-preprocess",
        choices=("replica", "stage"),
        default="replica",
        help="render and preprocess requests in the replicas or in a CPU stage before them",
    )
    add_compile_cache_argument(p)
    p.set_defaults(run=run_batch)


def _batch_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch-merge",
        help="merge the results files of sharded `lfm2vl batch` runs into one",
        description="Writes OUTPUT: one result line per line of --requests, in its order, taken from the "
        "RESULTS files (never modified). Refused, with nothing written, when an id of --requests has no "
        "result or more than one, or a result's id is not in --requests.",
    )
    add_debug_argument(p)
    p.add_argument("output", type=Path, metavar="OUTPUT", help="merged results file (JSONL) to create")
    p.add_argument("results", type=Path, nargs="+", metavar="RESULTS", help="the shards' --output files")
    p.add_argument("--requests", required=True, type=Path, help="the --input file the shards ran")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT (a results file)")
    p.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, help="as lfm2vl batch's")
    p.set_defaults(run=run_batch_merge)


def run_batch_merge(args: argparse.Namespace) -> int:
    from .inference.shards import merge_results

    check_positive(args, ("max_line_bytes",))
    written = merge_results(args.output, args.results, args.requests, args.overwrite, args.max_line_bytes)
    print(f"lfm2vl batch-merge: {written} results from {len(args.results)} files in {args.output}")
    return 0


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
    check_positive(args, ("slots", "max_length", "prefill_batch", "workers", "max_line_bytes"))
    check_sampling_arguments(args)
    check_shard_arguments(args.num_shards, args.shard_index)
    check_positive(args, ("replicas",))
    if args.ray_timeout <= 0 or args.replica_cpus < 0:
        raise Lfm2VlError("--ray-timeout must be > 0 and --replica-cpus >= 0")
    ray_only = ("ray_address", "replica_gpus", "replica_tpus")
    given = [name for name in ray_only if getattr(args, name) is not None] + ["replicas"] * (
        args.replicas > 1
    )
    if given and not args.ray:
        raise Lfm2VlError(f"--{given[0].replace('_', '-')} is an option of --ray runs; add --ray")
    if args.resume and args.overwrite:
        raise Lfm2VlError("--resume continues --output and --overwrite replaces it: pass one of them")
    if not args.input.is_file():
        what = "not a regular file" if args.input.exists() else "no such file"
        raise Lfm2VlError(f"--input {args.input}: {what}")
    check_output_file(args.output, [("--input", args.input)])


def run_batch(args: argparse.Namespace) -> int:
    """`lfm2vl batch`: the JSONL requests through `BatchEngine`, one result line each as it finishes."""
    from tqdm.auto import tqdm

    from .inference.batch_io import BatchResult, ResultWriter, count_lines, unique_request_lines
    from .inference.shards import request_shard

    check_batch_arguments(args)
    _quantize_options(args)  # checked before anything is read or written
    # Every check that reads only, then the model: nothing is written before all have passed.
    writer = ResultWriter(args.output, resume=args.resume, overwrite=args.overwrite)
    options = _sampling_options(args)
    engine_options = {
        "slots": args.slots,
        "max_length": args.max_length,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
        "prefill_batch": args.prefill_batch,
        "workers": args.workers,
        **options,
    }
    runner = _ray_runner(args, engine_options) if args.ray else _LocalRunner(args, engine_options)
    with writer:
        bar = tqdm(total=count_lines(args.input), unit="req", disable=args.quiet or None, dynamic_ncols=True)
        totals = {"stop": 0, "length": 0, "error": 0, "skipped": 0, "other shards": 0}

        def record(result: BatchResult) -> None:
            writer.write(result)
            totals[result.finish_reason] += 1
            bar.update()

        def requests():  # what the engine runs; bad lines, duplicates, other shards and done ids: here
            for line in unique_request_lines(args.input, args.max_line_bytes):
                item = line.item
                if (
                    args.num_shards is not None
                    and request_shard(line.key, args.num_shards) != args.shard_index
                ):
                    totals["other shards"] += 1
                    bar.update()
                elif item.id in writer.done_ids:
                    totals["skipped"] += 1
                    bar.update()
                elif isinstance(item, BatchResult):
                    record(item)
                else:
                    yield line

        start = time.perf_counter()
        # until the first result replaces it
        bar.set_postfix_str("compiling the decoder for the first requests ...")
        with bar:
            for result in runner.run(requests()):
                record(result)
                bar.set_postfix_str(f"{runner.progress()}, {totals['error']} errors", refresh=False)
    elapsed = max(time.perf_counter() - start, 1e-9)
    tokens = runner.completion_tokens
    shard_note = ""
    if args.num_shards is not None:
        shard_note = f", {totals['other shards']} left to the other {args.num_shards - 1} shards"
    print(
        f"lfm2vl batch: {totals['stop'] + totals['length']} done ({totals['stop']} stopped, "
        f"{totals['length']} at the length limit), {totals['error']} failed, {totals['skipped']} skipped "
        f"(already in {args.output}){shard_note}; {tokens} new tokens in {elapsed:.1f} s "
        f"({tokens / elapsed:.1f} tokens/s), {runner.summary()}",
        file=sys.stderr,
    )
    return EXIT_SOME_REQUESTS_FAILED if totals["error"] else 0


class _LocalRunner:
    """`lfm2vl batch` in this process: one engine over this process's devices."""

    def __init__(self, args: argparse.Namespace, engine_options: dict):
        from .api import Lfm2VlForConditionalGeneration
        from .parallel.mesh import make_mesh, parse_mesh
        from .processing.processor import Lfm2VlProcessor

        mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
        processor = Lfm2VlProcessor.from_pretrained(args.model)
        model = Lfm2VlForConditionalGeneration.from_pretrained(
            args.model,
            dtype=DTYPES[args.dtype or default_dtype_name()],
            mesh=mesh,
            scan_layers=args.scan_layers,
            progress=not args.quiet and sys.stderr.isatty(),
            **_quantize_options(args),
        )
        self.engine = model.batch_engine(processor, **engine_options)
        self._start = time.perf_counter()

    def run(self, lines):
        self._start = time.perf_counter()
        return self.engine.run(line.item for line in lines)

    @property
    def completion_tokens(self) -> int:
        return self.engine.stats.completion_tokens

    def progress(self) -> str:
        rate = self.completion_tokens / max(time.perf_counter() - self._start, 1e-9)
        return f"{rate:.1f} tok/s, {self.engine.busy_slots}/{self.engine.slots} slots busy"

    def summary(self) -> str:
        return f"slot occupancy {self.engine.stats.occupancy:.0%}"


def _ray_runner(args: argparse.Namespace, engine_options: dict):
    """`lfm2vl batch --ray`: `--replicas` engines on the Ray cluster (lfm2vl_jax.integrations.ray)."""
    try:
        from .integrations import ray as ray_integration
    except ImportError as err:
        message = f"--ray needs the 'ray' extra: pip install 'lfm2vl-jax[ray]' ({err})"
        raise Lfm2VlError(message) from None
    import jax

    resources = {"num_cpus": args.replica_cpus}
    if args.replica_gpus:
        resources["num_gpus"] = args.replica_gpus
    if args.replica_tpus:
        resources["resources"] = {"TPU": args.replica_tpus}
    ray_integration.connect(args.ray_address, args.ray_timeout)
    return ray_integration.RayBatchRunner(
        args.model,
        args.input,
        replicas=args.replicas,
        engine_options={
            **engine_options,
            "dtype": args.dtype,
            "mesh": args.mesh,
            "scan_layers": args.scan_layers,
            "quantize": _quantize_options(args),
            "compile_cache": jax.config.jax_compilation_cache_dir,  # this process's (the flag's)
        },
        replica_resources=resources,
        preprocess=args.ray_preprocess,
        max_line_bytes=args.max_line_bytes,
    )


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
            help="split the weights into shards above this size: bytes, or e.g. 5GB, 500MiB",
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
    p.add_argument(
        "--config", help="YAML file of options named as these flags; flags given here win (default: none)"
    )
    p.add_argument("--model", help="checkpoint directory or Hugging Face Hub id (required)")
    p.add_argument("--data", help="JSONL conversations, image paths relative to the file (required)")
    p.add_argument("--output", help="run directory: metrics.jsonl, checkpoints/, final/ (required)")
    p.add_argument("--eval-data", help="JSONL conversations to evaluate on (default: none)")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--steps", type=int, help="total optimizer steps of the run")
    p.add_argument("--batch-size", type=int, help="conversations per step over all devices")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--learning-rate", type=float, help="peak learning rate")
    p.add_argument(
        "--warmup-ratio",
        type=float,
        help="share of --steps warming the learning rate up linearly (rounded up, at most steps - 1), "
        "then cosine decay",
    )
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps; > 0 wins over --warmup-ratio")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, help="clip the global gradient norm (0: off)")
    p.add_argument("--seed", type=int, help="data order and adapter initialisation")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="compute dtype; weights stay float32 (default: float32 on CPU, bfloat16 elsewhere)",
    )
    p.add_argument("--mesh", help="device mesh, e.g. data=2,fsdp=2,tensor=2 (default: all devices on data)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--keep", type=int, help="checkpoints kept")
    p.add_argument("--resume", action="store_true", help="continue from the output's last checkpoint")
    p.add_argument("--freeze", help="components that do not train: vision,projector,language (default: none)")
    p.add_argument(
        "--lr-multiplier", help="per-component learning-rate factors, e.g. vision=0.1 (default: 1)"
    )
    p.add_argument(
        "--lora-rank", type=int, help="train LoRA adapters of this rank instead of the weights (0: off)"
    )
    p.add_argument("--lora-alpha", type=float, help="LoRA scaling numerator (scale alpha/rank)")
    p.add_argument("--lora-targets", help="LoRA targets among attn,mlp,conv")
    p.add_argument("--max-length", type=int, help="longest conversation in tokens")
    p.add_argument("--lora-dropout", type=float, help="dropout on LoRA's inputs, in [0, 1)")
    p.add_argument(
        "--init-adapters", help="start the LoRA adapters from this peft adapter directory (default: fresh)"
    )
    p.add_argument(
        "--quantize", choices=QUANT_SCHEMES, help="QLoRA: hold the frozen base int8 or int4 (default: float)"
    )
    p.add_argument(
        "--quant-group-size", type=int, help="inputs per int4 scale (default: 64 where it divides)"
    )
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad data lines")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="what the backward pass recomputes")
    p.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        help="text layers stacked and run by lax.scan (training's default, unlike generate's: compile time "
        "independent of depth)",
    )
    p.add_argument("--loss-chunk-tokens", type=int, help="tokens per cross-entropy chunk")
    p.add_argument("--data-threads", type=int, help="image preprocessing threads")
    p.add_argument("--tensorboard", action="store_true", help="TensorBoard logs in RUN_DIR/tensorboard")
    p.add_argument(
        "--peak-tflops", type=float, help="device peak for MFU where it is not known (default: none, MFU n/a)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    p.add_argument(
        "--coordinator-address", help="multi-process: process 0's host:port (default: one process)"
    )
    p.add_argument("--num-processes", type=int, help="multi-process: number of processes (default: 1)")
    p.add_argument("--process-id", type=int, help="multi-process: this process's index (default: 0)")
    p.add_argument("--coordinator-timeout", type=int, help="multi-process: seconds to wait for all processes")
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
    state_train_defaults(p)
    p.set_defaults(run=run_train, command="train")


def state_train_defaults(p: argparse.ArgumentParser) -> None:
    """`train`'s flags are SUPPRESS by default (so that they override --config's values only when given):
    the help of each states `SFTConfig`'s default instead, unless it says in words what applies."""
    import dataclasses

    from .training.config import SFTConfig

    defaults = {
        f.name: f.default for f in dataclasses.fields(SFTConfig) if f.default is not dataclasses.MISSING
    }
    for action in p._actions:
        value = defaults.get(action.dest)
        if value is None or value is False or "(default" in (action.help or ""):
            continue
        shown = ",".join(value) if isinstance(value, tuple) else value
        action.help = f"{action.help} (default: {shown})"


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
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--served-model-name", help="the model name clients send (default: --model)")
    p.add_argument("--slots", type=int, default=16, help="requests decoded together")
    p.add_argument("--max-model-len", type=int, default=4096, help="most prompt + new tokens per request")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot before 429s")
    p.add_argument(
        "--top-k",
        type=int,
        help="top-k of sampling requests, a static shape (default: generation_config.json's, else off)",
    )
    p.add_argument("--decode-chunk", type=int, default=8, help="decode steps between looks at the slots")
    p.add_argument("--workers", type=int, default=2, help="threads decoding and preprocessing images")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $LFM2VL_API_KEY)")
    p.add_argument(
        "--allowed-local-media-path",
        type=Path,
        help="serve file:// images under this directory (default: none, file:// refused)",
    )
    p.add_argument(
        "--allow-remote-media", action="store_true", help="fetch http(s) image URLs (default: refused)"
    )
    p.add_argument("--media-fetch-timeout", type=float, default=10, help="seconds per image fetch")
    p.add_argument("--max-body-mb", type=float, default=32, help="largest request body, in MB")
    p.add_argument(
        "--request-timeout",
        type=float,
        help="seconds before a request is given up with a 504 (default: never)",
    )
    add_dtype_argument(p)
    p.add_argument(
        "--mesh", help="shard over devices, e.g. data=2,tensor=4: slots over data (default: one device)"
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("critical", "error", "warning", "info", "debug"),
        help="the server's (uvicorn's) log level",
    )
    add_compile_cache_argument(p)  # a restarted server loads its programs instead of compiling them
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


def _example_parser(sub: argparse._SubParsersAction) -> None:
    from .checkpoint.example import FAMILIES, SIZES

    p = sub.add_parser(
        "example",
        help="write a random-weight checkpoint and example data to try the commands offline",
        description="Writes DIR/model, a checkpoint of a released model's shapes with random weights, its "
        "processor files and a stand-in tokenizer, and DIR/data: drawn images and conversations about them "
        "(train.jsonl, eval.jsonl). Nothing is downloaded. Random weights answer with noise.",
    )
    add_debug_argument(p)
    p.add_argument(
        "directory", metavar="DIR", type=Path, help="where to write model/ and data/ (new or empty)"
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default="tiny",
        help="tiny: small widths, written in seconds; 450m, 1.6b: the released shapes (bfloat16, 0.9/3.2 GB)",
    )
    p.add_argument("--family", choices=FAMILIES, default="lfm2-vl", help="whose config and processor files")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild an earlier example in DIR (other files there are kept)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run_example)


def run_example(args: argparse.Namespace) -> int:
    from .checkpoint.example import write_example

    model = write_example(
        args.directory,
        args.size,
        args.family,
        args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
    )
    data = args.directory / "data"
    print(
        f"wrote {model} ({args.family} {args.size}, random weights) and {data} (images, train.jsonl, "
        f"eval.jsonl)\n"
        f"try:\n"
        f"  lfm2vl generate --model {model} --image {data}/images/stop_sign.png "
        f'--prompt "What is in this image?" --max-new-tokens 16\n'
        f"  lfm2vl train --model {model} --data {data}/train.jsonl --eval-data {data}/eval.jsonl "
        f"--output {args.directory}/run --steps 4 --batch-size 2\n"
        "Random weights answer with noise (tokens like <|filler_6942|>, or blank lines): expected, not a bug."
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="lfm2vl", description="LFM2-VL vision-language models in JAX")
    add_debug_argument(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _batch_parser(sub)
    _batch_merge_parser(sub)
    _convert_parser(sub)
    _train_parser(sub)
    _serve_parser(sub)
    _example_parser(sub)
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
