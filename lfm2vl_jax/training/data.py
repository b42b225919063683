"""Fine-tuning data: JSONL conversations -> token ids, loss mask and pixel inputs (through our processor),
grouped into length-bucketed batches in a seeded, deterministic order, loaded by a grain pipeline whose
worker threads decode and preprocess the images.

Three stages:

1. `read_conversations` (before training, every process, the whole file): each line is parsed and checked
   (JSON, messages, an assistant turn, image files present and readable, length); the chat template is
   rendered, each `<image>` expanded as the processor will expand it (computed from the image file's
   header, no decoding), and the text tokenised to ids and the loss mask. A bad line raises a
   `DataError` naming file and line before anything is trained, or is skipped and counted (`skip_bad`).
2. `BatchPlan`: which examples form the batch of each step, and its padded shapes (sequence length, image
   tiles, patches per tile), a pure function of (seed, step): epochs are seeded shuffles of the examples
   grouped into length buckets, so few shapes get compiled and little is padding.
3. `BatchLoader`: a grain pipeline over the plan; its worker threads run the processor on this process's
   rows (images decoded and preprocessed off the training thread) and collate them into numpy arrays.
   Its iterator state (`get_state`/`set_state`) is what a checkpoint stores.

Loss tokens, by one of two rules (`Dataset.loss_rule` says which a run used):
- `LOSS_FROM_TEMPLATE`, when the chat template marks assistant turns with `{% generation %}` blocks (the
  LFM2.5-VL templates): the tokens transformers' `return_assistant_tokens_mask` marks, i.e. every token
  overlapping a generation block (for LFM2.5-VL: the assistant's content, tool calls and thinking, its
  `<|im_end|>` and the newline after it), as TRL's `assistant_only_loss` trains on;
- `LOSS_FROM_TURNS` otherwise (the LFM2-VL templates): the tokens of each assistant message's content and
  the end-of-turn token (`<|im_end|>`, the tokenizer's eos) that closes it; nothing else (not the
  `<|im_start|>assistant\\n` header, not the newline after `<|im_end|>`, not system/user text, not image
  tokens).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import Lfm2VlError
from ..inference.batch_io import chars_per_token_bound, text_chars
from ..processing.image_processor import ProcessorError, check_regular_file
from ..processing.processor import Lfm2VlProcessor

EXIF_ORIENTATION = 0x0112
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
IMAGE_PATH_KEYS = ("image", "path", "url")
EMPTY_ROW = -1  # a batch row that holds no example (the last batch of an epoch may be short)
LOSS_FROM_TEMPLATE = "the chat template's {% generation %} blocks (transformers' assistant mask)"
LOSS_FROM_TURNS = "each assistant message's content and the end-of-turn token closing it"


class DataError(Lfm2VlError):
    """A training or eval file that cannot be used: a line's problem, named with file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation, tokenised (its images are decoded later, by the loader)."""

    source: str  # "file:line"
    text: str  # the rendered chat template, `<image>` unexpanded: what the processor is called with
    images: tuple[str, ...]  # image files, in placeholder order
    input_ids: np.ndarray  # (n,) int32: the processor's ids for `text` and `images`
    loss_mask: np.ndarray  # (n,) bool: True on loss tokens
    num_tiles: int  # image tiles (rows of pixel_values) the processor makes of the images
    max_patches: int  # valid patches of the largest tile

    @property
    def length(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    skipped: list[str]  # "file:line: problem" of each line skipped with skip_bad
    has_images: bool
    loss_rule: str  # LOSS_FROM_TEMPLATE or LOSS_FROM_TURNS


# Reading and checking ----------------------------------------------------------------------------------


def _render(processor: Lfm2VlProcessor, messages: list[dict], generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def loss_spans(processor: Lfm2VlProcessor, messages: list[dict], text: str) -> list[tuple[int, int]]:
    """Character spans of `text` (the rendered conversation) holding the loss tokens: each assistant
    message's content and the end-of-turn token closing it.

    Found by rendering prefixes of the conversation: the render up to message i with the generation prompt
    ends where the assistant's content starts; the render through message i ends after its end-of-turn
    token (and whatever separator follows it, e.g. a newline).
    """
    end_token = processor.eos_token
    if not end_token:
        raise DataError("the tokenizer names no eos_token; cannot find where assistant turns end")
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        if i == 0:
            raise DataError("the conversation starts with an assistant turn; it needs a user turn first")
        before = _render(processor, messages[:i], generation_prompt=True)
        through = _render(processor, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the chat template does not render the conversation prefix by prefix, so the assistant "
                "turns cannot be located"
            )
        end = through.rfind(end_token, len(before))
        if end < 0:
            raise DataError(f"assistant message {i} is not closed by {end_token!r} in the chat template")
        spans.append((len(before), end + len(end_token)))
    return spans


def _resolve_images(messages: Any, base: Path) -> tuple[list[dict], list[str]]:
    """The messages with every image block's file path made absolute (relative paths are relative to the
    JSONL file), and those paths in order."""
    if not isinstance(messages, list) or not messages:
        raise DataError("'messages' must be a non-empty list")
    resolved, paths = [], []
    for m, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"message {m} is a {type(message).__name__}, expected an object")
        content = message.get("content")
        if isinstance(content, list):
            blocks = []
            for b, block in enumerate(content):
                if isinstance(block, dict) and block.get("type") == "image":
                    keys = [k for k in IMAGE_PATH_KEYS if k in block]
                    if len(keys) != 1 or not isinstance(block[keys[0]], str):
                        raise DataError(
                            f"message {m}, content block {b}: an image block needs one file path under "
                            f"one of {', '.join(IMAGE_PATH_KEYS)}"
                        )
                    value = block[keys[0]].removeprefix("file://")
                    if value.startswith(("http://", "https://", "data:")):
                        raise DataError(
                            f"message {m}, content block {b}: training images must be files, "
                            f"not {value[:40]!r}"
                        )
                    path = (base / value).resolve()
                    paths.append(str(path))
                    block = {"type": "image", "path": str(path)}
                blocks.append(block)
            message = {**message, "content": blocks}
        resolved.append(message)
    return resolved, paths


def _image_size(path: str) -> tuple[int, int]:
    """(height, width) as the processor will see the image (EXIF orientation applied), from the header."""
    try:
        check_regular_file(path, f"image {path}")  # not a FIFO, device or directory (never opened)
    except ProcessorError as err:
        raise DataError(str(err)) from None
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(EXIF_ORIENTATION) in TRANSPOSED_ORIENTATIONS:
                width, height = height, width
    except FileNotFoundError:
        raise DataError(f"image {path} not found") from None
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"image {path} is not a readable image file ({err})") from None
    return height, width


