"""The table of every accepted config key: its check, default, DeepSpeed default and status.

This is the single source of truth: the parser applies it, the section dataclasses take their
defaults from it, and ``docs/config.md`` is generated from it (``python -m funczero.config``).
DeepSpeed defaults are those of the v0.19.x code (not its docs, where the two disagree).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

from funczero.config.checks import (
    betas,
    boolean,
    choice,
    integer,
    mapping,
    number,
    optional,
    string,
)
from funczero.config.checks import _BAD, Check, _Bad
from funczero.config.schema import Auto, Key, Status
from funczero.monitors.settings import (
    CometSettings,
    CSVSettings,
    FlopsProfilerSettings,
    TensorBoardSettings,
    WandbSettings,
)

__all__ = [
    "MAX_BATCH",
    "DEPRECATED_ZERO",
    "KEYS",
    "KEY_HOMES",
    "OPTIMIZER_PARAMS",
    "OPTIMIZER_TYPES",
    "SCHEDULER_PARAMS",
    "SECTIONS",
    "UNSUPPORTED_FEATURES",
    "UNSUPPORTED_OPTIMIZERS",
    "default",
]

USED, IGNORED, DEFAULT_ONLY = Status.USED, Status.IGNORED, Status.DEFAULT_ONLY

MAX_BATCH = 2**31 - 1
"""The largest batch count (samples per step, per micro-batch, micro-batches per step): a larger
one is no real batch, and its products would overflow what a saved config can reload."""

_BATCH = optional(integer(ge=1, le=MAX_BATCH))
_BIG = integer(ge=0)  # element counts such as 5e8


def _ds_block(table: dict[str, Key]) -> dict[str, Key]:
    """Inside DeepSpeed's pydantic blocks "auto" means the default (DeepSpeed drops the field)."""
    return {
        n: dataclasses.replace(k, auto=Auto.DEFAULT) if k.auto is Auto.NO else k
        for n, k in table.items()
    }


def _no_hooks(what: str) -> str:
    return f"{what}; funczero computes gradients functionally, without module hooks"


_NO_OFFLOAD = (
    "a detail of DeepSpeed's offload machinery (NVMe, or its CPU gradient partitioning) with no "
    "counterpart in funczero's CPU offload"
)
_MAX_SCALE = 2.0**127  # funczero.train.loss_scale.MAX_SCALE: the float32 scale's ceiling

