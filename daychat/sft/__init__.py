"""Supervised fine-tuning data: sources -> conversations (sources.py, synthetic.py) -> a rendered, held-out
split mixture and the packed batches the training loop reads (batches.py). The stage is stages/sft.py."""
