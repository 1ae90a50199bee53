"""Model skeletons, per-layer capture, the low-rank module and loading outputs."""
