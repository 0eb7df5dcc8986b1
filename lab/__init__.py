"""Studies and A/B experiments behind the numbers in docs/: not part of the installed package.

Run from the repository root, e.g. ``python -m lab.serving_ab EXPORT_DIR --b intra_op_spinning=never``.
They import the product (``tritonembed.*``); nothing in ``tritonembed.*`` imports them.
"""
