#!/usr/bin/env python
# Example procedures app on the real cocaine-framework-python (cocaine==0.12.14.5), run by the
# nodus engine as an app worker. Each procedure is an app event: it reads one chunk, the JSON
# array of its arguments, and writes its result as JSON (a raised exception is "the procedure
# failed", arpcp 400, with the exception's text).
#
# Procedures (declared with their parameters in manifest.json):
#   add(a, b)        the sum of two numbers
#   concat(a, b)     two strings joined
#   echo(value)      its argument back
#   noop()           null
#   fail(message)    raises ValueError(message)
#
# Handlers are plain generator functions: the framework wraps them in tornado's coroutine itself
# (see tests/cocaine-compat/worker_app.py for why not @gen.coroutine under Python 3).
import json

from cocaine.exceptions import ChokeEvent
from cocaine.worker import Worker


def procedure(fn):
    """Wraps fn(*args) -> result as a cocaine handler reading JSON args and writing JSON."""
    def handler(request, response):
        body = b""
        while True:
            try:
                chunk = yield request.read()
            except ChokeEvent:
                break
            body += chunk if isinstance(chunk, bytes) else chunk.encode("utf-8")
        args = json.loads(body.decode("utf-8")) if body else []
        if not isinstance(args, list):
            raise ValueError("arguments must be a JSON array")
        response.write(json.dumps(fn(*args)))
        response.close()
    return handler


def fail(message):
    raise ValueError(message)


PROCEDURES = {
    "add": procedure(lambda a, b: a + b),
    "concat": procedure(lambda a, b: a + b),
    "echo": procedure(lambda value: value),
    "noop": procedure(lambda: None),
    "fail": procedure(fail),
}


def main():
    Worker().run(PROCEDURES)


if __name__ == "__main__":
    main()
