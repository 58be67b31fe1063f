"""fedllm."""
