"""The task side: the fork server, the task process, and how it executes a step's code."""
