from overnight.cli import entry

entry()
