"""Expert offloading: hot experts on the GPU, cold experts from CPU RAM (see issue: offload manager)."""
