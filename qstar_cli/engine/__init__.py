"""The model loop: two causal LMs on per-slot KV caches, the schedule of the slots, the prompt formats and the sample types."""
