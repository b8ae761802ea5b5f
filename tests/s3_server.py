"""moto's S3 server on 127.0.0.1 for the remote tests (as dvc-s3's own tests use it), with an outage switch."""

from __future__ import annotations

import logging
import os
import threading

import boto3
from moto.server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

BUCKET = "fxassets-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class Outage:
    """After `after` object uploads (PUT .../files/...), every request gets 503 Service Unavailable until `end()`."""

    def __init__(self) -> None:
        self.after: int | None = None
        self.puts = 0
        self.down = threading.Event()

    def begin_after(self, uploads: int) -> None:
        self.after, self.puts = uploads, 0
        self.down.clear()

    def end(self) -> None:
        self.after = None
        self.down.clear()

    def wrap(self, app):
        def wsgi(environ, start_response):
            if self.after is not None and environ["REQUEST_METHOD"] == "PUT" and "/files/" in environ.get("PATH_INFO", ""):
                self.puts += 1
                if self.puts > self.after:
                    self.down.set()
            if self.down.is_set():
                start_response("503 Service Unavailable", [("Content-Length", "0")])
                return [b""]
            return app(environ, start_response)

        return wsgi


class S3Server(ThreadedMotoServer):
    """ThreadedMotoServer on a free port of 127.0.0.1, its app behind an `Outage`."""

    def __init__(self) -> None:
        super().__init__(ip_address="127.0.0.1", port=0, verbose=False)
        self.outage = Outage()

    def _server_entry(self) -> None:  # ThreadedMotoServer's, with the app wrapped
        app = self.outage.wrap(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
        self._server_ready_event.set()
        self._server.serve_forever()

    @property
    def url(self) -> str:
        host, port = self.get_host_and_port()
        return f"http://{host}:{port}"

    def client(self):
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
                            aws_secret_access_key="testing")

    def objects(self, prefix: str) -> dict[str, int]:
        """{key: bytes} under `prefix` in the test bucket."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def start() -> S3Server:
    """A running server with the test bucket; the process environment gets the fake credentials (DVC reads them)."""
    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = S3Server()
    server.start()
    server.client().create_bucket(Bucket=BUCKET)
    return server