TOP: dict[str, Key] = {
    "train_batch_size": Key(
        _BATCH, None, "samples per optimizer step over all data-parallel ranks",
        auto=Auto.COMPUTED,
    ),
    "train_micro_batch_size_per_gpu": Key(
        _BATCH, None, "samples per forward/backward on one rank", auto=Auto.COMPUTED
    ),
    "gradient_accumulation_steps": Key(
        _BATCH, None, "micro-batches accumulated per optimizer step", auto=Auto.COMPUTED
    ),
    "optimizer": Key(optional(mapping()), None, "optimizer block `{type, params}`"),
    "scheduler": Key(optional(mapping()), None, "learning-rate schedule block `{type, params}`"),
    "fp16": Key(mapping(), {}, "fp16 mixed precision with loss scaling"),
    "bf16": Key(mapping(), {}, "bf16 mixed precision", alias="bfloat16"),
    "zero_optimization": Key(
        mapping(legacy_bool=True), {}, "ZeRO block (the legacy `true`/`false` is accepted)"
    ),
    "gradient_clipping": Key(
        number(ge=0), 0.0,
        "clip the global L2 norm of the unscaled gradients to this value; 0 disables",
        ds="1.0 at HEAD (PR #8068, 2026-06); 0.0 in every earlier release",
        auto=Auto.ERROR, hint="from --max_grad_norm, default 1.0",
    ),
    "steps_per_print": Key(
        optional(integer(ge=1)), 10,
        "logging period of funczero.train.metrics.MetricsLogger.from_config (the step itself "
        "never syncs with the host to log)",
        USED, ds="null in code since PR #6602 (docs still say 10)",
    ),
    "wall_clock_breakdown": Key(
        boolean(), False,
        "initialize gives the step a PhaseTimer (forward, backward, reduce, optimizer; no host "
        "sync inside the step); MetricsLogger writes DeepSpeed's elapsed_time_ms events",
        USED,
    ),
    "communication_data_type": Key(
        choice(None, "fp32", "fp16", "bf16"), None,
        "dtype gradients are reduced in; null: funczero.parallel.precision's choice (fp32)",
        ds="null: the precision regime's dtype",
    ),
    "prescale_gradients": Key(
        boolean(), False,
        "funczero averages gradients over ranks with the collective's own average "
        "(ReduceOp.AVG); moving the division is not implemented",
        IGNORED,
    ),
    "gradient_predivide_factor": Key(
        number(gt=0), 1.0,
        "funczero averages gradients over ranks with the collective's own average "
        "(ReduceOp.AVG); a pre-division factor is not implemented",
        IGNORED,
    ),
    "zero_allow_untested_optimizer": Key(
        boolean(), False,
        "funczero.initialize runs any funczero.optim optimizer at every ZeRO stage, so there is "
        "nothing to allow",
        IGNORED,
    ),
    "dataloader_drop_last": Key(
        boolean(), False,
        "DistributedBatchLoader.from_config: drop the last partial global batch (false: wrap)",
    ),
    "allgather_size": Key(
        _BIG, 500_000_000,
        "legacy: allgather_bucket_size used with `\"zero_optimization\": true`",
    ),
    "zero_force_ds_cpu_optimizer": Key(boolean(), True, _NO_OFFLOAD, IGNORED),
    "memory_breakdown": Key(
        boolean(), False, "DeepSpeed's allocator debug printout has no funczero equivalent",
        IGNORED,
    ),
    "dump_state": Key(
        boolean(), False, "debug print of DeepSpeed's state; print Config.to_dict() instead",
        IGNORED,
    ),
    "gradient_allreduce_op": Key(
        choice("mean", "sum"), "mean", "funczero always averages gradients over ranks",
        DEFAULT_ONLY,
    ),
    "sparse_gradients": Key(
        boolean(), False, "sparse embedding gradients are not implemented", DEFAULT_ONLY
    ),
    "disable_allgather": Key(
        boolean(), False, "funczero always all-gathers updated parameter shards", DEFAULT_ONLY
    ),
    "managed_gradient_accumulation": Key(
        boolean(), True,
        "funczero's step always accumulates gradient_accumulation_steps micro-batches",
        DEFAULT_ONLY,
    ),
    "data_types": Key(mapping(), {}, "dtype overrides (see data_types.*)"),
    "funczero": Key(mapping(), {}, "funczero-only settings (DeepSpeed ignores this block)"),
    # DeepSpeed's monitors (funczero.monitors; the keys are in the tables below).
    "tensorboard": Key(mapping(), {}, "TensorBoard event files (docs/monitoring.md)"),
    "wandb": Key(mapping(), {}, "Weights & Biases logging (docs/monitoring.md)"),
    "csv_monitor": Key(mapping(), {}, "one CSV file per event (docs/monitoring.md)"),
    "comet": Key(mapping(), {}, "Comet logging (docs/monitoring.md)"),
    "flops_profiler": Key(
        mapping(), {}, "FLOPs per step and MFU from a FLOPs-per-token count (docs/monitoring.md)"
    ),
    # Foreign feature blocks: present in many DeepSpeed configs, usually switched off.
    **{
        name: Key(
            mapping(), None, f"{what} is not implemented by funczero", DEFAULT_ONLY,
            disabled_only=True,
        )
        for name, what in {
            "amp": "Apex AMP (use the fp16 or bf16 block)",
            "torch_autocast": "torch.autocast mixed precision (use the fp16 or bf16 block)",
            "comms_logger": "DeepSpeed's communication logger",
            "elasticity": "DeepSpeed elastic batch sizing",
            "autotuning": "the DeepSpeed autotuner",
            "data_efficiency": "DeepSpeed data efficiency (curriculum, random-LTD)",
        }.items()
    },
    "compile": Key(
        mapping(), None,
        "regional compilation of every unit's forward inside the step (see compile.*)",
    ),
    "activation_checkpointing": Key(
        optional(mapping()), None,
        "any activation_checkpointing block recomputes every unit's forward in backward "
        "(funczero.initialize's remat=True, at every ZeRO stage); see activation_checkpointing.*",
    ),
    "aio": Key(mapping(), None, "async I/O settings for NVMe offload; " + _NO_OFFLOAD, IGNORED),
    "checkpoint": Key(
        mapping(), None,
        "DeepSpeed checkpoint-engine settings; funczero.checkpoint always writes reshardable "
        "checkpoints from every rank",
        IGNORED,
    ),
    "timers": Key(
        mapping(), None, "DeepSpeed's throughput timer; funczero's logger measures throughput",
        IGNORED,
    ),
}

FP16: dict[str, Key] = _ds_block({
    "enabled": Key(
        boolean(), False, "train in fp16 with loss scaling", auto=Auto.ERROR,
        hint="from --fp16",
    ),
    "auto_cast": Key(
        boolean(), False,
        "funczero does not cast the batch (DeepSpeed casts floating-point inputs to fp16); "
        "cast them in your loss_fn or model",
        IGNORED,
    ),
    "loss_scale": Key(
        number(ge=0, le=_MAX_SCALE), 0.0,
        "0: dynamic loss scaling; > 0: this static scale (the scale is float32: at most 2**127)",
    ),
    "initial_scale_power": Key(
        integer(ge=0, le=127), 16, "dynamic scaling starts at 2**initial_scale_power"
    ),
    "loss_scale_window": Key(
        integer(ge=1), 1000, "double the scale after this many consecutive non-overflow steps"
    ),
    "hysteresis": Key(
        integer(ge=1), 2,
        "overflows tolerated before the scale is halved (refilled when the scale grows)",
    ),
    "consecutive_hysteresis": Key(
        boolean(), False, "refill hysteresis on every non-overflow step"
    ),
    "min_loss_scale": Key(
        number(gt=0, le=_MAX_SCALE), 1.0, "the scale never goes below this (at most 2**127)",
        ds="1 (DeepSpeed accepts integers only)",
    ),
    "fp16_master_weights_and_grads": Key(
        boolean(), False,
        "fp16 master weights need DeepSpeedCPUAdam offload; funczero keeps fp32 master weights",
        DEFAULT_ONLY,
    ),
})

