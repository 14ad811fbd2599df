"""The ``cgw`` command line: one module per noun, wired in ``main``."""
