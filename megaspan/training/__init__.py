"""The training job (``megaspan train``): loop, checkpoints, preemption, logging.

Submodules are imported explicitly (``from megaspan.training.trainer import train``) so that
importing this package does not pull in torch or megatron.core.
"""