BF16: dict[str, Key] = _ds_block({
    "enabled": Key(
        boolean(), False, "train in bf16 (no loss scaling)", auto=Auto.ERROR,
        hint="from --bf16",
    ),
    "check_grad_overflow": Key(
        boolean(), True,
        "funczero always skips a step whose gradients hold inf/nan, in every precision, and "
        "counts it in the metrics; false (apply such a step) is not available",
        IGNORED, ds="true since PR #8035 (2026-05); false before",
    ),
    "immediate_grad_update": Key(
        boolean(), False, _no_hooks("schedules DeepSpeed's BF16_Optimizer gradient hooks"),
        IGNORED,
    ),
    "bf16_master_weights_and_grads": Key(
        boolean(), False, "funczero keeps fp32 master weights and gradients", DEFAULT_ONLY
    ),
    "bf16_optimizer_states": Key(
        boolean(), False, "funczero keeps optimizer state in fp32", DEFAULT_ONLY
    ),
})

_ZERO_STAGE3_ONLY = "a ZeRO-3 module-hook knob"
ZERO: dict[str, Key] = _ds_block({
    "stage": Key(
        integer(ge=0, le=3), 0,
        "0: plain data parallel; 1: shard optimizer state; 2: and gradients; 3: and parameters",
    ),
    "contiguous_gradients": Key(
        boolean(), True, "gradients are always reduced from one contiguous buffer per unit",
        IGNORED,
    ),
    "reduce_scatter": Key(boolean(), True, "reduce-scatter gradients instead of all-reducing"),
    "reduce_bucket_size": Key(_BIG, 500_000_000, "elements per gradient-reduction bucket"),
    "allgather_partitions": Key(
        boolean(), True, "updated shards are always all-gathered, one unit at a time", IGNORED
    ),
    "allgather_bucket_size": Key(
        _BIG, 500_000_000, "all-gathers are per unit (a transformer block), not size buckets",
        IGNORED,
    ),
    "overlap_comm": Key(
        optional(boolean()), None,
        "communication always overlaps compute (per-unit reductions during backward, "
        "prefetched all-gathers)",
        IGNORED,
        ds="null (true for stage 3, false otherwise; DeepSpeed's docs say false)",
    ),
    "sub_group_size": Key(
        _BIG, 1_000_000_000, "the optimizer updates every shard in one fused call", IGNORED
    ),
    "stage3_prefetch_bucket_size": Key(
        _BIG, 50_000_000, "stage 3 prefetches exactly one unit ahead, forward and backward",
        IGNORED, ds="5e7 (DeepSpeed's docs say 5e8)", alias="prefetch_bucket_size",
    ),
    "stage3_param_persistence_threshold": Key(
        _BIG, 100_000, "parameters smaller than this stay unpartitioned (stage 3)",
        alias="param_persistence_threshold",
    ),
    "stage3_max_live_parameters": Key(
        _BIG, 1_000_000_000, "at most the running and the prefetched unit are gathered",
        IGNORED, alias="max_live_parameters",
    ),
    "stage3_max_reuse_distance": Key(
        _BIG, 1_000_000_000, "a unit is freed after its forward and re-gathered for backward",
        IGNORED, alias="max_reuse_distance",
    ),
    "stage3_gather_16bit_weights_on_model_save": Key(
        boolean(), False, "write full weights with `funczero ckpt consolidate` instead",
        IGNORED, alias="gather_16bit_weights_on_model_save",
    ),
    "offload_param": Key(
        optional(mapping()), None, "parameter offload (device \"none\" only: not implemented)"
    ),
    "offload_optimizer": Key(
        optional(mapping()), None,
        "ZeRO-Offload: master weights and optimizer state on the host, updated on the CPU "
        "(stages 1-3, device \"cpu\"; funczero.train.offload)",
    ),
    "round_robin_gradients": Key(boolean(), False, _NO_OFFLOAD, IGNORED),
    "use_multi_rank_bucket_allreduce": Key(
        boolean(), True, "a DeepSpeed bucketing detail with no funczero counterpart", IGNORED
    ),
    "load_from_fp32_weights": Key(
        boolean(), True, "funczero checkpoints always restore the fp32 master weights", IGNORED
    ),
    "elastic_checkpoint": Key(
        boolean(), False, "deprecated in DeepSpeed; funczero checkpoints reshard to any world size",
        IGNORED,
    ),
    "stage3_model_persistence_threshold": Key(
        _BIG, sys.maxsize, "a ZeRO-3 tuning knob funczero does not implement", IGNORED,
        alias="model_persistence_threshold",
    ),
    "stage3_module_granularity_threshold": Key(
        integer(), 0, _no_hooks(_ZERO_STAGE3_ONLY), IGNORED, alias="module_granularity_threshold"
    ),
    "stage3_use_all_reduce_for_fetch_params": Key(
        boolean(), False, "a ZeRO-3 fetch strategy funczero does not implement", IGNORED,
        alias="use_all_reduce_for_fetch_params",
    ),
    "stage3_allgather_sequential": Key(
        boolean(), False, "a ZeRO-3 fetch strategy funczero does not implement", IGNORED,
        alias="allgather_sequential",
    ),
    "stage3_partition_stream_chunk_size": Key(
        _BIG, 0, "zero.Init partitioning detail; funczero materialises only local shards",
        IGNORED, alias="partition_stream_chunk_size",
    ),
    "ignore_unused_parameters": Key(
        boolean(), True, "unused parameters simply get zero gradients in funczero", IGNORED
    ),
    "memory_efficient_linear": Key(boolean(), True, _no_hooks(_ZERO_STAGE3_ONLY), IGNORED),
    "override_module_apply": Key(boolean(), True, _no_hooks(_ZERO_STAGE3_ONLY), IGNORED),
    "pipeline_loading_checkpoint": Key(
        boolean(), False, "pipeline-parallel loading is not part of funczero", IGNORED
    ),
    "log_trace_cache_warnings": Key(boolean(), False, _no_hooks(_ZERO_STAGE3_ONLY), IGNORED),
    "enable_sanity_checks": Key(boolean(), False, "DeepSpeed-internal debug checks", IGNORED),
    "save_muon_momentum_buffer_in_memory": Key(boolean(), False, _NO_OFFLOAD, IGNORED),
    "leaf_module": Key(optional(mapping()), None, _no_hooks(_ZERO_STAGE3_ONLY), IGNORED),
    "grad_hooks": Key(
        boolean(), True,
        "listed in DeepSpeed's docs but no longer a DeepSpeed field (DeepSpeed rejects it)",
        IGNORED,
    ),
    "legacy_stage1": Key(boolean(), False, "DeepSpeed's old stage-1 implementation", DEFAULT_ONLY),
    "zero_hpz_partition_size": Key(
        integer(ge=0), 1,
        "ZeRO++ hpZ, a second copy of the stage-3 parameters sharded inside each node so that "
        "backward all-gathers stay in the node, is not implemented; mics_shard_size (hybrid "
        "sharding) keeps every all-gather inside the shard group with one copy",
        DEFAULT_ONLY,
    ),
    "zero_quantized_weights": Key(
        boolean(), False, "ZeRO++ quantised communication is not implemented", DEFAULT_ONLY
    ),
    "zero_quantized_nontrainable_weights": Key(
        boolean(), False, "ZeRO++ quantised weights are not implemented", DEFAULT_ONLY
    ),
    "zero_quantized_gradients": Key(
        boolean(), False, "ZeRO++ quantised communication is not implemented", DEFAULT_ONLY
    ),
    "zeropp_loco_param": Key(
        optional(mapping()), None, "ZeRO++ LoCo is not implemented", DEFAULT_ONLY
    ),
    "mics_shard_size": Key(
        integer(ge=-1), -1,
        "hybrid sharding (MiCS, HSDP) at stages 1-3: parameters, gradients and optimizer state "
        "sharded over groups of this many consecutive ranks (a divisor of the world size, "
        "e.g. the GPUs per node), replicated across groups; -1: one group of every rank",
    ),
    "mics_hierarchical_params_gather": Key(
        boolean(), False,
        "funczero all-gathers inside the shard group in one collective; keep shard groups "
        "inside a node (mics_shard_size <= GPUs per node) and no gather crosses nodes",
        IGNORED,
    ),
    "zenflow": Key(optional(mapping()), None, "ZenFlow is not implemented", DEFAULT_ONLY),
})

