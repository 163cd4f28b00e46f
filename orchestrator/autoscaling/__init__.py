"""Queue-depth autoscaling: the pure policy (``policy.py``) and its Ray Serve adapter."""
