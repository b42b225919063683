"""`SFTTrainer`: the supervised fine-tuning loop behind `lfm2vl train`.

    trainer = SFTTrainer(SFTConfig(model="LiquidAI/LFM2-VL-450M", data="train.jsonl", output="run",
                                   steps=200, batch_size=8, learning_rate=2e-5))
    summary = trainer.train()

Order of work: check the options, read and check all the data (a bad line stops the run here), check the
output directory, build the mesh and check that the batch divides it and that the state fits the
devices, and only then load the weights and compile. The loop dispatches step s+1 before reading step s's
metrics, so the host never idles the devices to log; checkpoints save asynchronously.

RUN_DIR layout: run.json (settings a resume must share), metrics.jsonl, checkpoints/ (orbax), final/ (the
trained model as a transformers checkpoint, with the source's tokenizer and processor files; LoRA merged),
adapter/ (LoRA runs: the adapters in peft's format), tensorboard/ (with --tensorboard), loss.png (when
matplotlib is installed).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ..checkpoint.export import save_hf_checkpoint
from ..checkpoint.files import check_target, planned_names
from ..checkpoint.hf import load_hf_checkpoint
from ..checkpoint.hub import resolve_checkpoint_dir
from ..config import DTypePolicy, Lfm2VlConfig, RuntimeConfig, default_dtype_name, load_config
from ..nn.params import Params, abstract_params
from ..parallel.mesh import make_mesh, parse_mesh
from ..processing.processor import Lfm2VlProcessor
from .checkpointing import Checkpoints, abstract_with_shardings
from .config import SFTConfig, TrainingError
from .data import BatchLoader, BatchPlan, RowSlice, read_conversations
from .lora import LoraConfig, init_adapters
from .metrics import MetricsLog, TensorBoard, adapter_sizes, batch_counts, peak_flops, plot_losses, step_flops
from .optimizer import COMPONENTS, OptimizerConfig, make_optimizer, parameter_labels
from .peft_adapter import CONFIG_FILE, WEIGHTS_FILE, load_peft_adapter, save_peft_adapter
from .step import (
    Trainable,
    TrainState,
    abstract_state,
    make_eval_step,
    make_train_step,
    state_shardings,
)

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
# Everything a run writes into its directory; anything else there is a user's.
RUN_NAMES = (RUN_FILE, METRICS_FILE, "checkpoints", "final", "adapter", "tensorboard", "loss.png")
# Settings added after runs were first recorded: a run.json without one had this value.
LATER_SETTINGS = {
    "lora_dropout": 0.0,
    "init_adapters_sha256": None,
    "quantize": None,
    "quant_group_size": None,
}
FINGERPRINT_BLOCKS, FINGERPRINT_BLOCK = 64, 2**16


def model_fingerprint(model_dir: Path) -> str:
    """A SHA-256 over config.json and the weight files (their size, first MiB, with the safetensors
    header, and 64 blocks spread over the rest): tells another model of the same shapes apart in
    milliseconds, without reading gigabytes."""
    digest = hashlib.sha256()
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}:".encode())
        with open(path, "rb") as f:
            digest.update(f.read(2**20))
            for i in range(FINGERPRINT_BLOCKS):
                f.seek(size * i // FINGERPRINT_BLOCKS)
                digest.update(f.read(FINGERPRINT_BLOCK))
    return digest.hexdigest()


def read_run_file(path: Path) -> dict[str, Any]:
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TrainingError(f"--resume: {path} is unreadable or corrupt ({err})") from None
    if not isinstance(previous, dict):
        raise TrainingError(f"--resume: {path} is corrupt (not a JSON object)")
    return previous


def initialize_distributed(config: SFTConfig) -> None:
    """`jax.distributed.initialize` for a multi-process launch (before anything touches a device and
    before anything is written). XLA aborts the process when its own deadline passes, so a watchdog
    ends it first, after `coordinator_timeout` seconds, with one error line naming the address (exit
    status 2)."""
    if not (config.coordinator_address or (config.num_processes or 1) > 1):
        return
    where = (
        f"--coordinator-address {config.coordinator_address}: process {config.process_id} of "
        f"{config.num_processes}"
    )

    def give_up() -> None:
        sys.stderr.write(
            f"lfm2vl train: error: {where}: not every process joined the run within --coordinator-timeout "
            f"{config.coordinator_timeout} s (is the address reachable, and are all processes started?)\n"
        )
        sys.stderr.flush()
        os._exit(2)

    watchdog = threading.Timer(config.coordinator_timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            config.coordinator_address,
            config.num_processes,
            config.process_id,
            initialization_timeout=config.coordinator_timeout + 60,  # ours fires first
        )
    except (RuntimeError, ValueError) as err:  # a bad address, an id out of range
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrainingError(f"{where} could not join the run ({detail})") from None
    finally:
        watchdog.cancel()


def global_batch(
    local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules: Any, groups: int
) -> dict[str, jax.Array]:
    """Global arrays from each process's rows (axis 1: rows or image tiles, `groups` process slices of
    them), sharded over the batch mesh axes."""
    out = {}
    for name, x in local.items():
        shape = (x.shape[0], x.shape[1] * groups, *x.shape[2:])
        sharding = rules.sharding(mesh, shape, (None, "batch", *(None,) * (x.ndim - 2)), name)
        out[name] = jax.make_array_from_process_local_data(sharding, x, shape)
    return out


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _sharded_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (shapes and dtypes) under `shardings`."""
    total = 0
    for x, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
        total += int(np.prod(sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
    return total


def device_memory_bytes() -> int | None:
    """Memory one local device can hold: its allocator's limit on accelerators; on the CPU, the host's
    available memory split between the local devices. None where neither is known."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    except OSError:
        return None
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    return available // max(1, jax.local_device_count())


def memory_needs(trainable: Trainable, tx: Any) -> dict[str, int]:
    """Bytes one device holds through a run, by kind: what trains (weights, or LoRA's adapters), its
    gradients, its optimizer state (and the step count and key), and the frozen params (with LoRA: the
    whole base, never merged, so no merged copy and no full-size gradient)."""
    abstract = abstract_state(trainable, tx)
    shardings = state_shardings(trainable, tx, abstract)
    trainable_shardings, frozen_shardings = trainable.shardings()
    dtype = trainable.config.runtime.dtypes.params
    _, frozen = trainable.split(abstract_params(trainable.config, dtype))
    trained = _sharded_bytes(abstract.params, trainable_shardings)
    return {
        "adapters" if trainable.lora else "trained weights": trained,
        "their gradients": trained,
        "optimizer state": _sharded_bytes(abstract, shardings) - trained,
        "frozen weights": _sharded_bytes(frozen, frozen_shardings),
    }


@dataclasses.dataclass
class TrainingRun:
    """A prepared run (`SFTTrainer.run`): config, what trains, state, frozen params, data, checkpoints."""

    config: Lfm2VlConfig
    model_dir: Path
    trainable: Trainable
    state: TrainState
    frozen: Params
    train_step: Callable
    loader: BatchLoader
    data_state: dict[str, Any] | None
    evaluator: Evaluator | None
    checkpoints: Checkpoints
    groups: int
    start: int


@dataclasses.dataclass
class Evaluator:
    """The mean token loss over a whole eval set (fixed order), with the given weights."""

    loader: BatchLoader
    eval_step: Callable
    config: Lfm2VlConfig
    groups: int

    def __call__(self, params: Params, frozen: Params) -> float:
        total, count = 0.0, 0
        runtime = self.config.runtime
        for local in self.loader.iterator(self.loader.plan.batches_per_epoch):
            batch = global_batch(local, runtime.mesh, runtime.rules, self.groups)
            loss, tokens = jax.device_get(self.eval_step(params, frozen, batch))
            total, count = total + float(loss), count + int(tokens)
        return total / max(count, 1)


class SFTTrainer:
    """Supervised fine-tuning of an LFM2-VL checkpoint on JSONL conversations (see `SFTConfig`)."""

    def __init__(self, config: SFTConfig):
        self.config = config
        self.output = Path(config.output)
        self.primary = True
        self.run: TrainingRun | None = None  # after `train`: the final state, frozen params, config

    def log(self, message: str) -> None:
        if self.config.progress and self.primary:
            tqdm.write(message, file=sys.stderr)

    def warn(self, message: str) -> None:
        """Printed even with --quiet: something the user must know was skipped."""
        if self.primary:
            tqdm.write(f"lfm2vl train: warning: {message}", file=sys.stderr)

    # -- setup ---------------------------------------------------------------------------------------------

    def _check_output(self, model_dir: Path) -> dict[str, Any]:
        """Refuses to overwrite a run, to continue one started with other settings or another model, or
        to write into a directory holding a user's files (unless `keep_other_files`); returns this run's
        settings (written to run.json once every check has passed)."""
        settings = {**self.config.run_settings(), "data_sha256": _file_digest(self.config.data)}
        if self.config.init_adapters:
            weights = Path(self.config.init_adapters) / WEIGHTS_FILE
            settings["init_adapters_sha256"] = _file_digest(weights) if weights.is_file() else None
        settings |= {"model": str(model_dir.absolute()), "model_fingerprint": model_fingerprint(model_dir)}
        run_file = self.output / RUN_FILE
        if (self.output.exists() or self.output.is_symlink()) and not self.output.is_dir():
            raise TrainingError(f"--output {self.output} is a file, not a directory; choose another --output")
        existing = [name for name in RUN_NAMES if (self.output / name).exists()]
        if existing and not self.config.resume:
            raise TrainingError(
                f"{self.output} already holds a run ({', '.join(existing)}); pass --resume to continue it or "
                "choose another --output"
            )
        others = []
        if self.output.is_dir():
            others = sorted(p.name for p in self.output.iterdir() if p.name not in RUN_NAMES)
        if others and not self.config.keep_other_files:
            raise TrainingError(
                f"--output {self.output} holds files that are not a training run's "
                f"({', '.join(others[:5])}); choose another --output, or pass --keep-other-files to write "
                "the run beside them"
            )
        final_files = planned_names(model_dir, None)
        check_target(self.output / "final", True, None, self.config.keep_other_files, final_files)
        if self.config.lora_rank:
            adapter_files = {CONFIG_FILE, WEIGHTS_FILE}
            check_target(self.output / "adapter", True, None, self.config.keep_other_files, adapter_files)
        if self.config.resume and run_file.exists():
            previous = read_run_file(run_file)
            # Runs recorded before the model was: nothing to compare.
            compared = [k for k in settings if k != "model" and (k in previous or k != "model_fingerprint")]
            differ = sorted(k for k in compared if previous.get(k, LATER_SETTINGS.get(k)) != settings[k])
            if "model_fingerprint" in differ:
                raise TrainingError(
                    f"--resume: the run in {self.output} trains the model {previous.get('model')}, but "
                    f"--model {self.config.model} is another one (its config and weights differ)"
                )
            if differ:
                changes = ", ".join(f"{k}: {previous.get(k)!r} -> {settings[k]!r}" for k in differ)
                raise TrainingError(
                    f"--resume: the run in {self.output} was started with other settings ({changes})"
                )
        return settings

    def _mesh(self) -> jax.sharding.Mesh:
        mesh = self.config.mesh
        sizes = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh or {})
        if not sizes:
            sizes = {"data": jax.device_count()}
        mesh = make_mesh(**sizes)
        if jax.process_count() > 1 and mesh.devices.size != jax.device_count():
            raise TrainingError(
                f"--mesh {sizes} uses {mesh.devices.size} of the {jax.device_count()} devices; "
                "a multi-process run must use them all"
            )
        return mesh

    def _runtime(self, mesh: jax.sharding.Mesh) -> RuntimeConfig:
        dtype = self.config.dtype or default_dtype_name()
        return RuntimeConfig(
            dtypes=DTypePolicy(params=jnp.float32, compute=jnp.dtype(dtype)),
            scan_layers=self.config.scan_layers,
            remat=self.config.remat,
            mesh=mesh,
            quantization=self.config.quantization(),
        )

    def _trainable(self, config: Lfm2VlConfig) -> Trainable:
        keys = tuple(COMPONENTS[name] for name in self.config.trained_components)
        if not self.config.lora_rank:
            return Trainable(config, keys)
        c = self.config
        lora = LoraConfig(c.lora_rank, c.lora_alpha, tuple(c.lora_targets), c.lora_dropout)
        return Trainable(config, tuple(k for k in keys if k in ("vision", "text")), lora)

    def _optimizer(self, trainable: Trainable) -> tuple[Any, Any]:
        c = self.config
        options = OptimizerConfig(
            learning_rate=c.learning_rate,
            total_steps=c.steps,
            warmup_steps=c.warmup,
            weight_decay=c.weight_decay,
            max_grad_norm=c.max_grad_norm,
            lr_multipliers=c.lr_multiplier,
        )
        return make_optimizer(options, parameter_labels(trainable.specs())), options.schedule()

    def _check_batch(self, mesh: jax.sharding.Mesh, config: Lfm2VlConfig) -> int:
        shards = int(np.prod([mesh.shape[a] for a in config.runtime.rules.mesh_axes("batch")]))
        micro = self.config.micro_batch_size
        if micro % shards:
            raise TrainingError(
                f"--batch-size {self.config.batch_size} / --grad-accum {self.config.grad_accum} = {micro} "
                f"conversations per micro-batch do not divide over the mesh's {shards} batch shards "
                f"(data x fsdp of {dict(mesh.shape)})"
            )
        return shards

    def _check_memory(self, trainable: Trainable) -> None:
        """Refuses a run whose params, gradients and optimizer state do not fit the devices."""
        tx, _ = self._optimizer(trainable)
        needs = memory_needs(trainable, tx)
        need, have = sum(needs.values()), device_memory_bytes()
        if have is not None and need > have:
            parts = ", ".join(f"{name} {_size(n)}" for name, n in needs.items())
            raise TrainingError(
                f"params, gradients and optimizer state need {_size(need)} per device ({parts}; "
                f"activations not counted) but a device has {_size(have)} available: shard them "
                "over more devices (--mesh fsdp=N), freeze components (--freeze) or train LoRA adapters "
                "(--lora-rank)"
            )

    def _row_slice(self, mesh: jax.sharding.Mesh, config: Lfm2VlConfig) -> tuple[RowSlice, int]:
        """This process's rows of a micro-batch, and the number of row groups (process slices)."""
        micro = self.config.micro_batch_size
        sharding = config.runtime.rules.sharding(mesh, (micro,), ("batch",), "batch")
        indices = sharding.addressable_devices_indices_map((micro,)).values()
        spans = {(s[0].start or 0, s[0].stop or micro) for s in indices}
        start, stop = min(a for a, _ in spans), max(b for _, b in spans)
        return RowSlice(start, stop - start), micro // (stop - start)

    # -- the run -------------------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Runs (or continues, with `resume`) the fine-tuning; returns a summary (last loss, eval loss,
        paths)."""
        run = self.run = self._prepare()
        last = self._loop(run) if run.start < self.config.steps else {}
        final = self.output / "final"
        if run.start < self.config.steps or not final.exists():
            self._export(run, final)
        metrics_file = self.output / METRICS_FILE
        if self.primary and metrics_file.exists() and plot_losses(metrics_file, self.output / "loss.png"):
            self.log(f"loss curve: {self.output / 'loss.png'}")
        return {
            "steps": self.config.steps,
            "resumed_from": run.start or None,
            "loss": last.get("loss"),
            "eval_loss": last.get("eval_loss"),
            "final": str(final),
            "metrics": str(metrics_file),
        }

    def _prepare(self) -> TrainingRun:
        """Everything up to the first step: checks first (data, output, mesh, batch, memory), then the
        weights, the state (fresh or restored) and the data pipeline."""
        c = self.config
        initialize_distributed(c)
        self.primary = jax.process_index() == 0
        model_dir = resolve_checkpoint_dir(c.model)
        processor = Lfm2VlProcessor.from_pretrained(model_dir)
        train_data = read_conversations(c.data, processor, c.max_length, c.skip_bad)
        eval_data = (
            read_conversations(c.eval_data, processor, c.max_length, c.skip_bad) if c.eval_data else None
        )
        self.log(f"loss tokens: {train_data.loss_rule}")
        for dataset, name in ((train_data, c.data), (eval_data, c.eval_data)):
            if dataset is not None and dataset.skipped:
                self.log(f"{name}: skipped {len(dataset.skipped)} bad lines, e.g. {dataset.skipped[0]}")
        settings = self._check_output(model_dir)

        mesh = self._mesh()
        runtime = self._runtime(mesh)
        declared = load_config(model_dir).replace(runtime=runtime)
        processor.check_model(declared.image_token_id, f"{model_dir / 'config.json'}")
        shards = self._check_batch(mesh, declared)
        self._check_memory(self._trainable(declared))
        initial_adapters = None
        if c.init_adapters:  # read and checked before anything is written
            planned = self._trainable(declared)
            initial_adapters = load_peft_adapter(c.init_adapters, declared, planned.adapted, planned.lora)
        if self.primary:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / RUN_FILE).write_text(json.dumps(settings, indent=2) + "\n")

        config, params = load_hf_checkpoint(model_dir, runtime, progress=c.progress and self.primary)
        trainable = self._trainable(config)
        tx, schedule = self._optimizer(trainable)
        abstract = abstract_state(trainable, tx)
        shardings = state_shardings(trainable, tx, abstract)
        trained, frozen = trainable.split(params)
        del params

        checkpoints = Checkpoints(self.output / "checkpoints", c.save_every, c.keep)
        restored = None
        if c.resume and checkpoints.latest_step() is not None:
            abstract_placed = abstract_with_shardings(abstract, shardings)
            restored = checkpoints.restore_latest_good(abstract_placed, self.warn)
        if restored is None:
            state = self._initial_state(trainable, trained, tx, shardings, initial_adapters)
            start, data_state = 0, None
        else:
            start, state, data_state = restored
            if start > c.steps:
                raise TrainingError(f"--steps {c.steps}: the run in {self.output} is already at step {start}")
            self.log(f"resuming from the checkpoint of step {start}")
        del trained

        rows, groups = self._row_slice(mesh, config)
        batching = {
            "row_groups": groups,
            "tile_multiple": shards // groups,
            "max_length": c.max_length,
            "max_patches": processor.image_processor.max_num_patches,
        }
        plan = BatchPlan(
            train_data.examples, c.batch_size, seed=c.seed, micro_batches=c.grad_accum, **batching
        )
        if start < c.steps:
            summary = plan.summary(range(start, c.steps))
            self.log(
                f"{len(train_data.examples)} conversations, {plan.batches_per_epoch} batches per epoch; "
                f"padding: {summary['token_padding']:.1%} of token slots, {summary['tile_padding']:.1%} of "
                f"image tiles; {len(summary['shapes'])} batch shapes (seq, tiles, patches) to compile"
            )
        evaluator = None
        if eval_data is not None:
            eval_plan = BatchPlan(eval_data.examples, c.micro_batch_size, shuffle=False, **batching)
            evaluator = Evaluator(
                BatchLoader(eval_data, eval_plan, processor, rows, c.max_length, c.data_threads),
                make_eval_step(trainable, c.loss_chunk_tokens),
                config,
                groups,
            )
        return TrainingRun(
            config=config,
            model_dir=model_dir,
            trainable=trainable,
            state=state,
            frozen=frozen,
            train_step=make_train_step(
                trainable, schedule, shardings, c.loss_chunk_tokens, skip_nonfinite=c.skip_nonfinite
            ),
            loader=BatchLoader(train_data, plan, processor, rows, c.max_length, c.data_threads),
            data_state=data_state,
            evaluator=evaluator,
            checkpoints=checkpoints,
            groups=groups,
            start=start,
        )

    def _loop(self, run: TrainingRun) -> dict[str, Any]:
        """Steps run.start .. steps-1. Step s+1 is dispatched before step s's metrics are read; a step's
        time is from the previous step's metrics being read to its own (the first includes compiling)."""
        c, config, mesh = self.config, run.config, run.config.runtime.mesh
        peak, peak_source = peak_flops(jax.devices()[0], c.peak_tflops)
        self.log(
            f"mesh {dict(mesh.shape)}, compute {config.runtime.dtypes.compute.name}; MFU peak: {peak_source}"
        )
        warmup = (
            f"linear warmup over {c.warmup} of {c.steps} steps to" if c.warmup else "from the first step at"
        )
        self.log(f"learning rate: {warmup} {c.learning_rate:g}, then cosine decay to 0 at step {c.steps}")
        keys = run.trainable.components
        # Which components need input gradients (they or anything before them train) and which train
        # their own weights (not LoRA): for the FLOP count.
        trains = {
            "vision": "vision" in keys,
            "projector": bool({"vision", "projector"} & set(keys)),
            "text": True,
        }
        full_weights = {k: run.trainable.lora is None and k in keys for k in trains}
        adapters = adapter_sizes(run.trainable.adapted, run.trainable.lora.rank) if run.trainable.lora else {}
        metrics_log = MetricsLog(self.output / METRICS_FILE)
        if self.primary:
            metrics_log.keep_until(run.start)
        tensorboard = TensorBoard(self.output / "tensorboard") if c.tensorboard and self.primary else None
        bar = tqdm(
            total=c.steps, initial=run.start, desc="training", disable=not (c.progress and self.primary)
        )
        last: dict[str, Any] = {}
        skipped: list[int] = []  # steps whose update was not applied (skip_nonfinite)
        clock = time.perf_counter()

        def write(line: dict[str, Any]) -> None:
            last.update(line)
            if self.primary:
                metrics_log.write(line)
                if tensorboard:
                    tensorboard.write(line)

        def record(
            step: int,
            metrics: dict[str, jax.Array],
            counts: dict[str, Any],
            before_write: Callable[[], Any] | None = None,
        ) -> None:
            """Reads a step's metrics (stopping the run if they are not finite), runs `before_write`,
            then logs them."""
            nonlocal clock
            values = jax.device_get(metrics)  # waits for the step
            now = time.perf_counter()
            elapsed, clock = now - clock, now
            tokens = int(counts["row_lengths"].sum()) * jax.process_count()
            flops = step_flops(config, counts, trains, full_weights, adapters)
            if "skipped" in values and bool(values["skipped"]):
                skipped.append(step)
                loss, norm = float(values["loss"]), float(values["grad_norm"])
                self.warn(
                    f"step {step}: loss {loss}, gradient norm {norm}; update skipped (--skip-nonfinite)"
                )
            elif not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
                good = run.checkpoints.latest_step()
                kept = (
                    f"the last good checkpoint (step {good}) is kept" if good else "no checkpoint was saved"
                )
                raise TrainingError(
                    f"step {step}: the loss is {float(values['loss'])} and the gradient norm "
                    f"{float(values['grad_norm'])}; the run stopped there and {kept}. Lower "
                    "--learning-rate, check the data, or pass --skip-nonfinite to skip such updates"
                )
            line = {
                "step": step,
                "loss": float(values["loss"]),
                "learning_rate": float(values["learning_rate"]),
                "grad_norm": float(values["grad_norm"]),
                "tokens": int(values["tokens"]),
                "input_tokens": tokens,
                "step_time_s": elapsed,
                "tokens_per_s": tokens / elapsed,
                "mfu": None if peak is None else flops / (elapsed * peak * jax.local_device_count()),
            }
            if c.skip_nonfinite:
                line["skipped_updates"] = len(skipped)
            if before_write is not None:
                before_write()
            write(line)
            bar.update(1)
            mfu = "n/a" if line["mfu"] is None else f"{line['mfu']:.1%}"
            bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}", mfu=mfu)

        iterator = run.loader.iterator(c.steps, run.data_state)
        pending = None
        try:
            for step in range(run.start, c.steps):
                local = next(iterator)
                data_state = iterator.get_state()
                batch = global_batch(local, mesh, config.runtime.rules, run.groups)
                run.state, metrics = run.train_step(run.state, run.frozen, batch)
                if pending is not None:
                    record(*pending)
                pending = (step + 1, metrics, batch_counts(local))
                done = step + 1 == c.steps
                eval_now = run.evaluator is not None and (
                    done or (c.eval_every and (step + 1) % c.eval_every == 0)
                )
                save_now = done or (step + 1) % c.save_every == 0
                if done or eval_now or save_now:
                    # A state is saved only once its step is known finite, and before its metrics line is
                    # written: a logged step's checkpoint, when due, has been started.
                    save = functools.partial(
                        run.checkpoints.save, step + 1, run.state, data_state, force=done
                    )
                    record(*pending, before_write=save if save_now else None)
                    pending = None
                if eval_now:
                    loss = run.evaluator(run.state.params, run.frozen)
                    write({"step": step + 1, "eval_loss": loss})
                    self.log(
                        f"step {step + 1}: eval loss {loss:.4f} (per loss token over the eval set, weights "
                        f"after update {step + 1}; a step's training loss is before its update)"
                    )
                    clock = time.perf_counter()
            run.checkpoints.wait()
        finally:
            bar.close()
            metrics_log.close()
            run.checkpoints.close()
            if tensorboard:
                tensorboard.close()
        return last

    def _initial_state(
        self, trainable: Trainable, trained: Params, tx: Any, shardings: Any, adapters: Params | None
    ) -> TrainState:
        """The state of step 0: the loaded weights, or LoRA adapters (`adapters` as given, else peft's
        initialisation)."""
        key = jax.random.PRNGKey(self.config.seed)
        if trainable.lora is None:
            # Donated: the loaded weights become the state's without a second copy.
            create = jax.jit(
                lambda p: TrainState.create(p, tx, key), out_shardings=shardings, donate_argnums=0
            )
            return create(trained)

        def create_lora(given: Params | None) -> TrainState:
            if given is None:
                given = init_adapters(trainable.adapted, trainable.lora, jax.random.fold_in(key, 1))
            return TrainState.create(given, tx, key)

        return jax.jit(create_lora, out_shardings=shardings)(adapters)

    def _export(self, run: TrainingRun, final: Path) -> None:
        """RUN_DIR/final: the trained weights (LoRA merged) as a transformers checkpoint, in float32, with
        the source checkpoint's tokenizer, processor and generation files; RUN_DIR/adapter: LoRA's
        adapters in peft's format."""
        params = jax.jit(run.trainable.merged)(run.state.params, run.frozen)
        adapters = run.state.params if run.trainable.lora else None
        if jax.process_count() > 1:
            params, adapters = multihost_utils.process_allgather((params, adapters), tiled=True)
        if self.primary:
            save_hf_checkpoint(
                final,
                run.config,
                params,
                overwrite=True,
                source_dir=run.model_dir,
                progress=self.config.progress,
                keep_other_files=self.config.keep_other_files,
            )
            self.log(f"trained model: {final}")
            if adapters is not None:
                lora, directory = run.trainable.lora, self.output / "adapter"
                save_peft_adapter(
                    directory,
                    run.config,
                    jax.device_get(adapters),
                    run.trainable.adapted,
                    lora,
                    str(run.model_dir),
                    self.config.keep_other_files,
                )
                self.log(f"LoRA adapters (peft format): {directory}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("lfm2vl train: final export")