DEPRECATED_ZERO: Mapping[str, str] = {
    # old DeepSpeed name -> what replaced it (mapped with a ConfigWarning, as DeepSpeed does)
    "cpu_offload": "offload_optimizer",
    "cpu_offload_param": "offload_param",
    "cpu_offload_use_pin_memory": "offload_param.pin_memory / offload_optimizer.pin_memory",
    "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
}

def _offload_device(refused: Mapping[str, str]) -> Check:
    """``"none"``, ``"cpu"`` or ``"nvme"``, minus the ``refused`` ones (each with its reason)."""
    options = choice("none", "cpu", "nvme")
    accepted = [o for o in ("none", "cpu", "nvme") if o not in refused]

    def fn(v: Any) -> Any:
        out = options._fn(v)
        return _Bad(refused[out]) if isinstance(out, str) and out in refused else out

    return Check("one of " + ", ".join(f'"{o}"' for o in accepted), fn)


_NO_NVME = (
    'NVMe offload is not implemented (funczero offloads to host memory only): use "device": "cpu"'
)
_NO_PARAM_OFFLOAD = (
    "parameter offload (stage 3 parameters in host memory) is not implemented; offload the "
    'optimizer instead (offload_optimizer: {"device": "cpu"}), or remove offload_param'
)
_PARAM_OFFLOAD_TUNING = 'parameter offload tuning; accepted because it is off (device "none")'
_NVME_TUNING = "NVMe offload tuning; NVMe offload is not implemented"
OFFLOAD_PARAM: dict[str, Key] = _ds_block({
    "device": Key(
        _offload_device({"cpu": _NO_PARAM_OFFLOAD, "nvme": _NO_PARAM_OFFLOAD}), "none",
        "parameter offload is not implemented (optimizer offload is)",
    ),
    "nvme_path": Key(optional(string()), None, _PARAM_OFFLOAD_TUNING, IGNORED),
    "buffer_count": Key(_BIG, 5, _PARAM_OFFLOAD_TUNING, IGNORED),
    "buffer_size": Key(_BIG, 100_000_000, _PARAM_OFFLOAD_TUNING, IGNORED),
    "max_in_cpu": Key(_BIG, 1_000_000_000, _PARAM_OFFLOAD_TUNING, IGNORED),
    "pin_memory": Key(boolean(), True, _PARAM_OFFLOAD_TUNING, IGNORED),
})
OFFLOAD_OPTIMIZER: dict[str, Key] = _ds_block({
    "device": Key(
        _offload_device({"nvme": _NO_NVME}), "none",
        '"cpu": master weights and optimizer state in host memory, updated on the CPU '
        '(stages 1-3); "nvme" is not implemented',
    ),
    "nvme_path": Key(optional(string()), None, _NVME_TUNING, IGNORED),
    "buffer_count": Key(_BIG, 4, _NVME_TUNING, IGNORED),
    "pin_memory": Key(
        boolean(), True,
        "stage the gradients and parameters crossing between host and GPU in page-locked "
        "memory, so the copies are asynchronous",
    ),
    "pipeline_read": Key(boolean(), False, _NVME_TUNING, IGNORED),
    "pipeline_write": Key(boolean(), False, _NVME_TUNING, IGNORED),
    "fast_init": Key(
        boolean(), False, "an NVMe initialisation shortcut; funczero builds host state directly",
        IGNORED,
    ),
    "ratio": Key(
        number(ge=0, le=1), 1.0,
        "partial offload (ratio < 1: part of the optimizer stays on the GPU) is not "
        "implemented; everything is offloaded",
        DEFAULT_ONLY,
    ),
    "super_offload": Key(
        boolean(), False, "SuperOffload (for Grace-Hopper superchips) is not implemented",
        DEFAULT_ONLY,
    ),
    "cpuadam_cores_perc": Key(
        number(gt=0, le=1), 0.8,
        "the CPU update uses torch's intra-op threads: set them with torch.set_num_threads",
        IGNORED,
    ),
})

