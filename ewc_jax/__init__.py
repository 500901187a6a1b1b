"""ewc_jax: Elastic Weight Consolidation for continual learning in JAX.

Pure functions on pytrees: :func:`fisher_diagonal` (importance; :func:`fisher_from_batches`,
:func:`fisher_accumulator` and :func:`fisher_from_nll` for streams and any likelihood),
:func:`ewc_loss` (penalty; :func:`ewc_penalty` the same on a compiled step's memory),
:class:`Anchor` (what is remembered of a task), plus the parity penalties of the reference;
:func:`save_anchors` / :func:`restore_anchors` persist anchors (orbax); :func:`fisher_plan` shows
how each leaf's importance is computed; :func:`add_ewc_gradient` is the p = 2 penalty as an optax
transformation; :func:`path_mask` builds leaf masks. Flax NNX ``State`` works everywhere.
"""

from ewc_jax.anchor_io import restore_anchors
from ewc_jax.anchor_io import save_anchors
from ewc_jax.fisher import KINDS as FISHER_KINDS
from ewc_jax.fisher import LeafPlan
from ewc_jax.fisher import fisher_diagonal
from ewc_jax.fisher import fisher_plan
from ewc_jax.fisher import num_parameters
from ewc_jax.fisher_stream import FisherAccumulator
from ewc_jax.fisher_stream import FisherState
from ewc_jax.fisher_stream import fisher_accumulator
from ewc_jax.fisher_stream import fisher_from_batches
from ewc_jax.fisher_stream import fisher_from_nll
from ewc_jax.masks import path_mask
from ewc_jax.penalty import Anchor
from ewc_jax.penalty import Merged
from ewc_jax.penalty import clarena_loss
from ewc_jax.penalty import empty_anchors
from ewc_jax.penalty import empty_merged
from ewc_jax.penalty import ewc_loss
from ewc_jax.penalty import ewc_penalty
from ewc_jax.penalty import merge_anchor
from ewc_jax.penalty import merged_distance
from ewc_jax.penalty import seed_parity_loss
from ewc_jax.penalty import set_anchor
from ewc_jax.penalty import stack_anchors
from ewc_jax.penalty import weighted_distance
from ewc_jax.transform import add_ewc_gradient

__version__ = "0.1.0"

__all__ = [
    "Anchor", "FISHER_KINDS", "FisherAccumulator", "FisherState", "LeafPlan", "Merged",
    "add_ewc_gradient", "clarena_loss", "empty_anchors", "empty_merged", "ewc_loss", "ewc_penalty",
    "fisher_accumulator", "fisher_diagonal", "fisher_from_batches", "fisher_from_nll",
    "fisher_plan",
    "merge_anchor", "merged_distance", "num_parameters", "path_mask", "restore_anchors",
    "save_anchors", "seed_parity_loss", "set_anchor", "stack_anchors", "weighted_distance",
]
