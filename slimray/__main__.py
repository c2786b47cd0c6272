from slimray.cli import app

app()