def _image_layout(processor: Lfm2VlProcessor, size: tuple[int, int]) -> tuple[str, int, int]:
    """(placeholder text, tiles, valid patches of the largest tile) of an image of `size`, as the processor
    lays it out (`Lfm2VlImageProcessor.layout`, `views`), without decoding it."""
    images = processor.image_processor
    p = images.encoder_patch_size
    resized = images.smart_resize(*size)
    grid = images.grid_layout(*size)
    rows, cols = grid if grid is not None else (1, 1)
    whole = (resized[0] // p) * (resized[1] // p)
    if grid is None:
        tiles, patches = 1, whole
    else:
        thumbnail = images.use_thumbnail and rows * cols != 1
        tiles = rows * cols + thumbnail
        patches = max((images.tile_size // p) ** 2, whole if thumbnail else 0)
    placeholder = processor.image_placeholder(rows, cols, resized, processor.use_image_special_tokens)
    return placeholder, tiles, patches


def _tokenize(
    processor: Lfm2VlProcessor,
    text: str,
    spans: list[tuple[int, int]],
    layouts: list[tuple[str, int, int]],
    overlap: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Ids of `text` with each `<image>` expanded (as the processor does) and the loss mask: tokens that
    start inside a loss span, or with `overlap` (transformers' assistant-mask rule) that overlap one."""
    image_token = processor.image_token
    pieces = text.split(image_token)
    expanded, shifts, position = pieces[0], [], len(pieces[0])
    for (placeholder, _, _), piece in zip(layouts, pieces[1:], strict=True):
        shifts.append((position, len(placeholder) - len(image_token)))
        expanded += placeholder + piece
        position += len(image_token) + len(piece)

    def shifted(p: int) -> int:
        return p + sum(extra for start, extra in shifts if start < p)

    encoding = processor.tokenizer.encode(expanded, add_special_tokens=False)
    offsets = np.array(encoding.offsets, np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(starts), bool)
    for begin, end in spans:
        begin, end = shifted(begin), shifted(end)
        mask |= (starts < end) & (ends > begin) if overlap else (starts >= begin) & (starts < end)
    return np.asarray(encoding.ids, np.int32), mask


def _example(processor: Lfm2VlProcessor, record: Any, base: Path, source: str, max_length: int) -> Example:
    if not isinstance(record, dict) or "messages" not in record:
        raise DataError("each line must be a JSON object with a 'messages' list")
    chars = text_chars(record["messages"])
    if chars > max_length * chars_per_token_bound(processor.tokenizer):  # refused before tokenizing
        raise DataError(f"{chars} characters of text, more than --max-length {max_length} tokens can cover")
    messages, paths = _resolve_images(record["messages"], base)
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise DataError("no assistant turn (nothing to learn from)")
    markers = processor.has_generation_markers
    try:
        if markers:  # the loss tokens are the template's generation blocks
            text, spans = processor.generation_spans(messages)
        else:
            text, spans = _render(processor, messages), None
    except Lfm2VlError as err:
        raise DataError(str(err)) from None
    if text.count(processor.image_token) != len(paths):
        raise DataError(
            f"{text.count(processor.image_token)} {processor.image_token} placeholders in the rendered text "
            f"but {len(paths)} images"
        )
    layouts = [_image_layout(processor, _image_size(path)) for path in paths]
    if spans is None:
        spans = loss_spans(processor, messages, text)
    input_ids, loss_mask = _tokenize(processor, text, spans, layouts, overlap=markers)
    if len(input_ids) > max_length:
        raise DataError(f"{len(input_ids)} tokens long, over --max-length {max_length}")
    if not loss_mask[1:].any():
        raise DataError("no loss tokens (the assistant turns are empty)")
    return Example(
        source=source,
        text=text,
        images=tuple(paths),
        input_ids=input_ids,
        loss_mask=loss_mask,
        num_tiles=sum(tiles for _, tiles, _ in layouts),
        max_patches=max((patches for _, _, patches in layouts), default=0),
    )


def read_conversations(
    path: str | Path, processor: Lfm2VlProcessor, max_length: int, skip_bad: bool = False
) -> Dataset:
    """Every conversation of a JSONL file, checked and tokenised (see the module docstring). Blank lines
    are ignored. A bad line raises `DataError` ("file:line: problem"), or with `skip_bad` is left out and
    listed in `Dataset.skipped`."""
    path = Path(path)
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise DataError(f"data file {path} not found") from None
    examples, skipped = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        source = f"{path}:{number}"
        try:
            try:
                record = json.loads(line.decode("utf-8").removeprefix("\ufeff"))
            except UnicodeDecodeError as err:
                raise DataError(f"not UTF-8 text ({err})") from None
            except json.JSONDecodeError as err:
                raise DataError(f"not valid JSON ({err})") from None
            except RecursionError:
                raise DataError("JSON nested too deeply") from None
            examples.append(_example(processor, record, path.parent, source, max_length))
        except DataError as err:
            if not skip_bad:
                raise DataError(f"{source}: {err} (pass --skip-bad to leave such lines out)") from None
            skipped.append(f"{source}: {err}")
    if not examples:
        raise DataError(f"{path} holds no usable conversation ({len(skipped)} lines skipped)")
    rule = LOSS_FROM_TEMPLATE if processor.has_generation_markers else LOSS_FROM_TURNS
    return Dataset(examples, skipped, has_images=any(e.images for e in examples), loss_rule=rule)


# The batch plan ----------------------------------------------------------------------------------------


def bucket_sizes(limit: int, smallest: int) -> list[int]:
    """Padded sizes up to `limit`: smallest * 2^k and 1.5 * smallest * 2^k (at most a third of padding),
    then `limit` itself."""
    sizes, size = set(), smallest
    while size < limit:
        sizes.update((size, size * 3 // 2))
        size *= 2
    return sorted(s for s in sizes if s < limit) + [limit]


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _bucket(value: int, sizes: Sequence[int]) -> int:
    return next(s for s in sizes if s >= value)


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The examples of one step and their padded shapes. `rows` (K, Bm): example indices (`EMPTY_ROW`
    for none) of each of K micro-batches of Bm rows; every micro-batch is padded to `seq_len` tokens,
    `tiles` image tiles per row group (see `BatchPlan`) and `patches` patch slots per tile."""

    rows: np.ndarray
    seq_len: int
    tiles: int
    patches: int

    @property
    def shape_key(self) -> tuple[int, int, int]:
        return self.seq_len, self.tiles, self.patches


class BatchPlan:
    """Which examples each step trains on, in a seeded, deterministic order.

    An epoch is a permutation of the examples (seeded by (seed, epoch)), grouped by length bucket into
    batches of `batch_size` (leftovers of all buckets pooled, in bucket order, into the last batches,
    the very last padded with empty rows), the batches then shuffled. Step s is batch s % n of epoch
    s // n: a pure function of (seed, step), so every process computes the same plan and a resumed run
    the same batches. Without `shuffle` (evaluation) the order is by length, one epoch.

    A step's batch is `micro_batches` micro-batches; each micro-batch's rows are split into `row_groups`
    equal groups (one per process slice of the batch), whose image tiles are laid out one group after
    the other, each padded to the same `tiles` (a multiple of `tile_multiple`, the batch shards per
    group) so that the tile axis shards like the rows.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle: bool = True,
        micro_batches: int = 1,
        row_groups: int = 1,
        tile_multiple: int = 1,
        max_length: int,
        max_patches: int = 1,
    ):
        self.lengths = np.array([e.length for e in examples], np.int64)
        self.tiles = np.array([e.num_tiles for e in examples], np.int64)
        self.patches = np.array([e.max_patches for e in examples], np.int64)
        self.batch_size, self.micro_batches, self.row_groups = batch_size, micro_batches, row_groups
        self.tile_multiple, self.seed, self.shuffle = tile_multiple, seed, shuffle
        self.seq_sizes = bucket_sizes(max_length, min(64, max_length))
        self.tile_sizes = bucket_sizes(max(int(self.tiles.max(initial=0)) * batch_size, 1), 1)
        # Patch slots per tile: a quarter, half or all of the processor's maximum.
        self.patch_sizes = sorted({max(max_patches >> k, 1) for k in (2, 1, 0)})
        self.buckets = np.array([_bucket(n, self.seq_sizes) for n in self.lengths])
        self._epoch: tuple[int, list[np.ndarray]] | None = None
        self.batches_per_epoch = len(self._epoch_batches(0))

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        if self._epoch is not None and self._epoch[0] == epoch:
            return self._epoch[1]
        n, size = len(self.lengths), self.batch_size
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
        else:
            order = np.argsort(self.lengths, kind="stable")
        batches, leftovers = [], []
        for bucket in np.unique(self.buckets):
            members = order[self.buckets[order] == bucket]
            full = len(members) // size * size
            batches += [members[i : i + size] for i in range(0, full, size)]
            leftovers.append(members[full:])
        pooled = np.concatenate(leftovers)
        for i in range(0, len(pooled), size):
            chunk = pooled[i : i + size]
            batches.append(np.concatenate([chunk, np.full(size - len(chunk), EMPTY_ROW)]))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch = (epoch, batches)
        return batches

    def step(self, step: int) -> StepBatch:
        """The batch of `step` (0-based: the batch of the step-th update)."""
        epoch, index = divmod(step, self.batches_per_epoch)
        rows = self._epoch_batches(epoch)[index].reshape(self.micro_batches, -1)
        real = rows[rows != EMPTY_ROW]
        seq_len = _bucket(int(self.lengths[real].max()), self.seq_sizes)
        grouped = rows.reshape(self.micro_batches, self.row_groups, -1)
        tiles_per_group = np.where(grouped == EMPTY_ROW, 0, self.tiles[grouped]).sum(axis=2)
        tiles = _round_up(_bucket(max(int(tiles_per_group.max()), 1), self.tile_sizes), self.tile_multiple)
        patches = _bucket(max(int(self.patches[real].max()), 1), self.patch_sizes)
        return StepBatch(rows, seq_len, tiles, patches)

    def summary(self, steps: range) -> dict[str, Any]:
        """Padding and shapes over `steps`: the share of token slots that are padding, likewise for image
        tiles, and the distinct padded shapes (each compiles the step once)."""
        tokens = slots = tiles = tile_slots = 0
        shapes = set()
        for s in steps:
            batch = self.step(s)
            real = batch.rows[batch.rows != EMPTY_ROW]
            tokens += int(self.lengths[real].sum())
            slots += batch.rows.size * batch.seq_len
            tiles += int(self.tiles[real].sum())
            tile_slots += batch.tiles * self.row_groups * self.micro_batches
            shapes.add(batch.shape_key)
        return {
            "token_padding": 1 - tokens / max(slots, 1),
            "tile_padding": 1 - tiles / max(tile_slots, 1) if tiles else 0.0,
            "shapes": sorted(shapes),
        }


# Loading -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowSlice:
    """This process's part of each micro-batch: rows [start, start + count) (row group start // count)."""

    start: int
    count: int

    @property
    def group(self) -> int:
        return self.start // self.count


class BatchLoader:
    """Process-local batches of a `BatchPlan`, as numpy arrays with a leading micro-batch axis:
    input_ids, attention_mask (K, rows, S) int32, loss_mask (K, rows, S) bool and, when the data has
    images, pixel_values (K, tiles, patches, C) float32, pixel_attention_mask (K, tiles, patches) int32,
    spatial_shapes (K, tiles, 2) int32.

    A grain pipeline: `MapDataset.range` over (step, row) positions, mapped in `num_threads` worker
    threads through the processor (image decoding and preprocessing happen there), batched per step.
    Empty rows hold one pad token (attended, no loss) so that no row is wholly masked; padding tiles have
    a 1x1 patch grid, which yields no image token, so they never shift the real tiles' tokens.
    """

    def __init__(
        self,
        dataset: Dataset,
        plan: BatchPlan,
        processor: Lfm2VlProcessor,
        rows: RowSlice,
        max_length: int,
        num_threads: int = 4,
        prefetch: int = 2,
    ):
        self.dataset, self.plan, self.processor, self.rows = dataset, plan, processor, rows
        self.max_length = max_length
        self.per_step = plan.micro_batches * rows.count
        self.read_options = grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=max(num_threads, prefetch * self.per_step)
        )
        image_processor = processor.image_processor
        self.patch_dim = 3 * image_processor.encoder_patch_size**2

    def _load(self, position: int) -> dict[str, Any]:
        step, within = divmod(position, self.per_step)
        micro, row = divmod(within, self.rows.count)
        index = int(self.plan.step(step).rows[micro, self.rows.start + row])
        if index == EMPTY_ROW:
            return {"step": step}
        example = self.dataset.examples[index]
        try:
            out = self.processor(
                images=[list(example.images)] if example.images else None,
                text=[example.text],
                max_length=self.max_length,
            )
        except Lfm2VlError as err:
            raise DataError(f"{example.source}: {err}") from None
        if not np.array_equal(out["input_ids"][0], example.input_ids):
            raise DataError(
                f"{example.source}: the processor's tokens differ from those indexed before training "
                "(did an image file change?)"
            )
        return {"step": step, "example": example, **out}

    def _collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
        (step,) = {row["step"] for row in rows}
        batch = self.plan.step(step)
        k, n, s = self.plan.micro_batches, self.rows.count, batch.seq_len
        out = {
            "input_ids": np.full((k, n, s), self.processor.pad_token_id, np.int32),
            "attention_mask": np.zeros((k, n, s), np.int32),
            "loss_mask": np.zeros((k, n, s), bool),
        }
        out["attention_mask"][:, :, 0] = 1  # empty rows: one attended pad token
        if self.dataset.has_images:
            t, p = batch.tiles, batch.patches
            out["pixel_values"] = np.zeros((k, t, p, self.patch_dim), np.float32)
            out["pixel_attention_mask"] = np.zeros((k, t, p), np.int32)
            out["pixel_attention_mask"][:, :, 0] = 1
            out["spatial_shapes"] = np.ones((k, t, 2), np.int32)
        tile = np.zeros(k, int)
        for i, row in enumerate(rows):
            if "example" not in row:
                continue
            micro, r = divmod(i, n)
            example = row["example"]
            length = example.length
            out["input_ids"][micro, r, :length] = example.input_ids
            out["attention_mask"][micro, r, :length] = 1
            out["loss_mask"][micro, r, :length] = example.loss_mask
            if example.images:
                count = example.num_tiles
                span = slice(tile[micro], tile[micro] + count)
                out["pixel_values"][micro, span] = row["pixel_values"][:, : batch.patches]
                out["pixel_attention_mask"][micro, span] = row["pixel_attention_mask"][:, : batch.patches]
                out["spatial_shapes"][micro, span] = row["spatial_shapes"]
                tile[micro] += count
        return out

    def iterator(self, total_steps: int, state: dict[str, Any] | None = None) -> Any:
        """A grain iterator over the batches of steps 0 .. total_steps-1 (from `state`, a saved
        `get_state()`, when resuming)."""
        dataset = (
            grain.MapDataset.range(total_steps * self.per_step)
            .map(self._load)
            .to_iter_dataset(self.read_options)
            .batch(self.per_step, batch_fn=self._collate)
        )
        iterator = iter(dataset)
        if state is not None:
            iterator.set_state(state)
        return iterator
