#!/bin/sh
# Starts the worker with the Python that has the cocaine framework: $NODUS_PYENV (default
# ~/.cache/nodus-cocaine-venv, built by tests/cocaine-compat/setup.sh). The engine's arguments
# (--app --locator --endpoint --uuid --protocol) pass through.
VENV="${NODUS_PYENV:-$HOME/.cache/nodus-cocaine-venv}"
exec "$VENV/bin/python" "$(dirname "$0")/worker.py" "$@"