DATA_TYPES: dict[str, Key] = _ds_block({
    "grad_accum_dtype": Key(
        choice(None, "fp32", "fp16", "bf16"), None,
        "the accumulation dtype is chosen by funczero's train step "
        "(see funczero.parallel.precision)",
        IGNORED,
    ),
})

ACTIVATION_CHECKPOINTING: dict[str, Key] = _ds_block({
    "partition_activations": Key(
        boolean(), False,
        "splitting checkpointed activations across model-parallel ranks needs tensor "
        "parallelism, which funczero does not have",
        DEFAULT_ONLY,
    ),
    "cpu_checkpointing": Key(
        boolean(), False, "moving checkpointed activations to the CPU is not implemented",
        DEFAULT_ONLY,
    ),
    "contiguous_memory_optimization": Key(
        boolean(), False, "PyTorch's caching allocator holds the checkpoints", IGNORED,
    ),
    "number_checkpoints": Key(
        optional(integer(ge=1)), None,
        "Megatron's count of checkpointed layers; funczero checkpoints every unit (choose units "
        "with initialize(remat=k or names))",
        IGNORED,
    ),
    "synchronize_checkpoint_boundary": Key(
        boolean(), False, "funczero's step never synchronises with the device", IGNORED,
    ),
    "profile": Key(boolean(), False, "use torch.profiler", IGNORED),
})

FUNCZERO: dict[str, Key] = {
    "seed": Key(
        optional(integer(ge=0)), None,
        "seed for parameter init and data shuffling; null: funczero.initialize's default",
    ),
    "raise_at_min_loss_scale": Key(
        boolean(), False,
        "raise when an fp16 step overflows at min_loss_scale with hysteresis used up (DeepSpeed's "
        "ZeRO path always raises); false: warn and keep skipping",
    ),
    "no_decay_for_norms_and_biases": Key(
        boolean(), False,
        "true: weight decay skips parameters of fewer than 2 dimensions (biases, LayerNorm and "
        "RMSNorm weights), decided on global shapes (funczero.optim.no_decay_for_norms_and_biases;"
        " optimizer_from_config then needs shapes=plan.spec.shapes); false: decay every "
        "parameter, as DeepSpeed does",
        ds="no such key: every parameter is decayed",
    ),
}

