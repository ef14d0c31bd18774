"""The flow model, pure: cells, their reads and writes, the prelude, the graph. No I/O, no IPython."""
