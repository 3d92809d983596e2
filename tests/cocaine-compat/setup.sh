#!/usr/bin/env bash
# Creates the virtualenv for the Cocaine compatibility test (crates/nodus-engine/tests/cocaine_compat.rs):
# the real PyPI `cocaine==0.12.14.5` framework and the versions it needs, on the machine's python3.
#
# Path: $NODUS_PYENV, default ${HOME}/.cache/nodus-cocaine-venv. An existing venv that already
# imports cocaine is reused. The package itself is never modified: Python >= 3.10 removed the ABC
# aliases in `collections` that tornado 4 and cocaine use, so a sitecustomize.py in the venv's
# site-packages puts them back from collections.abc at interpreter start.
set -euo pipefail

VENV="${NODUS_PYENV:-${HOME}/.cache/nodus-cocaine-venv}"
PYTHON="${PYTHON:-python3}"

if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import cocaine.services, cocaine.worker' 2>/dev/null; then
    echo "cocaine venv ready: $VENV"
    exit 0
fi

echo "creating cocaine venv in $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
# cocaine 0.12.14.5 pins six 1.9..1.10 and tornado 4.2..4.x; msgpack < 1.0 keeps the raw (bytes)
# decoding defaults the framework was written for.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    'cocaine==0.12.14.5' 'msgpack<1.0' 'tornado>=4.2,<5' 'six>=1.9,<=1.10'

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cat > "$SITE/sitecustomize.py" <<'PY'
# Written by nodus tests/cocaine-compat/setup.sh: restores the collections ABC aliases removed in
# Python 3.10 (tornado 4 and cocaine 0.12 still use them), without touching either package.
import collections
import collections.abc

for _name in ("Awaitable", "Callable", "Container", "Coroutine", "Generator", "Hashable", "ItemsView",
              "Iterable", "Iterator", "KeysView", "Mapping", "MappingView", "MutableMapping",
              "MutableSequence", "MutableSet", "Sequence", "Set", "Sized", "ValuesView"):
    if not hasattr(collections, _name):
        setattr(collections, _name, getattr(collections.abc, _name))
PY

"$VENV/bin/python" -c 'import cocaine.services, cocaine.worker, tornado, msgpack; print("cocaine venv ready:", tornado.version, msgpack.version)'
