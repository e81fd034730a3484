"""First-party run loggers (TensorBoard)."""
