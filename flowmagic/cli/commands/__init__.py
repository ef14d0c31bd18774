"""The console's sub-commands, one module per family."""
