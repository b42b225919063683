"""The optimizer: global-norm clipping, then AdamW (transformers' defaults: b1 0.9, b2 0.999, eps 1e-8,
decoupled weight decay) on a linear-warmup + cosine-decay schedule, per component and per
decay/no-decay group through `optax.multi_transform`.

Components are the model's three parts, named as on the command line: vision (the vision tower),
projector, language (the text tower, embeddings and LM head). A frozen component is not in the trainable
tree at all: no gradient is computed for it and it has no optimizer state. Each trainable component's
learning rate is the schedule times its multiplier.

Weight decay applies to matrices and embeddings (params whose spec draws them from a normal
distribution), never to norm scales or biases; LoRA's A and B are decayed, as transformers' Trainer does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import optax

from ..errors import Lfm2VlError
from ..nn.params import is_spec

# Command-line component name -> the params' top-level key.
COMPONENTS = {"vision": "vision", "projector": "projector", "language": "text"}


class OptimizerError(Lfm2VlError):
    pass


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float
    total_steps: int
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # None or 0: no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)  # component -> factor

    def __post_init__(self):
        if self.learning_rate < 0:
            raise OptimizerError(f"learning rate must be >= 0, got {self.learning_rate}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise OptimizerError(
                f"--warmup-steps ({self.warmup_steps}) must be >= 0 and below --steps ({self.total_steps})"
            )
        if self.weight_decay < 0:
            raise OptimizerError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise OptimizerError(f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        unknown = sorted(set(self.lr_multipliers) - set(COMPONENTS))
        if unknown:
            raise OptimizerError(
                f"--lr-multiplier: unknown components {unknown} (components: {', '.join(COMPONENTS)})"
            )
        negative = sorted(k for k, v in self.lr_multipliers.items() if v < 0)
        if negative:
            raise OptimizerError(f"--lr-multiplier: negative multipliers for {negative}")

    def schedule(self) -> optax.Schedule:
        """0 -> learning_rate linearly over the warmup steps, then a cosine down to 0 at total_steps."""
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, self.warmup_steps, self.total_steps, 0.0
        )


def _component(key: str) -> str:
    return next(name for name, params_key in COMPONENTS.items() if key.startswith(params_key))


def parameter_labels(trainable_specs: Any) -> Any:
    """ "component/decay" or "component/no_decay" per leaf of a tree of `ParamSpec`s shaped like the
    trainable tree (top-level keys: the params' component keys or LoRA adapter names)."""

    def label(path: tuple, spec: Any) -> str:
        decay = "decay" if spec.init == "normal" else "no_decay"
        return f"{_component(path[0].key)}/{decay}"

    return jax.tree_util.tree_map_with_path(label, trainable_specs, is_leaf=is_spec)


def make_optimizer(config: OptimizerConfig, labels: Any) -> optax.GradientTransformation:
    """Clipping by the global norm of all gradients, then one AdamW per label (its component's multiplier
    on the schedule; weight decay on "decay" labels only)."""
    schedule = config.schedule()
    transforms = {}
    for label in sorted(set(jax.tree.leaves(labels))):
        component, decay = label.split("/")
        multiplier = config.lr_multipliers.get(component, 1.0)
        transforms[label] = optax.adamw(
            lambda count, m=multiplier: schedule(count) * m,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay if decay == "decay" else 0.0,
        )
    clip = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []  # 0 or None: off
    return optax.chain(*clip, optax.multi_transform(transforms, labels))
