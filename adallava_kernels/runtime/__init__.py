"""The plan runtime: plan once per request on the host, run on the device with no host sync.

- :class:`PlannedDecoder`: a transformers Llama decoder serving requests
  under execution plans over a paged layer-skip KV pool (``admit``,
  ``prefill``, ``decode`` -> a running :class:`DecodeBatch`, ``free``);
- :class:`DecoderWeights`: the decoder's weights in the kernels' layout;
- plan, bind, run: :mod:`.rows` (a request's plan on the device, made once),
  :mod:`.slots` (a running batch's rows as slots of persistent buffers, and
  their union, derived on the device), :mod:`.step` (one decode step over the
  slots, the same launches whatever the plans);
- :class:`LayerProgram`: one layer under one layer plan, for prefill
  (:mod:`.cohorts`: the rows that run one program together);
- :class:`GraphCache`: the bounded cache of captured decode steps.
"""

from .graphs import GraphCache, GraphStats
from .layers import LayerProgram
from .decode import DecodeBatch
from .runner import PlannedDecoder, Request
from .rows import RowPlan
from .slots import BUCKETS, BatchSlots, LayerSlots, bucket_of
from .step import SlotLayer
from .weights import DecoderWeights, LayerWeights

__all__ = ["BUCKETS", "BatchSlots", "DecodeBatch", "DecoderWeights", "GraphCache", "GraphStats", "LayerProgram",
           "LayerSlots", "LayerWeights", "PlannedDecoder", "Request", "RowPlan", "SlotLayer", "bucket_of"]
