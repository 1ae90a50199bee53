"""`streamsvd export FORMAT OUT_DIR DIR`: a finished streamsvd output in a form other tools read.

One module per format (dense.py: an ordinary checkpoint of the base family; onnx.py: an ONNX decoder
with its KV cache, checked in onnxruntime). Each imports its libraries only when called, so importing
this package costs nothing; the CLI dispatches to the format's `export_*` function.
"""
