"""The built-in hooks, one concern per module (see :mod:`megaspan.training.hooks`)."""
