"""A real S3 API on loopback for the storage tests and benchmark: moto's S3 service (the same application as
`moto_server`), served over HTTP, behind a fault injector.

    python -m tests.support.s3_server PORT       prints "READY <port>" once it answers

Fault injection, over HTTP so a test can switch it while an `engine run` talks to the server:
  POST /_faults?status=503&next=N     the next N requests (other than /_faults) answer `status`
                                      with S3's SlowDown/ServiceUnavailable error body
  POST /_faults?status=503&every=K    every K-th request answers `status` (0: off)
  GET  /_faults                       counts so far (JSON)
"""
import json
import sys
import threading
from urllib.parse import parse_qs

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

ERROR = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>injected by the test server'
         '</Message><RequestId>fault</RequestId></Error>')


class Faults:
    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()
        self.status, self.next, self.every, self.seen, self.injected = 503, 0, 0, 0, 0

    def __call__(self, environ, start_response):
        req = Request(environ)
        if req.path == "/_faults":
            if req.method == "POST":
                q = parse_qs(req.query_string.decode())
                with self.lock:
                    self.status = int(q.get("status", [self.status])[0])
                    self.next = int(q.get("next", [0])[0])
                    self.every = int(q.get("every", [0])[0])
            body = json.dumps({"seen": self.seen, "injected": self.injected, "next": self.next, "every": self.every})
            return Response(body, mimetype="application/json")(environ, start_response)
        with self.lock:
            self.seen += 1
            fail = self.next > 0 or (self.every and self.seen % self.every == 0)
            if self.next > 0:
                self.next -= 1
            if fail:
                self.injected += 1
        if fail:
            code = "SlowDown" if self.status == 503 else "InternalError"
            return Response(ERROR.format(code=code), status=self.status,
                            mimetype="application/xml")(environ, start_response)
        return self.app(environ, start_response)


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    app = Faults(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True)
    print(f"READY {server.server_port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
