"""`streamsvd export FORMAT OUT_DIR DIR`: a finished streamsvd output in a form other tools read.

One module per format (dense.py: an ordinary checkpoint of the base family); the CLI dispatches to
the format's `export_*` function.
"""
