"""Application queries shared by the console and %flow: status, dump, logs, tag and export documents."""
