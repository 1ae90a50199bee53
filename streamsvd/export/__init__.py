"""Exports of a streamsvd output to formats other runtimes read (`streamsvd export FORMAT OUT_DIR DIR`).

Each format lives in its own module and imports its libraries only when called, so importing this
package costs nothing.
"""
