"""Starting ranks: the aiocoll command, the local launcher, launchers' environments, the benchmark."""
