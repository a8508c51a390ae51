"""Pipeline stage split: which layers (and which ends of the model) a pipeline rank holds.

The model's layers are cut into pp * v consecutive pieces, one per *virtual stage*.
Virtual stage s lives on pipeline rank s % pp as its chunk s // pp, so with v > 1 a
rank holds v non-adjacent pieces (interleaved 1F1B), and activations travel around
the pp group as a ring. The embedding belongs to virtual stage 0 (rank 0, chunk 0),
the final norm, head and loss to the last one (rank pp-1, chunk v-1). Under tied
embeddings the last rank also holds `embed.weight` (as the head's weight): both copies
keep the global name, so init, checkpoints and the gradient sum over the embedding
group all find it by name.

Layers are split evenly by default; `parallel.stage_layers` ("2,3,3,2": one count per
virtual stage, in virtual-stage order) gives an explicit split.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalite.errors import ConfigError


@dataclass(frozen=True)
class StageSpec:
    """What one pipeline rank builds: its chunks' global layer ids and the model ends."""
    chunks: tuple  # tuple of tuples of global layer ids, one per local chunk
    first: bool  # holds the embedding (virtual stage 0)
    last: bool  # holds norm, head and loss (the last virtual stage)

    @property
    def layer_ids(self) -> list[int]:
        return [i for chunk in self.chunks for i in chunk]


FULL = None  # a model built without a StageSpec holds everything


def layer_counts(num_layers: int, pp: int, virtual: int, explicit: str = "") -> list[int]:
    """Layers per virtual stage; raises ConfigError when the split is impossible."""
    stages = pp * virtual
    if explicit.strip():
        try:
            counts = [int(c) for c in explicit.split(",")]
        except ValueError:
            raise ConfigError(f"parallel.stage_layers={explicit!r} must be comma-separated "
                              f"integers, one per virtual stage (pp * virtual_stages = "
                              f"{stages}), e.g. '2,3,3,2'.") from None
        if len(counts) != stages or sum(counts) != num_layers or min(counts) < 0:
            raise ConfigError(f"parallel.stage_layers={explicit!r} needs {stages} non-negative "
                              f"counts (pp * virtual_stages) summing to model.num_layers="
                              f"{num_layers}.")
        return counts
    if num_layers % stages:
        raise ConfigError(f"model.num_layers={num_layers} is not divisible by pp * "
                          f"virtual_stages = {pp} * {virtual} = {stages}; change the layer "
                          f"count or give an explicit --parallel.stage_layers=a,b,...")
    return [num_layers // stages] * stages


def stage_spec(num_layers: int, pp: int, virtual: int, pp_rank: int,
               explicit: str = "") -> StageSpec:
    counts = layer_counts(num_layers, pp, virtual, explicit)
    starts = [sum(counts[:s]) for s in range(len(counts))]
    chunks = tuple(tuple(range(starts[s], starts[s] + counts[s]))
                   for s in range(pp_rank, pp * virtual, pp))
    return StageSpec(chunks, first=pp_rank == 0, last=pp_rank == pp - 1)
