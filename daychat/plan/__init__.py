"""Planning before training: the memory model (memory.py), the preflight fit check (preflight.py), scaling."""
