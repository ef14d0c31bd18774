"""The orchestrator: runs a flow's tasks in dependency order and records them (the only metadata writer)."""
