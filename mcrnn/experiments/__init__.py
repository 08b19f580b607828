"""Experiments built on the trainer; `demo` is the recall demo of `make demo`."""
