#!/usr/bin/env python
# A Cocaine app written with the real cocaine-framework-python (cocaine==0.12.14.5), run by the nodus
# engine as a worker: the engine starts it with --app --locator --endpoint --uuid --protocol 1.
#
# Events:
#   echo   - writes every chunk it reads back, closes when the caller closes
#   stream - writes "chunk-0" .. "chunk-4", then closes
#   fail   - raises; the framework answers the caller with an error [[42, 100], "..."]
#
# Handlers are plain generator functions: Worker.on() wraps them in tornado's coroutine itself, and
# wrapping an already decorated @gen.coroutine again makes tornado 4 finish the outer future at once
# (with the inner future as its value), so the framework would close the response before the
# handler ran.
import logging
import os

from cocaine.exceptions import ChokeEvent
from cocaine.worker import Worker

STREAM_CHUNKS = 5


def echo(request, response):
    while True:
        try:
            chunk = yield request.read()
        except ChokeEvent:
            break
        response.write(chunk)
    response.close()


def stream(request, response):
    for i in range(STREAM_CHUNKS):
        response.write("chunk-%d" % i)
    response.close()


def fail(request, response):
    raise RuntimeError("failing on purpose")


def main():
    debug_log = os.environ.get("NODUS_COCAINE_WORKER_LOG")
    if debug_log:  # the framework's own debug log, to a file
        log = logging.getLogger("cocaine")
        log.addHandler(logging.FileHandler(debug_log))
        log.setLevel(logging.DEBUG)
    w = Worker()
    w.run({"echo": echo, "stream": stream, "fail": fail})


if __name__ == "__main__":
    main()
