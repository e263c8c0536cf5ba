"""The plan runtime: plan once per request on the host, run on the device with no host sync.

- :class:`PlannedDecoder`: a transformers Llama decoder serving requests
  under execution plans over a paged layer-skip KV pool (``admit``,
  ``prefill``, ``decode`` -> :class:`DecodeBatch`, ``free``);
- :class:`DecoderWeights`: the decoder's weights in the kernels' layout;
- :class:`LayerProgram`: one layer under one layer plan, resolved at plan time
  (its attention and MLP are the planned ones the drop-in modules run too),
  shared between plans by a :class:`~.layers.ProgramCache`;
- :mod:`.cohorts`: the rows of a batch that run one layer program together;
- :class:`GraphCache`: the bounded cache of captured decode steps.

The device form of a plan is :class:`adallava_kernels.plan.LayerPlan`
(``ExecutionPlan.layers(device)``), built once per (plan, device).
"""

from .graphs import GraphCache, GraphStats
from .layers import LayerProgram
from .decode import DecodeBatch
from .runner import PlannedDecoder
from .weights import DecoderWeights, LayerWeights

__all__ = ["DecodeBatch", "DecoderWeights", "GraphCache", "GraphStats", "LayerProgram", "LayerWeights",
           "PlannedDecoder"]