OPTIMIZER_BLOCK: dict[str, Key] = {
    "type": Key(string(), None, "optimizer name (case-insensitive); see below"),
    "params": Key(
        optional(mapping()), {}, "optimizer parameters (DeepSpeed/torch names); see below"
    ),
    "legacy_fusion": Key(
        boolean(), False, "selects a DeepSpeed fp16 kernel; funczero has one implementation",
        IGNORED,
    ),
}
SCHEDULER_BLOCK: dict[str, Key] = {
    "type": Key(
        string(), None, "schedule name (WarmupLR, WarmupDecayLR, ...); see the Scheduler section"
    ),
    "params": Key(
        optional(mapping()), {},
        "schedule parameters, checked by funczero.optim.schedules.from_deepspeed",
    ),
}

def _monitor(cls: type, docs: Mapping[str, str], checks: Mapping[str, Check]) -> dict[str, Key]:
    """A monitor block's table; the defaults are those of its funczero.monitors.settings class."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return _ds_block({name: Key(checks[name], defaults[name], docs[name]) for name in defaults})


_OUT = {
    "enabled": "write the events (MetricsLogger, rank 0)",
    "output_path": "directory the job directory goes in; \"\": the working directory",
    "job_name": "the job directory: files go to output_path/job_name",
}
_ANY_STRING = Check("a string", lambda v: v if isinstance(v, str) else _BAD)  # "" is meaningful
_OUT_CHECKS = {"enabled": boolean(), "output_path": _ANY_STRING, "job_name": string()}
TENSORBOARD = _monitor(TensorBoardSettings, _OUT, _OUT_CHECKS)
CSV_MONITOR = _monitor(CSVSettings, _OUT, _OUT_CHECKS)
WANDB = _monitor(WandbSettings, {
    "enabled": "log the events to W&B (MetricsLogger, rank 0)",
    "group": "W&B group of the run",
    "team": "W&B entity (team or user)",
    "project": "W&B project",
}, {"enabled": boolean(), "group": optional(string()), "team": optional(string()),
    "project": string()})
COMET = _monitor(CometSettings, {
    "enabled": "log the events to Comet (MetricsLogger, rank 0)",
    "samples_log_interval": "send each event at most once per this many samples",
    "project": "Comet project (or COMET_PROJECT_NAME)",
    "workspace": "Comet workspace (or COMET_WORKSPACE)",
    "api_key": "Comet API key (or COMET_API_KEY)",
    "experiment_name": "name of the experiment",
    "experiment_key": "key of an existing experiment to continue",
    "online": "false: log to an offline experiment",
    "mode": "comet_ml.start mode: get, create or get_or_create",
}, {"enabled": boolean(), "samples_log_interval": integer(ge=1), "project": optional(string()),
    "workspace": optional(string()), "api_key": optional(string()),
    "experiment_name": optional(string()), "experiment_key": optional(string()),
    "online": optional(boolean()), "mode": optional(string())})
FLOPS_PROFILER = _monitor(FlopsProfilerSettings, {
    "enabled": "report FLOPs per step and MFU (needs MetricsLogger(flops_per_token=...))",
    "recompute_fwd_factor": "share of the forward FLOPs recomputed in backward (checkpointing)",
    "profile_step": "report at the first log step at or after this step",
    "module_depth": "depth of the per-module table of FlopsCount.table (-1: all)",
    "top_modules": "modules per depth in that table",
    "detailed": "accepted for DeepSpeed compatibility; the report has one form",
    "output_file": "also write the report to this file",
}, {"enabled": boolean(), "recompute_fwd_factor": number(ge=0), "profile_step": integer(ge=1),
    "module_depth": integer(ge=-1), "top_modules": integer(ge=1), "detailed": boolean(),
    "output_file": optional(string())})

_DEEPCOMPILE = (
    "a DeepCompile option; funczero compiles each unit's forward regionally and keeps its "
    "collectives eager (DeepCompile's graph passes do not apply)"
)
COMPILE: dict[str, Key] = _ds_block({
    "enabled": Key(boolean(), False, "compile each unit's forward (torch.compile, one graph per unit type)"),
    "backend": Key(string(), "inductor", "torch.compile backend"),
    "kwargs": Key(
        mapping(), {}, "torch.compile keyword arguments: mode, fullgraph, dynamic, options"
    ),
    "deepcompile": Key(boolean(), False, _DEEPCOMPILE, DEFAULT_ONLY),
    **{
        name: Key(boolean(), default, _DEEPCOMPILE, IGNORED)
        for name, default in {
            "free_activation": False, "offload_activation": False, "offload_opt_states": False,
            "offload_parameters": False, "double_buffer": True, "symmetric_memory": False,
            "debug_log": False, "sync_before_reduce": False, "sync_after_reduce": False,
            "sync_before_allgather": False, "sync_after_allgather": False,
            "keep_int_input_tensors": True, "keep_all_input_tensors": False,
        }.items()
    },
})

SECTIONS: dict[str, dict[str, Key]] = {
    "": TOP,
    "optimizer": OPTIMIZER_BLOCK,
    "scheduler": SCHEDULER_BLOCK,
    "fp16": FP16,
    "bf16": BF16,
    "zero_optimization": ZERO,
    "zero_optimization.offload_param": OFFLOAD_PARAM,
    "zero_optimization.offload_optimizer": OFFLOAD_OPTIMIZER,
    "data_types": DATA_TYPES,
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
    "compile": COMPILE,
    "funczero": FUNCZERO,
    "tensorboard": TENSORBOARD,
    "wandb": WANDB,
    "csv_monitor": CSV_MONITOR,
    "comet": COMET,
    "flops_profiler": FLOPS_PROFILER,
}

# --- optimizer params ------------------------------------------------------------------------

_LR_HINT = "from --learning_rate"


def _lr(default: float) -> Key:
    return Key(number(ge=0), default, "learning rate (or the schedule's base)",
               auto=Auto.ERROR, hint=_LR_HINT)


def _hf(key: Key) -> Key:
    """The HF Trainer fills these from arguments whose defaults equal DeepSpeed's defaults."""
    return dataclasses.replace(key, auto=Auto.DEFAULT)


