"""slimray's command line: ``slimray <stage> …``. Only the front end lives here; nothing imports it."""
