"""FastAPI service that serves a trained AlexNet checkpoint with dynamic batching."""
