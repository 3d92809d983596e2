#!/usr/bin/env python
# Drives a nodus node with the real cocaine-framework-python client (cocaine==0.12.14.5): resolves
# through the nodus locator, calls the worker_app.py app through its service endpoint, checks every
# answer, and prints one PASS or FAIL line (exit status 0 or 1).
#
# usage: client.py --locator HOST:PORT --app NAME [--tight-app NAME]
import argparse
import logging
import os
import sys
import traceback

from cocaine.exceptions import ServiceError
from cocaine.services import EmptyResponse, Locator, Service
from tornado import gen
from tornado.ioloop import IOLoop

TIMEOUT = 20  # seconds for one answer
LOCATOR_CATEGORY, SERVICE_NOT_AVAILABLE = 10, 1
APP_CATEGORY, QUEUE_FULL = 12, 1
FRAMEWORK_CATEGORY, UNCAUGHT_EXCEPTION, NO_HANDLER = 42, 100, 200


class Failure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failure(what)
    print("ok   %s" % what)
    sys.stdout.flush()


@gen.coroutine
def read_until_close(channel):
    """Every chunk until the service closes the stream."""
    chunks = []
    while True:
        item = yield channel.rx.get(timeout=TIMEOUT)
        if isinstance(item, EmptyResponse):
            return chunks
        chunks.append(item)


@gen.coroutine
def expect_error(future_fn, category, code, what):
    try:
        yield future_fn()
    except ServiceError as e:
        expect((e.category, e.code) == (category, code),
               "%s: error [%s, %s] %r" % (what, e.category, e.code, e.reason))
        return e
    raise Failure("%s: no error" % what)


@gen.coroutine
def echo_session(app, chunks):
    channel = yield app.enqueue("echo")
    for c in chunks:
        yield channel.tx.write(c)
    yield channel.tx.close()
    got = yield read_until_close(channel)
    return got


@gen.coroutine
def run(endpoint, appname):
    # The locator, by its built-in API (as every cocaine client does).
    locator = Locator(endpoints=[endpoint])
    channel = yield locator.resolve("locator")
    endpoints, version, graph = yield channel.rx.get(timeout=TIMEOUT)
    expect(version == 1 and [tuple(e) for e in endpoints] == [(endpoint[0].encode(), endpoint[1])],
           "locator resolves itself at %s" % (endpoints,))
    expect(graph[0][0] == b"resolve", "locator graph has resolve")
    channel = yield locator.resolve("nodus-no-such-app")
    yield expect_error(lambda: channel.rx.get(timeout=TIMEOUT), LOCATOR_CATEGORY, SERVICE_NOT_AVAILABLE,
                       "locator refuses an unknown name")
    locator.disconnect()

    # An unknown service, through the Service client: connect() fails with the locator's error.
    missing = Service("nodus-no-such-app", endpoints=[endpoint], timeout=TIMEOUT)
    yield expect_error(missing.connect, LOCATOR_CATEGORY, SERVICE_NOT_AVAILABLE, "Service(unknown) fails to connect")

    app = Service(appname, endpoints=[endpoint], timeout=TIMEOUT)
    yield app.connect()
    names = sorted(m[0] for m in app.api.values())
    expect(names == [b"control", b"enqueue", b"info"], "app resolved to %s with api %s" % (app.endpoints, names))

    got = yield echo_session(app, ["hello", "world"])
    expect(got == [b"hello", b"world"], "echo returns each chunk: %s" % got)

    channel = yield app.enqueue("stream")
    yield channel.tx.close()
    got = yield read_until_close(channel)
    expect(got == [("chunk-%d" % i).encode() for i in range(5)], "stream sends 5 chunks then closes")

    channel = yield app.enqueue("fail")
    yield channel.tx.close()
    yield expect_error(lambda: channel.rx.get(timeout=TIMEOUT), FRAMEWORK_CATEGORY, UNCAUGHT_EXCEPTION,
                       "fail: the exception comes back as an error")

    channel = yield app.enqueue("no-such-event")
    yield channel.tx.close()
    yield expect_error(lambda: channel.rx.get(timeout=TIMEOUT), FRAMEWORK_CATEGORY, NO_HANDLER,
                       "an event without a handler is an error")

    # Many sessions at once on one connection: channels interleave and stay apart.
    results = yield [echo_session(app, ["s%d-a" % i, "s%d-b" % i]) for i in range(20)]
    expect(all(r == [("s%d-a" % i).encode(), ("s%d-b" % i).encode()] for i, r in enumerate(results)),
           "20 concurrent echo sessions on one connection")

    channel = yield app.info()
    info = yield channel.rx.get(timeout=TIMEOUT)
    expect(info[b"state"] == b"running" and info[b"app"] == appname.encode(), "info: %s" % info)

    # control(): chunk(n) keeps n workers running; a later info on the connection shows it.
    control = yield app.control()
    yield control.tx.chunk(2)
    channel = yield app.info()
    info = yield channel.rx.get(timeout=TIMEOUT)
    expect(info[b"population"] == 2, "control: chunk(2) sets the population: %s" % info[b"population"])
    yield control.tx.chunk(0)

    # The app still works after the failure (the worker survived the exception).
    got = yield echo_session(app, ["again"])
    expect(got == [b"again"], "echo after a failure")
    app.disconnect()


