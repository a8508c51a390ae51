"""The workers' start-up checks of a config against its layout, run for the whole grid.

Each worker checks its own share as it starts (`Trainer.__init__`): its TP and SP shards,
its pipeline stage, its data-parallel slice of the batches. A mistake found there fails
under torchrun's traceback, after every rank has started. `check_layout(cfg, data)`
calls the same functions for every rank of tp x sp x dp x pp, with no process group
and no model, so the preflight (megalite/preflight.py) turns any of them into exit 2
and one paragraph before torchrun starts. A new start-up check belongs in a function
the worker calls and in the list below, never copied here.
"""

from __future__ import annotations

from megalite.data.build import DataBundle, resolve_with_data
from megalite.data.sampler import BatchSampler, validation_count
from megalite.model.build import check_model_layout, pipeline_stage
from megalite.parallel.launch import device_type
from megalite.training.metrics import load_sinks
from megalite.training.profiling import parse_profile_steps


def check_layout(cfg, data: DataBundle) -> None:
    """Raise the ConfigError a worker of `cfg`'s layout would raise at start-up.

    `cfg` (validated by load_config) is resolved in place with the tokenizer's vocabulary
    and the workers' device type, as every worker resolves it. `data`: build_data(cfg)."""
    p, t = cfg.parallel, cfg.train
    resolve_with_data(cfg, data, device_type(cfg))
    # Every TP (and SP) rank holds an equal share, the last TP rank's vocabulary rows too
    # (padding, not a smaller shard): one call answers for all of them.
    check_model_layout(cfg, p.tp, p.sp)
    for pp_rank in range(p.pp):  # stages differ: an explicit stage_layers is per rank
        pipeline_stage(cfg, p.pp, pp_rank)
    for dp_rank in range(p.dp):
        BatchSampler(len(data.train), t.global_batch_size, t.seed, dp_rank, p.dp)
    if t.eval_every:  # the trainer validates at step 0 and every eval_every steps
        validation_count(len(data.val), t.eval_batches, t.micro_batch_size, p.dp)
    parse_profile_steps(cfg.log.profile_steps)
    load_sinks(cfg.log.tensorboard, cfg.log.wandb)
