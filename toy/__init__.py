"""The toy model kit and the demo: a tiny model and task to run and test the pipeline on CPU.

Not part of the product: it may import ``learner`` and ``workers``; nothing in ``pipeline``,
``workers`` or ``learner`` imports it.
"""
