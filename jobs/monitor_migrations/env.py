"""alembic environment of the monitor store: migrations run on the connection jobs.monitor.upgrade hands in."""

from alembic import context

from jobs.monitor import METADATA

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the monitor's migrations through jobs.monitor.upgrade (MonitorStore.open does)")
context.configure(connection=connection, target_metadata=METADATA, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
