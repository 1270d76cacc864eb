"""Shared core of the TreePO pipeline: config, wire messages, streams, tree sampling, advantages.

Everything here imports without torch, vLLM or DeepSpeed so that any process (and any test) can
use it. Process code lives in ``workers/`` (samplers) and ``learner/``.
"""

__version__ = "0.1.0"
