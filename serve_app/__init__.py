"""Serving: the Ray Serve graph (FastAPI ingress + assistant -> batched, autoscaling model replicas).

``app.build_app(args)`` builds it; ``run`` runs it on the embedded cluster (``slimray serve``);
``serve_config.yaml`` deploys it onto a running cluster (``serve deploy``). May import ``cluster`` and
``jobs``. Nothing here runs at import.
"""
