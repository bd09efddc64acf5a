"""Optax-style optimizers for flat parameter dicts, with fused in-place steps and DeepSpeed schedules.

Example:
    >>> import torch
    >>> from funczero import optim
    >>> params = {"w": torch.ones(3)}
    >>> opt = optim.adamw(optim.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100))
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.ones(3)}, state, params)   # pure
    >>> params = optim.apply_updates(params, updates)
    >>> state = opt.update_({"w": torch.ones(3)}, state, params)           # fused, in place
    >>> opt.learning_rate(state)
    tensor(0.0002)
"""

from __future__ import annotations

from funczero.optim.aliases import adagrad as adagrad
from funczero.optim.aliases import adam as adam
from funczero.optim.aliases import adamw as adamw
from funczero.optim.aliases import lamb as lamb
from funczero.optim.aliases import lion as lion
from funczero.optim.aliases import sgd as sgd
from funczero.optim.base import EmptyState as EmptyState
from funczero.optim.base import GradientTransformation as GradientTransformation
from funczero.optim.base import InPlaceTransformFn as InPlaceTransformFn
from funczero.optim.base import InPlaceUpdateFn as InPlaceUpdateFn
from funczero.optim.base import Optimizer as Optimizer
from funczero.optim.base import OptState as OptState
from funczero.optim.base import Params as Params
from funczero.optim.base import ReduceFn as ReduceFn
from funczero.optim.base import ScalarOrSchedule as ScalarOrSchedule
from funczero.optim.base import Schedule as Schedule
from funczero.optim.base import Updates as Updates
from funczero.optim.base import apply_updates as apply_updates
from funczero.optim.base import identity as identity
from funczero.optim.base import stateless as stateless
from funczero.optim.chain import chain as chain
from funczero.optim.chain import in_place_unsupported_reason as in_place_unsupported_reason
from funczero.optim.chain import supports_in_place as supports_in_place
from funczero.optim.clipping import CLIP_NORM_EPS as CLIP_NORM_EPS
from funczero.optim.clipping import clip_by_global_norm as clip_by_global_norm
from funczero.optim.clipping import clip_coefficient as clip_coefficient
from funczero.optim.clipping import global_norm as global_norm
from funczero.optim.clipping import scale_by_trust_ratio as scale_by_trust_ratio
from funczero.optim.groups import MaskedState as MaskedState
from funczero.optim.groups import PartitionState as PartitionState
from funczero.optim.groups import masked as masked
from funczero.optim.groups import partition as partition
from funczero.optim.groups import set_to_zero as set_to_zero
from funczero.optim.inplace import inplace_update as inplace_update
from funczero.optim.masks import ParamLabels as ParamLabels
from funczero.optim.masks import ParamMask as ParamMask
from funczero.optim.masks import WeightDecayMask as WeightDecayMask
from funczero.optim.masks import no_decay_for_norms_and_biases as no_decay_for_norms_and_biases
from funczero.optim.moments import DampedTraceState as DampedTraceState
from funczero.optim.moments import ScaleByAdamState as ScaleByAdamState
from funczero.optim.moments import ScaleByLionState as ScaleByLionState
from funczero.optim.moments import ScaleByRssState as ScaleByRssState
from funczero.optim.moments import TraceState as TraceState
from funczero.optim.moments import scale_by_adam as scale_by_adam
from funczero.optim.moments import scale_by_lion as scale_by_lion
from funczero.optim.moments import scale_by_rss as scale_by_rss
from funczero.optim.moments import trace as trace
from funczero.optim.scaling import ScaleByScheduleState as ScaleByScheduleState
from funczero.optim.scaling import add_decayed_weights as add_decayed_weights
from funczero.optim.scaling import scale as scale
from funczero.optim.scaling import scale_by_learning_rate as scale_by_learning_rate
from funczero.optim.scaling import scale_by_schedule as scale_by_schedule
from funczero.optim.schedules import constant_schedule as constant_schedule
from funczero.optim.schedules import cosine_decay_schedule as cosine_decay_schedule
from funczero.optim.schedules import from_deepspeed as from_deepspeed
from funczero.optim.schedules import join_schedules as join_schedules
from funczero.optim.schedules import linear_schedule as linear_schedule
from funczero.optim.schedules import lr_range_test as lr_range_test
from funczero.optim.schedules import one_cycle as one_cycle
from funczero.optim.schedules import warmup_cosine_decay_schedule as warmup_cosine_decay_schedule
from funczero.optim.schedules import warmup_cosine_lr as warmup_cosine_lr
from funczero.optim.schedules import warmup_decay_lr as warmup_decay_lr
from funczero.optim.schedules import warmup_lr as warmup_lr
from funczero.optim.wrappers import ApplyIfFiniteState as ApplyIfFiniteState
from funczero.optim.wrappers import MultiSteps as MultiSteps
from funczero.optim.wrappers import MultiStepsState as MultiStepsState
from funczero.optim.wrappers import all_finite as all_finite
from funczero.optim.wrappers import apply_if_finite as apply_if_finite

__all__ = [
    "CLIP_NORM_EPS",
    "ApplyIfFiniteState",
    "DampedTraceState",
    "EmptyState",
    "GradientTransformation",
    "InPlaceTransformFn",
    "InPlaceUpdateFn",
    "MaskedState",
    "MultiSteps",
    "MultiStepsState",
    "OptState",
    "Optimizer",
    "ParamLabels",
    "ParamMask",
    "Params",
    "PartitionState",
    "ReduceFn",
    "ScalarOrSchedule",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "Updates",
    "WeightDecayMask",
    "adagrad",
    "adam",
    "adamw",
    "add_decayed_weights",
    "all_finite",
    "apply_if_finite",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "clip_coefficient",
    "constant_schedule",
    "cosine_decay_schedule",
    "from_deepspeed",
    "global_norm",
    "identity",
    "in_place_unsupported_reason",
    "inplace_update",
    "join_schedules",
    "lamb",
    "linear_schedule",
    "lion",
    "lr_range_test",
    "masked",
    "no_decay_for_norms_and_biases",
    "one_cycle",
    "partition",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "scale_by_rss",
    "scale_by_schedule",
    "scale_by_trust_ratio",
    "set_to_zero",
    "sgd",
    "stateless",
    "supports_in_place",
    "trace",
    "warmup_cosine_decay_schedule",
    "warmup_cosine_lr",
    "warmup_decay_lr",
    "warmup_lr",
]
