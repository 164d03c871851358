from modelserve.cli import app

app()
