"""Examples of extending fedllm."""