@gen.coroutine
def run_queue_full(endpoint, appname):
    """On an app with one worker, one session at a time and queue-limit 1, a third concurrent
    request gets the distinct queue-full error, and a retry after the others finish succeeds."""
    app = Service(appname, endpoints=[endpoint], timeout=TIMEOUT)
    running = yield app.enqueue("echo")
    yield running.tx.write("first")
    first = yield running.rx.get(timeout=TIMEOUT)
    expect(first == b"first", "%s: first session is running" % appname)
    queued = yield app.enqueue("echo")
    yield queued.tx.write("second")
    refused = yield app.enqueue("echo")
    yield expect_error(lambda: refused.rx.get(timeout=TIMEOUT), APP_CATEGORY, QUEUE_FULL,
                       "%s: a request over the queue limit is refused as queue full" % appname)
    yield running.tx.close()
    rest = yield read_until_close(running)
    yield queued.tx.close()
    second = yield read_until_close(queued)
    expect(rest == [] and second == [b"second"], "%s: the queued request ran after the first" % appname)
    got = yield echo_session(app, ["retried"])
    expect(got == [b"retried"], "%s: the retry succeeds" % appname)
    app.disconnect()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--locator", required=True, help="HOST:PORT of the nodus locator")
    parser.add_argument("--app", required=True, help="name of the app running worker_app.py")
    parser.add_argument("--tight-app", help="an app running worker_app.py with pool-limit 1, concurrency 1 and "
                        "queue-limit 1, to check the queue-full error")
    args = parser.parse_args()
    if os.environ.get("NODUS_COCAINE_DEBUG"):
        log = logging.getLogger("cocaine")  # the framework stops it from propagating
        log.addHandler(logging.StreamHandler(sys.stderr))
        log.setLevel(logging.DEBUG)
    host, _, port = args.locator.rpartition(":")
    try:
        endpoint = (host, int(port))
        IOLoop.current().run_sync(lambda: run(endpoint, args.app), timeout=120)
        if args.tight_app:
            IOLoop.current().run_sync(lambda: run_queue_full(endpoint, args.tight_app), timeout=120)
    except Exception as e:
        traceback.print_exc()
        print("FAIL: cocaine compat: %s: %s" % (type(e).__name__, e))
        sys.stdout.flush()
        return 1
    print("PASS: cocaine compat: cocaine-framework-python %s client and worker against nodus" % version())
    sys.stdout.flush()
    return 0


def version():
    try:
        import pkg_resources
        return pkg_resources.get_distribution("cocaine").version
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
