"""Which replica of a model takes a request: ``policy`` (pure choice logic and the gateway's
in-flight view, table-tested) and ``serve_router`` (its Ray Serve request router), as
``orchestrator.autoscaling`` splits its policy from Serve."""
