"""The files of a run: the main JSONL, the diagnostics sidecar and the manifest, written, read and merged here alone."""
