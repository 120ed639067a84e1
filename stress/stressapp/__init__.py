"""The stress suite's app: one load-balanced model and its plain twins."""
