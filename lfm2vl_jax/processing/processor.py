"""LFM2-VL processor: chat template, image placeholder expansion, tokenisation, padding and decoding.

A port of transformers' `Lfm2VlProcessor` (5.x) on `tokenizers` + jinja2 + our numpy image processor.
Each `<image>` in the text becomes, for an image split into R x C tiles:

    <|image_start|> <|img_row_1_col_1|> <image>*T ... <|img_row_R_col_C|> <image>*T
    [<|img_thumbnail|> <image>*N] <|image_end|>

(T tokens per tile, N for the thumbnail, which only appears with `use_thumbnail`), and for an image kept
whole: `<|image_start|> <image>*N <|image_end|>`. Without `use_image_special_tokens` only the `<image>`
runs remain. The expanded text is tokenised in one piece, with no added BOS (the chat template writes it).
"""

from __future__ import annotations

import base64
import bisect
import io
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from tokenizers import Tokenizer, models

from ..checkpoint.hub import PROCESSOR_FILES, resolve_checkpoint_dir
from ..config import read_json_object
from .chat_template import ChatTemplate, check_tools_and_documents, template_data
from .image_processor import (
    ImageInput,
    Lfm2VlImageProcessor,
    ProcessorError,
    load_image,
    read_image_processor_config,
)

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order
_NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# "tokenizer_config.json model_max_length" this large means "no limit" (transformers' VERY_LARGE_INTEGER)
_UNLIMITED_LENGTH = int(1e20)
_IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")
# `__call__`'s options that `apply_chat_template` passes on from its keywords
_CALL_OPTIONS = ("images", "images_kwargs", "input_data_format", "add_special_tokens")


