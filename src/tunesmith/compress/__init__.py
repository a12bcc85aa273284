"""Compression of a tuned model: pruning (``prune``) and weight-only int8 quantisation
(``quantize``), and what the result costs (``measure``).

The flow that compresses a finished run, evaluates the result against the tuned model and
writes the report is ``tunesmith.flows.compress``.
"""

from tunesmith.compress.prune import METHODS, PATTERNS, PruneReport, input_norms, prune
from tunesmith.compress.quantize import int8_support, load_int8

__all__ = ["METHODS", "PATTERNS", "PruneReport", "input_norms", "int8_support", "load_int8",
           "prune"]
