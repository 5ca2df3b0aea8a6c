"""daychat: train a GPT-2-grade chat model on one 24 GB GPU in a day.

The library holds the ML and data logic; `stages/` are thin entry points, one per DAG stage.
Nothing here runs at import, and nothing touches CUDA at import.
"""

__version__ = "0.1.0"