def _token_content(value: Any) -> str | None:
    """A special token as configs store it: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json_object(path, ProcessorError)


def _boolean(value: Any, where: str) -> bool:
    """A setting typed as a boolean: only true or false is taken (a string such as "no" would otherwise
    read as true); `where` names the setting (and its file)."""
    if not isinstance(value, (bool, np.bool_)):
        raise ProcessorError(f"{where} must be true or false, got {value!r}")
    return bool(value)


def _read_chat_template(directory: Path, tokenizer_config: Mapping[str, Any]) -> tuple[str | None, str]:
    """(template, the file it came from): chat_template.jinja, else chat_template.json, else the template
    inside tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8"), str(jinja)
        except UnicodeDecodeError as error:
            raise ProcessorError(f"{jinja} is not UTF-8 text: {error}") from None
    template_json = _read_json(directory / "chat_template.json")
    source = directory / ("chat_template.json" if template_json else "tokenizer_config.json")
    template = template_json.get("chat_template") if template_json else tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        if not all(isinstance(entry, Mapping) and {"name", "template"} <= entry.keys() for entry in template):
            raise ProcessorError(f"{source}: chat_template must be a string or a list of {{name, template}}")
        named = {entry["name"]: entry["template"] for entry in template}
        if "default" not in named:
            raise ProcessorError(
                f"{directory}: several chat templates ({', '.join(map(str, named))}) and none is 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ProcessorError(f"{source}: the chat template must be a string, got {template!r:.60}")
    return template, str(source)


def _id_list(row: Any, vocab_size: int) -> list[int]:
    ids = np.asarray(row)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ProcessorError(f"token ids must be integers, got {row!r:.80}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ProcessorError(
            f"token ids must lie in [0, {vocab_size}) (the tokenizer's vocabulary), "
            f"got {ids.min()}..{ids.max()}"
        )
    return ids.astype(np.int64).tolist()


def _token_id_lists(token_ids: Any, vocab_size: int) -> list[list[int]]:
    """(B, n) or (n,) ids as numpy/jax arrays or (possibly ragged) lists -> list of id lists."""
    try:
        if np.ndim(token_ids) == 0:
            return [_id_list([token_ids], vocab_size)]
        rows = list(token_ids)
        if rows and np.ndim(rows[0]) > 0:
            return [_id_list(row, vocab_size) for row in rows]
        return [_id_list(rows, vocab_size)]
    except ProcessorError:
        raise
    except (TypeError, ValueError) as error:  # not a sequence, or a ragged one numpy cannot hold
        raise ProcessorError(f"cannot read {token_ids!r:.80} as token ids: {error}") from None


class Lfm2VlProcessor:
    """Conversations / text + images -> `input_ids`, `attention_mask`, `pixel_values`,
    `pixel_attention_mask`, `spatial_shapes` (numpy), as transformers' `Lfm2VlProcessor` produces them."""

    def __init__(
        self,
        image_processor: Lfm2VlImageProcessor,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        chat_template_origin: str = "the processor's chat_template",
        tokenizer_config: Mapping[str, Any] | None = None,
        special_tokens_map: Mapping[str, Any] | None = None,
        processor_config: Mapping[str, Any] | None = None,
        preprocessor_config: Mapping[str, Any] | None = None,
        use_image_special_tokens: bool | None = None,
        padding_side: str | None = None,
        max_length: int | None = None,
    ) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.tokenizer_config = dict(tokenizer_config or {})
        self.special_tokens_map = dict(special_tokens_map) if special_tokens_map is not None else None
        self.processor_config = dict(processor_config or {})
        self.preprocessor_config = dict(preprocessor_config) if preprocessor_config is not None else None

        # special tokens: tokenizer_config.json wins over special_tokens_map.json, as in transformers
        config = {**(self.special_tokens_map or {}), **self.tokenizer_config}
        self.special_tokens = {
            name: _token_content(config[name])
            for name in _NAMED_SPECIAL_TOKENS
            if config.get(name) is not None
        }
        extra = config.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            self.special_tokens.update({name: _token_content(token) for name, token in extra.items()})
        self.image_token = _token_content(config.get("image_token")) or "<image>"
        self.image_start_token = _token_content(config.get("image_start_token")) or "<|image_start|>"
        self.image_end_token = _token_content(config.get("image_end_token")) or "<|image_end|>"
        self.image_thumbnail_token = (
            _token_content(config.get("image_thumbnail_token") or config.get("image_thumbnail"))
            or "<|img_thumbnail|>"
        )
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.pad_token = self.special_tokens.get("pad_token")
        self.bos_token_id = self._token_id(self.bos_token, "bos_token") if self.bos_token else None
        self.eos_token_id = self._token_id(self.eos_token, "eos_token") if self.eos_token else None
        if self.pad_token is None:
            raise ProcessorError("tokenizer config names no pad_token; it is needed to pad batches")
        self.pad_token_id = self._token_id(self.pad_token, "pad_token")
        self.image_token_id = self._token_id(self.image_token, "image_token")

        if use_image_special_tokens is None:
            self.use_image_special_tokens = _boolean(
                self.processor_config.get("use_image_special_tokens", True),
                "processor_config.json: use_image_special_tokens",
            )
        else:
            self.use_image_special_tokens = _boolean(use_image_special_tokens, "use_image_special_tokens")
        self.padding_side = padding_side or self.tokenizer_config.get("padding_side", "right")
        self.truncation_side = self.tokenizer_config.get("truncation_side", "right")
        for name, side in (("padding_side", self.padding_side), ("truncation_side", self.truncation_side)):
            if side not in ("left", "right"):
                raise ProcessorError(f"{name} must be 'left' or 'right', got {side!r}")
        model_max_length = self.tokenizer_config.get("model_max_length")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, (int, float, type(None))):
            raise ProcessorError(
                f"tokenizer_config.json: model_max_length must be a number, got {model_max_length!r:.60}"
            )
        if max_length is None and model_max_length is not None and model_max_length < _UNLIMITED_LENGTH:
            max_length = int(model_max_length)
        self.max_length = max_length
        # transformers skips this clean-up for BPE models (it would corrupt their output)
        self.clean_up_tokenization_spaces = _boolean(
            self.tokenizer_config.get("clean_up_tokenization_spaces", False),
            "tokenizer_config.json: clean_up_tokenization_spaces",
        ) and not isinstance(tokenizer.model, models.BPE)
        self._compiled_template = ChatTemplate(chat_template, chat_template_origin) if chat_template else None

    def _token_id(self, token: str, name: str) -> int:
        if not isinstance(token, str):
            raise ProcessorError(f"tokenizer_config.json: {name} must be a token string, got {token!r:.60}")
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ProcessorError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def check_model(self, image_token_id: int, source: str = "the model's config.json") -> None:
        """Refuses a model whose image token is not this tokenizer's `<image>`: its image features would
        replace the wrong tokens (or none)."""
        if image_token_id != self.image_token_id:
            raise ProcessorError(
                f"the tokenizer's {self.image_token} is id {self.image_token_id} but {source} says "
                f"image_token_id {image_token_id}: the processor and the model do not belong together"
            )

    # -- files -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Lfm2VlProcessor:
        """Load from a checkpoint directory, or a hub id fetched with huggingface_hub (offline or unknown ids
        raise `hub.CheckpointNotFoundError` saying to pass a local directory).

        `overrides` may set image-processor settings (e.g. `use_thumbnail=True`) and
        `use_image_special_tokens`, `padding_side`, `max_length`."""
        directory = resolve_checkpoint_dir(path, PROCESSOR_FILES)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ProcessorError(f"{directory} has no tokenizer.json")
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # tokenizers raises a bare Exception on malformed files
            raise ProcessorError(f"{tokenizer_file} could not be loaded: {error}") from error
        tokenizer_config = _read_json(directory / "tokenizer_config.json") or {}
        processor_keys = {"use_image_special_tokens", "padding_side", "max_length"}
        unknown = set(overrides) - processor_keys - set(Lfm2VlImageProcessor.config_keys)
        if unknown:
            raise ProcessorError(f"unknown processor settings: {', '.join(sorted(unknown))}")
        image_overrides = {k: v for k, v in overrides.items() if k not in processor_keys}
        chat_template, chat_template_origin = _read_chat_template(directory, tokenizer_config)
        image_settings = read_image_processor_config(directory)
        try:
            image_processor = Lfm2VlImageProcessor.from_dict(image_settings, **image_overrides)
        except ProcessorError as error:  # name the files the settings came from
            raise ProcessorError(
                f"{directory} (preprocessor_config.json, processor_config.json): {error}"
            ) from None
        return cls(
            image_processor,
            tokenizer,
            chat_template=chat_template,
            chat_template_origin=chat_template_origin,
            tokenizer_config=tokenizer_config,
            special_tokens_map=_read_json(directory / "special_tokens_map.json"),
            processor_config=_read_json(directory / "processor_config.json"),
            preprocessor_config=_read_json(directory / "preprocessor_config.json"),
            **{k: v for k, v in overrides.items() if k in processor_keys},
        )

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json (if loaded with one),
        chat_template.jinja, processor_config.json and preprocessor_config.json (if loaded with one), with the
        effective settings, so that `from_pretrained(out_dir)` rebuilds this processor."""
        directory = Path(out_dir)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        image_settings = self.image_processor.to_dict()
        files: dict[str, Mapping[str, Any] | None] = {
            "tokenizer_config.json": self.tokenizer_config,
            "special_tokens_map.json": self.special_tokens_map,
            "processor_config.json": {
                **self.processor_config,
                **image_settings,
                "use_image_special_tokens": self.use_image_special_tokens,
            },
            "preprocessor_config.json": (
                {**self.preprocessor_config, **image_settings}
                if self.preprocessor_config is not None
                else None
            ),
        }
        for name, content in files.items():
            if content is not None:
                (directory / name).write_text(
                    json.dumps(content, indent=2, ensure_ascii=False) + "\n", "utf-8"
                )
        if self.chat_template:
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        return directory

    # -- images -> placeholder text --------------------------------------------------------------------

    def image_placeholder(
        self,
        rows: int,
        cols: int,
        image_size: Sequence[int],
        use_special: bool,
        image_processor: Lfm2VlImageProcessor | None = None,
    ) -> str:
        """The text one `<image>` expands to, for an image split into rows x cols (1 x 1: kept whole), as
        `image_processor` (default: this processor's) lays it out."""
        image_processor = image_processor or self.image_processor
        per_tile, whole = image_processor.image_num_tokens(tuple(image_size))
        parts = [self.image_start_token] if use_special else []
        if rows > 1 or cols > 1:
            for row in range(1, rows + 1):
                for col in range(1, cols + 1):
                    if use_special:
                        parts.append(f"<|img_row_{row}_col_{col}|>")
                    parts.append(self.image_token * per_tile)
            if image_processor.use_thumbnail:
                if use_special:
                    parts.append(self.image_thumbnail_token)
                parts.append(self.image_token * whole)
        else:
            parts.append(self.image_token * whole)
        if use_special:
            parts.append(self.image_end_token)
        return "".join(parts)

    @staticmethod
    def _nest_images(images: Any, num_texts: int) -> list[list[Any]]:
        """None / one image / a list for one text / a list of lists (one per text) -> list of lists."""
        if images is None:
            return [[] for _ in range(num_texts)]
        if not isinstance(images, (list, tuple)):
            images = [images]
        if images and all(isinstance(group, (list, tuple)) for group in images):
            if len(images) != num_texts:
                raise ProcessorError(
                    f"got {len(images)} image lists for {num_texts} texts; pass one list per text"
                )
            return [list(group) for group in images]
        if num_texts != 1:
            raise ProcessorError(
                f"got a flat list of {len(images)} images for {num_texts} texts; "
                "pass one list of images per text"
            )
        return [list(images)]

    # -- main entry points -----------------------------------------------------------------------------

    def __call__(
        self,
        images: ImageInput | Sequence[ImageInput] | Sequence[Sequence[ImageInput]] | None = None,
        text: str | Sequence[str] | None = None,
        *,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool = False,
        use_image_special_tokens: bool | None = None,
        add_special_tokens: bool = False,
        return_tensors: str | None = None,
        return_offsets_mapping: bool = False,
        return_text_replacement_offsets: bool = False,
        images_kwargs: Mapping[str, Any] | None = None,
        input_data_format: str | None = None,
        **image_options: Any,
    ) -> dict[str, Any]:
        """Expand each `<image>` of `text` for the matching image and tokenise.

        `images`: one image, a list for a single text, or one list per text (images in placeholder order):
        PIL images, file paths, arrays (H, W), (H, W, C) or (C, H, W) (the channel axis inferred as
        transformers infers it, or `input_data_format="channels_first"|"channels_last"`), torch tensors,
        jax arrays or anything else `np.asarray` reads.
        Image settings for this call only, as keywords or in `images_kwargs` (transformers' two ways):
        `do_image_splitting`, `min_image_tokens`, `max_image_tokens`, `use_thumbnail`, `min_tiles`,
        `max_tiles`, ... (`Lfm2VlImageProcessor.config_keys`), validated as the checkpoint's are.
        `padding`: True / "longest" (pad to the longest text) or "max_length". A text longer than
        `max_length` (argument, else the processor's) is an error unless `truncation=True`.
        Returns numpy arrays: input_ids and attention_mask (B, S) int64, and when there are images
        pixel_values (tiles, max_num_patches, 3*p*p) float32, pixel_attention_mask (tiles, max_num_patches)
        int32 and spatial_shapes (tiles, 2) int64; as transformers on request, `offset_mapping` (B, S, 2)
        (each token's characters in the expanded text, (0, 0) for padding) and `text_replacement_offsets`
        (per text, each `<image>`'s `span` in the text and `new_span` in the expanded text)."""
        if text is None:
            raise ProcessorError("text is required (an image is placed where its <image> placeholder is)")
        if return_tensors not in (None, "np"):
            raise ProcessorError(f"return_tensors={return_tensors!r}: this processor returns numpy arrays")
        image_processor = self.image_processor.with_options({**(images_kwargs or {}), **image_options})
        if not isinstance(text, (str, list, tuple)):
            raise ProcessorError(f"text must be a string or a list of strings, got {type(text).__name__}")
        texts = [text] if isinstance(text, str) else list(text)
        for index, sample in enumerate(texts):
            if not isinstance(sample, str):
                raise ProcessorError(f"text {index} is a {type(sample).__name__}, expected str")
            try:
                sample.encode("utf-8")
            except UnicodeEncodeError as error:  # what the tokenizer cannot take
                raise ProcessorError(
                    f"text {index} holds a lone surrogate {sample[error.start]!r} at character "
                    f"{error.start}: not valid Unicode text"
                ) from None
        if padding not in (True, "longest", "max_length"):
            raise ProcessorError(f"padding must be True, 'longest' or 'max_length', got {padding!r}")
        padding_side = padding_side or self.padding_side
        if padding_side not in ("left", "right"):
            raise ProcessorError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        max_length = max_length if max_length is not None else self.max_length
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1
        ):
            raise ProcessorError(f"max_length must be a positive integer, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ProcessorError("padding='max_length' needs a max_length")
        use_special = self.use_image_special_tokens
        if use_image_special_tokens is not None:
            use_special = _boolean(use_image_special_tokens, "use_image_special_tokens")
        _boolean(truncation, "truncation")  # "no" would truncate

        nested = self._nest_images(images, len(texts))
        for index, (sample, sample_images) in enumerate(zip(texts, nested, strict=True)):
            placeholders = sample.count(self.image_token)
            if placeholders != len(sample_images):
                raise ProcessorError(
                    f"text {index} has {placeholders} {self.image_token} placeholder(s) but "
                    f"{len(sample_images)} image(s) were given for it"
                )
        label = "image {k}" if len(texts) == 1 else "text {t} image {k}"
        labels = [label.format(t=t, k=k) for t, group in enumerate(nested) for k in range(len(group))]
        flat_images = [image for group in nested for image in group]
        loaded = [
            load_image(image, name, input_data_format)
            for image, name in zip(flat_images, labels, strict=True)
        ]
        outputs: dict[str, Any] = {}
        replacements: list[str] = []
        if loaded:
            image_outputs = image_processor.preprocess(loaded, labels)
            replacements = [
                self.image_placeholder(rows, cols, size, use_special, image_processor)
                for rows, cols, size in zip(
                    image_outputs["image_rows"],
                    image_outputs["image_cols"],
                    image_outputs["image_sizes"],
                    strict=True,
                )
            ]
            outputs = {
                key: image_outputs[key] for key in ("pixel_values", "pixel_attention_mask", "spatial_shapes")
            }
        expanded, replacement_offsets = self._expand_placeholders(texts, replacements)

        if return_offsets_mapping:  # the slower call that also computes offsets
            encodings = self.tokenizer.encode_batch(expanded, add_special_tokens=add_special_tokens)
        else:
            encodings = self.tokenizer.encode_batch_fast(expanded, add_special_tokens=add_special_tokens)
        ids = [encoding.ids for encoding in encodings]
        kept = self._limit_length([len(row) for row in ids], max_length, truncation)
        ids = [row[span] for row, span in zip(ids, kept, strict=True)]
        for index, (row, sample) in enumerate(zip(ids, expanded, strict=True)):
            if row.count(self.image_token_id) != sample.count(self.image_token):
                raise ProcessorError(
                    f"text {index}: truncating to max_length={max_length} would cut image tokens; "
                    "raise max_length"
                )
        input_ids, attention_mask = self._pad(ids, padding, max_length, padding_side)
        outputs = {"input_ids": input_ids, "attention_mask": attention_mask, **outputs}
        if return_offsets_mapping:
            offsets = [
                np.asarray(encoding.offsets, np.int64).reshape(-1, 2)[span]
                for encoding, span in zip(encodings, kept, strict=True)
            ]
            outputs["offset_mapping"] = self._pad_rows(offsets, input_ids.shape[1], padding_side, (2,))
        if return_text_replacement_offsets:
            outputs["text_replacement_offsets"] = replacement_offsets
        return outputs

    def _expand_placeholders(
        self, texts: list[str], replacements: list[str]
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Each `<image>` of `texts` replaced by the next of `replacements`; and per text, as transformers'
        `text_replacement_offsets`, each placeholder's `span` in the text and `new_span` in the result."""
        queue = iter(replacements)
        expanded, offsets = [], []
        for sample in texts:
            pieces = sample.split(self.image_token)
            out, spans, position = pieces[0], [], len(pieces[0])
            for piece in pieces[1:]:
                replacement = next(queue)
                spans.append(
                    {
                        "type": "image",
                        "span": (position, position + len(self.image_token)),
                        "new_span": (len(out), len(out) + len(replacement)),
                    }
                )
                out += replacement + piece
                position += len(self.image_token) + len(piece)
            expanded.append(out)
            offsets.append(spans)
        return expanded, offsets

    def _limit_length(self, lengths: list[int], max_length: int | None, truncation: bool) -> list[slice]:
        """The part of each tokenised text kept: all of it, or (with `truncation`) `max_length` tokens from
        the truncation side; refuses a text over `max_length` without truncation."""
        kept = []
        for index, length in enumerate(lengths):
            span = slice(0, length)
            if max_length is not None and length > max_length:
                if not truncation:
                    raise ProcessorError(
                        f"text {index} is {length} tokens long, over max_length={max_length}; "
                        "shorten it, raise max_length or pass truncation=True"
                    )
                right = self.truncation_side == "right"
                span = slice(0, max_length) if right else slice(length - max_length, length)
            kept.append(span)
        return kept

    def _pad(
        self, ids: list[list[int]], padding: bool | str, max_length: int | None, side: str
    ) -> tuple[np.ndarray, np.ndarray]:
        length = max((len(sequence) for sequence in ids), default=0)
        if padding == "max_length":
            length = max_length
        input_ids = self._pad_rows(ids, length, side, fill=self.pad_token_id)
        attention_mask = self._pad_rows([np.ones(len(sequence)) for sequence in ids], length, side)
        return input_ids, attention_mask

    @staticmethod
    def _pad_rows(
        rows: Sequence[Sequence[Any]], length: int, side: str, trailing: tuple[int, ...] = (), fill: int = 0
    ) -> np.ndarray:
        """(B, length, *trailing) int64 array of `rows`, each placed on the right or left `side` (padding
        side) and the rest `fill`."""
        out = np.full((len(rows), length, *trailing), fill, dtype=np.int64)
        for index, row in enumerate(rows):
            span = slice(0, len(row)) if side == "right" else slice(length - len(row), length)
            if len(row):
                out[index, span] = row
        return out

    # -- chat ------------------------------------------------------------------------------------------

    def _normalize_conversation(
        self, conversation: Any, index: int, need_sources: bool, tokenize: bool
    ) -> tuple[list[dict[str, Any]], list[tuple[Any, str]]]:
        """Validated copy of one conversation (None-valued keys dropped, OpenAI image_url blocks made image
        blocks) and its (image source, where) pairs in order of appearance. Without `need_sources` (the
        prompt is only rendered) image blocks are placeholders: their sources are neither needed nor read."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ProcessorError(f"conversation {index} must be a non-empty list of messages")
        messages, images = [], []
        for m, message in enumerate(conversation):
            where = f"conversation {index}, message {m}"
            if not isinstance(message, Mapping):
                raise ProcessorError(f"{where} is a {type(message).__name__}, expected a dict")
            message = {key: value for key, value in message.items() if value is not None}
            if "role" not in message:
                raise ProcessorError(f"{where} has no 'role'")
            if not isinstance(message["role"], str):
                raise ProcessorError(f"{where}: 'role' must be a string, got {message['role']!r:.40}")
            content = message.get("content")
            if isinstance(content, (list, tuple)):
                blocks = []
                for b, block in enumerate(content):
                    block_where = f"{where}, content block {b}"
                    if not isinstance(block, Mapping) or "type" not in block:
                        raise ProcessorError(f"{block_where} must be a dict with a 'type'")
                    if block["type"] == "image_url" and "image_url" in block:
                        url = block["image_url"]
                        block = {
                            "type": "image",
                            "url": url.get("url", "") if isinstance(url, Mapping) else url,
                        }
                    if block["type"] == "image" and need_sources:
                        sources = [key for key in _IMAGE_SOURCE_KEYS if key in block]
                        if len(sources) != 1:
                            raise ProcessorError(
                                f"{block_where}: an image block needs exactly one of "
                                f"{', '.join(_IMAGE_SOURCE_KEYS)}, found {sources or 'none'}"
                            )
                        images.append(
                            (self._image_source(block[sources[0]], sources[0], block_where), block_where)
                        )
                    elif block["type"] == "image":
                        pass  # rendered as the template renders an image; its source is not read
                    elif block["type"] == "text":
                        if not isinstance(block.get("text"), str):
                            raise ProcessorError(f"{block_where}: a text block needs a 'text' string")
                    else:
                        raise ProcessorError(
                            f"{block_where}: unknown content type {block['type']!r}; "
                            "supported: 'text', 'image', 'image_url'"
                        )
                    blocks.append(dict(block))
                message["content"] = blocks
            elif content is not None and not isinstance(content, str):
                raise ProcessorError(f"{where}: content must be a string or a list of blocks")
            elif tokenize and not content:
                # transformers, when tokenizing, gives a message without content (e.g. an assistant turn of
                # tool calls only) an empty list of blocks, which templates render as content
                message["content"] = []
            messages.append(message)
        return messages, images

    @staticmethod
    def _image_source(source: Any, key: str, where: str) -> Any:
        """An image block's value as `load_image` takes it."""
        if key == "base64" or (isinstance(source, str) and source.startswith("data:image/")):
            try:
                return io.BytesIO(base64.b64decode(source.split(",", 1)[-1], validate=True))
            except (ValueError, TypeError, AttributeError) as error:
                raise ProcessorError(f"{where}: invalid base64 image data") from error
        if isinstance(source, str) and source.startswith(("http://", "https://")):
            raise ProcessorError(
                f"{where}: remote image URLs are not fetched; download the image, pass its path"
            )
        if isinstance(source, str) and source.startswith("file://"):
            return source[len("file://") :]
        return source

    def apply_chat_template(
        self,
        conversation: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
        *,
        add_generation_prompt: bool = False,
        continue_final_message: bool | str = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        chat_template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        processor_kwargs: Mapping[str, Any] | None = None,
        padding: bool | str = True,
        padding_side: str | None = None,
        max_length: int | None = None,
        truncation: bool = False,
        use_image_special_tokens: bool | None = None,
        return_tensors: str | None = None,
        **template_kwargs: Any,
    ) -> Any:
        """Render one conversation (a list of messages) or a batch (a list of them) with the chat template,
        as transformers' `apply_chat_template` does.

        Messages are `{"role", "content"}` with content a string or a list of blocks:
        `{"type": "text", "text": ...}`, `{"type": "image", "image"|"path"|"url"|"base64": ...}` or OpenAI's
        `{"type": "image_url", "image_url": {"url": ...}}`. Without `tokenize`, returns the prompt string(s)
        (an image block needs no source then: it is a placeholder); with it, the token ids (B, S), or with
        `return_dict` everything `__call__` returns, plus `assistant_masks` (B, S) int64 with
        `return_assistant_tokens_mask` (1 on the tokens of the template's `{% generation %}` blocks; all 0,
        with a warning, for a template without them, as in transformers).

        `tools`, `documents`, `continue_final_message` (True or the field to continue) and any other keyword
        (e.g. `keep_past_thinking`) reach the template as transformers passes them. The processor's options
        (`__call__`'s: padding, image options such as `do_image_splitting`, `max_image_tokens`,
        `images_kwargs`, ...; and `images`, which replace the conversation's) go in `processor_kwargs`, or
        as keywords the template does not read (transformers' older way)."""
        if not isinstance(conversation, (list, tuple)) or not conversation:
            raise ProcessorError("conversation must be a non-empty list of messages, or a list of such lists")
        if continue_final_message and add_generation_prompt:
            raise ProcessorError(
                "continue_final_message and add_generation_prompt do not go together: the first continues "
                "the final message, the second starts a new assistant message"
            )
        if continue_final_message and return_assistant_tokens_mask:
            raise ProcessorError(
                "return_assistant_tokens_mask does not go together with continue_final_message"
            )
        if chat_template is not None:
            template = ChatTemplate(chat_template, "the chat_template argument")
        elif self._compiled_template is not None:
            template = self._compiled_template
        else:
            raise ProcessorError("this processor has no chat template; pass chat_template=")
        check_tools_and_documents(tools, documents)
        # transformers' older way: processor options as keywords the template does not read (other such
        # keywords only reach the template, which ignores them)
        routed = {
            key: value
            for key, value in template_kwargs.items()
            if key not in template.variables and key in _CALL_OPTIONS + Lfm2VlImageProcessor.config_keys
        }
        processor_kwargs = {**routed, **(processor_kwargs or {})}
        given_images = processor_kwargs.pop("images", None)
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        need_sources = tokenize and given_images is None
        normalized = [
            self._normalize_conversation(c, i, need_sources, tokenize) for i, c in enumerate(conversations)
        ]
        if return_assistant_tokens_mask and not template.has_generation_markers:
            warnings.warn(
                f"return_assistant_tokens_mask: the chat template ({template.origin}) has no "
                "{% generation %} blocks, so the assistant mask is all zeros",
                stacklevel=2,
            )

        context = template_data({**self.special_tokens, **template_kwargs})
        context.update(tools=template_data(tools), documents=template_data(documents))
        prompts, generation_spans = [], []
        for index, (messages, _) in enumerate(normalized):
            prompt, spans = self._render(
                template,
                index,
                messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                track_generation=return_assistant_tokens_mask,
                context=context,
            )
            prompts.append(prompt)
            generation_spans.append(spans)

        if not tokenize:
            return prompts if batched else prompts[0]
        if given_images is not None:
            images = [given_images] if not batched else given_images
        else:
            images = [[load_image(source, where) for source, where in sources] for _, sources in normalized]
        call_options = {
            "padding": padding,
            "padding_side": padding_side,
            "max_length": max_length,
            "truncation": truncation,
            "use_image_special_tokens": use_image_special_tokens,
            "return_tensors": return_tensors,
            **processor_kwargs,
        }
        if return_assistant_tokens_mask:
            call_options.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
        outputs = self(images=images if any(images) else None, text=prompts, **call_options)
        if return_assistant_tokens_mask:
            outputs["assistant_masks"] = self._assistant_masks(
                outputs.pop("offset_mapping"), outputs.pop("text_replacement_offsets"), generation_spans
            )
        return outputs if return_dict else outputs["input_ids"]

    @staticmethod
    def _render(template: ChatTemplate, index: int, messages: list[dict[str, Any]], **options: Any) -> Any:
        try:
            return template.render(template_data(messages), **options)
        except jinja2.exceptions.TemplateError as error:
            raise ProcessorError(f"conversation {index}: chat template error: {error}") from None
        except ProcessorError as error:
            raise ProcessorError(f"conversation {index}: {error}") from None

    @property
    def has_generation_markers(self) -> bool:
        """Whether the chat template marks assistant turns with `{% generation %}` blocks."""
        return self._compiled_template is not None and self._compiled_template.has_generation_markers

    def generation_spans(
        self, conversation: Sequence[Mapping[str, Any]]
    ) -> tuple[str, list[tuple[int, int]]]:
        """One conversation rendered (as `apply_chat_template` without tokenising) and the character spans
        of its `{% generation %}` blocks in that text: what `return_assistant_tokens_mask` marks."""
        if self._compiled_template is None:
            raise ProcessorError("this processor has no chat template")
        messages, _ = self._normalize_conversation(conversation, 0, need_sources=False, tokenize=False)
        context = template_data(self.special_tokens)
        context.update(tools=None, documents=None)
        return self._render(
            self._compiled_template,
            0,
            messages,
            add_generation_prompt=False,
            continue_final_message=False,
            track_generation=True,
            context=context,
        )

    @staticmethod
    def _assistant_masks(
        offsets: np.ndarray, replacements: list[list[dict[str, Any]]], spans: list[list[tuple[int, int]]]
    ) -> np.ndarray:
        """(B, S) int64: 1 on every token overlapping a `{% generation %}` span of the rendered text, the span
        moved past the `<image>` placeholders expanded before it (transformers' rule: zero-width tokens, i.e.
        padding, never count)."""
        masks = np.zeros(offsets.shape[:2], np.int64)
        for row, (row_offsets, row_replacements, row_spans) in enumerate(
            zip(offsets, replacements, spans, strict=True)
        ):
            ends = [r["span"][1] for r in row_replacements]
            gained = [0] + [r["new_span"][1] - r["span"][1] for r in row_replacements]
            for start, end in row_spans:
                start = start + gained[bisect.bisect_right(ends, start)]
                end = end + gained[bisect.bisect_right(ends, end)]
                masks[row] |= (row_offsets[:, 0] < end) & (row_offsets[:, 1] > start)
        return masks

    # -- decoding --------------------------------------------------------------------------------------

    def decode(self, token_ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, numpy or jax array)."""
        sequences = _token_id_lists(token_ids, self.tokenizer.get_vocab_size())
        if len(sequences) != 1:
            raise ProcessorError(f"decode takes one sequence, got {len(sequences)}; use batch_decode")
        (ids,) = sequences
        return self._clean_up(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def batch_decode(self, token_ids: Any, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a (B, n) batch of ids (padding after EOS is dropped with skip_special_tokens=True)."""
        texts = self.tokenizer.decode_batch(
            _token_id_lists(token_ids, self.tokenizer.get_vocab_size()),
            skip_special_tokens=skip_special_tokens,
        )
        return [self._clean_up(text) for text in texts]

    def _clean_up(self, text: str) -> str:
        if not self.clean_up_tokenization_spaces:
            return text
        for before, after in (
            (" .", "."),
            (" ?", "?"),
            (" !", "!"),
            (" ,", ","),
            (" ' ", "'"),
            (" n't", "n't"),
            (" 'm", "'m"),
            (" 's", "'s"),
            (" 've", "'ve"),
            (" 're", "'re"),
        ):
            text = text.replace(before, after)
        return text
