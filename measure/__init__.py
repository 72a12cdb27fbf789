"""Host-agnostic measurement: per-step device timing, peak memory, FLOP counting, statistics and
output comparison. Knows nothing of ComfyUI; the nodes and the bench CLI feed it."""
