"""The isolation pipeline's merged parts for every subset of a fusion search.

``fusion.search`` evaluates a merge at many λ as base + Σ c_j vectors[j]; the pipeline's
merge is cores + λ · rest, so each (p, threshold) setting yields two vectors per subset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llora_jax import fusion
from llora_jax import tree as tree_lib
from llora_jax.fusion import isolation_pipeline as pipeline
from llora_jax.fusion.programs import program

PyTree = Any


def pipeline_subsets(
    taus: list[PyTree], subsets: Sequence[Sequence[int]], p: float, threshold: float
) -> tuple[PyTree, list[list[int]]]:
    """Every subset's isolation-pipeline parts, cores (S, ...) then rests (S, ...) on one
    axis (2S, ...): subset s's merge at λ is parts[s] + λ · parts[S + s]. Cores at ``p``
    by |τ| and clusters at ``threshold`` are found per subset (clustering on the host);
    one compiled program per (subset size, p). Also returns each subset's cluster labels.
    """
    cores, rests, labels = [], [], []
    for ix in subsets:
        sub = [taus[i] for i in ix]
        masks = program(fusion.core_masks, p=float(p))(sub)
        found = pipeline.cluster_tasks(pipeline.jaccard_matrix(masks), float(threshold))
        member = np.eye(len(ix), dtype=np.float32)[found]  # [i, c] = 1: task i in cluster c
        core, rest = program(pipeline.pipeline_parts)(sub, masks, member)
        cores.append(core)
        rests.append(rest)
        labels.append([int(x) for x in found])
    return tree_lib.stack(cores + rests), labels