_BETAS = _hf(Key(betas(), (0.9, 0.999), "coefficients of the first and second moments"))
_WD = _hf(Key(number(ge=0), 0.0, "weight decay"))
_GRAD_NONE = Key(boolean(), True, "funczero has no .grad attributes to reset", IGNORED)
_ONE_IMPL = "funczero has one implementation"
_TORCH_KWARGS = {
    "maximize": Key(boolean(), False, "maximising the objective is not implemented", DEFAULT_ONLY),
    "foreach": Key(optional(boolean()), None, "a torch kernel choice; " + _ONE_IMPL, IGNORED),
    "fused": Key(optional(boolean()), None, "a torch kernel choice; " + _ONE_IMPL, IGNORED),
    "differentiable": Key(boolean(), False, "a torch autograd option; " + _ONE_IMPL, IGNORED),
}

_ADAM: dict[str, Key] = {
    "lr": _lr(1e-3),
    "betas": _BETAS,
    "eps": _hf(Key(number(ge=0), 1e-8, "added to the denominator")),
    "weight_decay": _WD,
    "adam_w_mode": Key(
        boolean(), True,
        "true: decoupled weight decay (AdamW); false: L2 added to the gradient. "
        "Type AdamW ignores it, as in DeepSpeed",
    ),
    "bias_correction": Key(boolean(), True, "funczero's Adam always bias-corrects", DEFAULT_ONLY),
    "amsgrad": Key(boolean(), False, "AMSGrad (DeepSpeed's FusedAdam rejects it too)",
                   DEFAULT_ONLY),
    "torch_adam": Key(boolean(), False, "selects torch's Adam in DeepSpeed; " + _ONE_IMPL,
                      IGNORED),
    "set_grad_none": _GRAD_NONE,
}

OPTIMIZER_PARAMS: dict[str, dict[str, Key]] = {
    "Adam": _ADAM,
    "AdamW": _ADAM,
    "Lamb": {
        "lr": _lr(1e-3),
        "betas": _BETAS,
        "eps": _hf(Key(number(ge=0), 1e-8, "added to the denominator")),
        "weight_decay": _WD,
        "bias_correction": Key(boolean(), True, "bias-correct the moments"),
        "max_coeff": Key(number(gt=0), 10.0, "upper clamp of the trust ratio"),
        "min_coeff": Key(number(ge=0), 0.01, "lower clamp of the trust ratio"),
        "eps_inside_sqrt": Key(boolean(), False, "eps inside the square root is not implemented",
                               DEFAULT_ONLY),
        "amsgrad": Key(boolean(), False, "AMSGrad is not implemented", DEFAULT_ONLY),
    },
    "Lion": {
        "lr": _lr(1e-3),
        "betas": Key(betas(), (0.9, 0.999), "interpolation and momentum coefficients",
                     auto=Auto.DEFAULT),
        "weight_decay": _WD,
        "set_grad_none": _GRAD_NONE,
    },
    "SGD": {
        "lr": _lr(1e-3),
        "momentum": Key(number(ge=0), 0.0, "momentum factor"),
        "dampening": Key(number(ge=0), 0.0, "dampening of the momentum"),
        "weight_decay": _WD,
        "nesterov": Key(boolean(), False, "Nesterov momentum (needs momentum > 0, dampening 0)"),
        **_TORCH_KWARGS,
    },
    "Adagrad": {
        "lr": _lr(1e-2),
        "lr_decay": Key(number(ge=0), 0.0, "learning-rate decay"),
        "weight_decay": _WD,
        "initial_accumulator_value": Key(number(ge=0), 0.0, "start value of the sum of squares"),
        "eps": Key(number(ge=0), 1e-10, "added to the denominator"),
        **_TORCH_KWARGS,
    },
}

# lower-case name -> canonical spelling (DeepSpeed matches its own names case-insensitively)
OPTIMIZER_TYPES: Mapping[str, str] = {name.lower(): name for name in OPTIMIZER_PARAMS}

UNSUPPORTED_OPTIMIZERS: Mapping[str, str] = {
    "onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb",
    "muon": "Muon", "muadam": "MuAdam", "muadamw": "MuAdamW", "musgd": "MuSGD",
}

