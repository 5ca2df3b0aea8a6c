"""Training: the loop (loop.py), its schedule as data (schedule.py), checkpoints (checkpoint.py),
validation bits per byte (evaluate.py) and run metrics (metrics.py).

Import the modules themselves (`from daychat.train.loop import Trainer`): this package imports nothing,
so that params.py can check batch arithmetic (schedule.py) without loading torch.
"""
