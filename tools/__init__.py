"""Developer tools: the benchmark (`bench`) and the tiny checkpoints in the published formats (`fixtures`)."""
