"""Where slimray runs: settings, the embedded-or-remote Ray decision, storage and runtime environments.

Nothing in here knows about models or data; `jobs/`, `tuning/` and `serve_app/` import from it.
"""
