#!/usr/bin/env python
# A web app written for Cocaine with the real cocaine-framework-python (cocaine==0.12.14.5) and its
# `http` and `wsgi` decorators, run by the nodus engine behind the nodus HTTP gateway.
#
# Events:
#   http    - `http` decorator: answers JSON describing the request (method, uri, version,
#             headers, query arguments, body length and FNV-1a hash, chunks read)
#   stream  - `http` decorator: answers the head and "part-0", waits until `release?id=ID` is
#             called with the same id, then sends "part-1" .. "part-4" and closes
#   release - `http` decorator: wakes the `stream` waiting on `?id=ID`
#   wsgi    - `wsgi` decorator around a plain WSGI application: answers JSON built from the
#             WSGI environ and the body it read
#   fail    - `http` decorator: raises after reading the request
#
# Workarounds for the framework's defects on Python 3 (kept here, never in nodus):
#   - the `http` decorator does not keep the request URI: _HTTPRequest is given a `uri`
#     attribute, taken from the same request chunk it parses;
#   - the `wsgi` decorator compares bytes with str (msgpack 0.6 unpacks strings as bytes): its
#     request handler is replaced by one that decodes the fields first, as `http` does.
import json

import msgpack
from tornado.httputil import HTTPHeaders, HTTPServerRequest
from tornado.locks import Event

from cocaine.decorators import http, http_dec, wsgi
from cocaine.exceptions import ChokeEvent
from cocaine.worker import Worker

_original_init = http_dec._HTTPRequest.__init__


def _init_keeping_uri(self, request, data):
    _original_init(self, request, data)
    self.uri = msgpack.unpackb(data)[1].decode()


http_dec._HTTPRequest.__init__ = _init_keeping_uri


def _tornado_request_decoded(request, data):
    method, uri, version, headers, body = msgpack.unpackb(data)
    version = version.decode()
    if not version.startswith("HTTP"):
        version = "HTTP/" + version
    headers = HTTPHeaders([(k.decode(), v.decode()) for k, v in headers])
    req = HTTPServerRequest(method.decode(), uri.decode(), version, headers, body)
    req.hpack_headers = lambda: request.headers
    return req


http_dec.tornado_request_handler = _tornado_request_decoded


def fnv1a(h, data):
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


FNV_OFFSET = 0xCBF29CE484222325


@http
def describe(request, response):
    req = yield request.read()
    body = req.body
    chunks = 1
    while True:
        try:
            chunk = yield request.read()
        except ChokeEvent:
            break
        body += chunk
        chunks += 1
    answer = {
        "method": req.meta["method"],
        "uri": req.uri,
        "version": req.meta["version"],
        "query": req.request,
        "headers": sorted([k, v] for k, v in req.headers.get_all()),
        "body_len": len(body),
        "body_fnv": "%016x" % fnv1a(FNV_OFFSET, body),
        "chunks": chunks,
    }
    response.write_head(200, [("Content-Type", "application/json"), ("X-Worker", "python-http")])
    response.write(json.dumps(answer))
    response.close()


_gates = {}


def gate(req):
    return _gates.setdefault(req.request.get("id", ""), Event())


@http
def stream(request, response):
    req = yield request.read()
    released = gate(req)
    response.write_head(200, [("Content-Type", "text/plain")])
    response.write("part-0\n")
    yield released.wait()
    for i in range(1, 5):
        response.write("part-%d\n" % i)
    response.close()


@http
def release(request, response):
    req = yield request.read()
    gate(req).set()
    response.write_head(200, [("Content-Type", "text/plain")])
    response.write("released")
    response.close()


@http
def fail(request, response):
    yield request.read()
    raise RuntimeError("failing on purpose")


def wsgi_application(environ, start_response):
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    answer = {
        "method": environ["REQUEST_METHOD"],
        "path": environ["PATH_INFO"],
        "query": environ["QUERY_STRING"],
        "protocol": environ["SERVER_PROTOCOL"],
        "content_type": environ.get("CONTENT_TYPE", ""),
        "body": body.decode("utf-8", "replace"),
    }
    start_response("201 Created", [("Content-Type", "application/json"), ("X-Worker", "python-wsgi")])
    return [json.dumps(answer).encode()]


def main():
    w = Worker()
    w.run({"http": describe, "stream": stream, "release": release, "fail": fail, "wsgi": wsgi(wsgi_application)})


if __name__ == "__main__":
    main()