UNSUPPORTED_FEATURES: Mapping[str, str] = {
    # known DeepSpeed top-level keys that funczero rejects with a reason (not "unknown key")
    "pipeline": "pipeline parallelism",
    "tensor_parallel": "tensor parallelism",
    "sequence_parallel_size": "sequence parallelism",
    "compression_training": "compression training",
    "sparse_attention": "DeepSpeed sparse attention",
    "curriculum_learning": "legacy curriculum learning",
    "hybrid_engine": "the RLHF hybrid engine",
    "quantize_training": "quantisation-aware training",
}


# --- scheduler params --------------------------------------------------------------------------
# Which schedule takes which parameter, and the defaults, belong to the schedule implementation
# (funczero.optim.deepspeed_schedules.DEEPSPEED_SCHEDULES); this table only checks each value, so
# that a value that cannot train is an error naming its key before any schedule is built.

_FLOAT32_MAX = 3.4028234663852886e38
_SCHED_LR = Key(
    number(ge=0, le=_FLOAT32_MAX), None,
    "a learning rate: finite, >= 0 and within float32 (schedules are evaluated in float32)",
)
_STEPS = Key(integer(ge=1), None, "a number of steps")
_STAIRS = Key(integer(ge=0), None, "stairs per half cycle; 0: no stairs")
_MOMENTUM = Key(number(ge=0, lt=1), None, "a momentum (drives the optimizer's beta1)")

SCHEDULER_PARAMS: dict[str, Key] = {
    "warmup_min_lr": dataclasses.replace(_SCHED_LR, auto=Auto.COMPUTED),
    "warmup_max_lr": Key(
        optional(_SCHED_LR.check), None, _SCHED_LR.doc + "; WarmupLR: null is the optimizer's lr",
        auto=Auto.COMPUTED,
    ),
    "warmup_num_steps": Key(
        integer(ge=0), None,
        "a number of steps; 0 is stored as 1 (DeepSpeed warms up over max(2, n) steps, so 0, 1 "
        "and 2 are one schedule; 0 is the HF Trainer's default warmup)",
    ),
    "warmup_type": Key(choice("log", "linear"), None, "the shape of the warmup"),
    "total_num_steps": _STEPS,
    "warmup_min_ratio": Key(number(ge=0), None, "the lr at the start of warmup, over base lr"),
    "cos_min_ratio": Key(number(ge=0), None, "the lr at the end of the cosine, over base lr"),
    "cycle_min_lr": _SCHED_LR,
    "cycle_max_lr": _SCHED_LR,
    "decay_lr_rate": Key(number(ge=0), None, "lr decay after the cycle; 0: none"),
    "cycle_first_step_size": _STEPS,
    "cycle_second_step_size": Key(
        optional(integer(ge=1)), None, "a number of steps; null: cycle_first_step_size"
    ),
    "cycle_first_stair_count": _STAIRS,
    "cycle_second_stair_count": Key(
        optional(integer(ge=0)), None, _STAIRS.doc + "; null: cycle_first_stair_count"
    ),
    "decay_step_size": Key(integer(ge=0), None, "steps per decay interval; 0: no decay"),
    "cycle_momentum": Key(boolean(), None, "cycle the momentum inversely to the lr"),
    "cycle_min_mom": _MOMENTUM,
    "cycle_max_mom": _MOMENTUM,
    "decay_mom_rate": Key(
        number(), None, "momentum change after the cycle (DeepSpeed's formula: > 0 grows it)"
    ),
    "lr_range_test_min_lr": _SCHED_LR,
    "lr_range_test_step_size": _STEPS,
    "lr_range_test_step_rate": Key(number(ge=0), None, "lr growth per step_size; >= 0"),
    "lr_range_test_staircase": Key(boolean(), None, "grow the lr in steps"),
    "last_batch_iteration": Key(
        integer(), None, "must be -1: a schedule resumes from the checkpointed optimizer count"
    ),
}


def _flatten() -> dict[str, Key]:
    flat: dict[str, Key] = {}
    for prefix, table in SECTIONS.items():
        for name, key in table.items():
            flat[f"{prefix}.{name}" if prefix else name] = key
    return flat


KEYS: Mapping[str, Key] = _flatten()
"""Every accepted key by full dotted path (optimizer params are in OPTIMIZER_PARAMS)."""


def _homes() -> dict[str, str]:
    homes: dict[str, set[str]] = {}
    for prefix, table in SECTIONS.items():
        for name in table:
            homes.setdefault(name, set()).add(prefix)
    for params in OPTIMIZER_PARAMS.values():
        for name in params:
            homes.setdefault(name, set()).add("optimizer.params")
    return {name: next(iter(p)) for name, p in homes.items() if len(p) == 1}


KEY_HOMES: Mapping[str, str] = _homes()
"""Key name -> the one block it belongs to ('' is the top level), for "belongs in" hints.

Names that occur in several blocks (``enabled``, ``lr``...) are left out."""


def default(path: str) -> Any:
    """Return funczero's default for the key at ``path`` (used as the dataclass defaults)."""
    return KEYS[path].default
