"""The registry client: auth challenges, redirects, digests and network failures.

A small registry of our own (an HTTP server on 127.0.0.1) plays the misbehaving registry
no real one can be made to be: one that lies about digests, redirects blobs to another
host, never answers, or speaks schema1. Token caching is checked against the real one.
"""

import base64
import gzip
import hashlib
import http.server
import io
import json
import socket
import ssl
import tarfile
import threading

import pytest

from agent.containerizer.provisioner import Provisioner
from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner.errors import ImageError
from agent.containerizer.provisioner.registry import Registry, is_loopback, parse_challenge
from tests.images import busybox_images  # noqa: F401


class FakeRegistry:
    """Serves `routes[path] -> (status, headers, body)` and records every request."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict[str, tuple] = {}
        self.requests: list[tuple[str, dict]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                fake.requests.append((self.path, dict(self.headers)))
                status, headers, body = fake.routes.get(self.path, (404, {}, b"{}"))
                if callable(body):
                    status, headers, body = body(self)
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.httpd.server_address[1]
        self.host = f"{host}:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    """A registry of our own on 127.0.0.1, stopped after the test."""
    server = FakeRegistry()
    yield server
    server.stop()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def serve_image(fake: FakeRegistry, *, layer_body=None, config_body=None,
                manifest_type=mf.DOCKER_MANIFEST) -> dict:
    """Put a one-layer image `x/y:t` on the fake registry; parts can be replaced to lie."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    layer = gzip.compress(buf.getvalue())
    config = json.dumps({"os": "linux", "architecture": "amd64", "config": {"Cmd": ["/hello"]},
                         "rootfs": {"type": "layers",
                                    "diff_ids": [_digest(buf.getvalue())]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": manifest_type,
                           "config": {"mediaType": mf.DOCKER_CONFIG, "digest": _digest(config),
                                      "size": len(config)},
                           "layers": [{"mediaType": mf.DOCKER_LAYER, "digest": _digest(layer),
                                       "size": len(layer)}]}).encode()
    fake.routes["/v2/"] = (200, {}, b"{}")
    fake.routes["/v2/x/y/manifests/t"] = (200, {"Content-Type": manifest_type}, manifest)
    fake.routes[f"/v2/x/y/blobs/{_digest(config)}"] = (200, {}, config_body or config)
    fake.routes[f"/v2/x/y/blobs/{_digest(layer)}"] = (200, {}, layer_body or layer)
    return {"layer": layer, "layer_digest": _digest(layer), "config": config}


def pull(tmp_path, name, **options):
    p = Provisioner(str(tmp_path / "store"), **options)
    return p.provision("c1", {"type": "DOCKER", "docker": {"name": name}})


def test_an_image_pulls_from_a_minimal_registry(tmp_path, fake):
    """The fake registry serves a valid image (so the failures below are the lies alone)."""
    serve_image(fake)
    rootfs = pull(tmp_path, f"{fake.host}/x/y:t")
    assert rootfs.config.cmd == ("/hello",)
    manifest_request = next(h for p, h in fake.requests if "manifests" in p)
    assert [a.strip() for a in manifest_request["Accept"].split(",")] == list(mf.ACCEPT)


def test_a_layer_that_is_not_what_its_digest_says_is_refused(tmp_path, fake):
    """A registry that serves other bytes for a layer digest fails the pull."""
    good = serve_image(fake)
    other = gzip.compress(gzip.decompress(good["layer"]), compresslevel=1, mtime=1)
    assert other != good["layer"]  # the same tar, other bytes
    serve_image(fake, layer_body=other)
    with pytest.raises(ImageError, match="what was downloaded has digest"):
        pull(tmp_path, f"{fake.host}/x/y:t")


def test_a_config_that_is_not_what_its_digest_says_is_refused(tmp_path, fake):
    """The image config is checked against its digest before it is believed."""
    serve_image(fake, config_body=json.dumps({"rootfs": {"type": "layers",
                                                         "diff_ids": []}}).encode())
    with pytest.raises(ImageError, match="content has digest"):
        pull(tmp_path, f"{fake.host}/x/y:t")


def test_a_digest_reference_checks_the_manifest(tmp_path, fake):
    """`name@sha256:...` refuses a manifest with another digest."""
    serve_image(fake)
    wrong = "sha256:" + "1" * 64
    fake.routes[f"/v2/x/y/manifests/{wrong}"] = fake.routes["/v2/x/y/manifests/t"]
    with pytest.raises(ImageError, match="the manifest of .* has digest"):
        pull(tmp_path, f"{fake.host}/x/y@{wrong}")


def test_schema1_is_refused_with_what_to_do(tmp_path, fake):
    """A schema1 manifest (what a registry sends when the Docker type is not accepted)."""
    fake.routes["/v2/"] = (200, {}, b"{}")
    fake.routes["/v2/x/y/manifests/t"] = (
        200, {"Content-Type": mf.DOCKER_SCHEMA1[1]}, json.dumps({"schemaVersion": 1}).encode())
    with pytest.raises(ImageError, match="schema1 manifests are not supported: push"):
        pull(tmp_path, f"{fake.host}/x/y:t")


def test_blob_redirects_are_followed_without_the_credentials(fake):
    """A blob redirected to another host is fetched there, without our Authorization."""
    storage = FakeRegistry()
    try:
        storage.routes["/bucket/blob"] = (200, {}, b"blob bytes")
        digest = _digest(b"blob bytes")

        def guarded(handler):
            if handler.headers.get("Authorization") is None:
                return 401, {"WWW-Authenticate": 'Basic realm="fake"'}, b"{}"
            if handler.path.startswith("/v2/x/y/blobs/"):
                return 307, {"Location": f"http://localhost:{storage.port}/bucket/blob"}, b""
            return 200, {}, b"{}"

        fake.routes["/v2/"] = (0, {}, guarded)
        fake.routes[f"/v2/x/y/blobs/{digest}"] = (0, {}, guarded)
        registry = Registry(fake.host, credentials=("user", "pw"))
        with registry.blob("x/y", digest, "x/y") as body:
            assert body.read() == b"blob bytes"
        sent = base64.b64decode(fake.requests[-1][1]["Authorization"].split()[1])
        assert sent == b"user:pw"
        assert storage.requests and all("Authorization" not in h for _, h in storage.requests)
    finally:
        storage.stop()


def test_redirect_loops_end(fake):
    """A registry redirecting forever gets an error, not a hang."""
    fake.routes["/v2/"] = (302, {"Location": "/v2/"}, b"")
    with pytest.raises(ImageError, match="more than 5 redirects"):
        Registry(fake.host).check()


@pytest.mark.parametrize("route, words", [
    ((404, {}, b"not here"), "is not a Docker registry v2"),
    ((500, {}, b'{"errors": [{"code": "UNKNOWN", "message": "disk full"}]}'),
     "answered 500 Internal Server Error for /v2/ (UNKNOWN: disk full)"),
    ((401, {"WWW-Authenticate": 'Negotiate'}, b"{}"), "cannot give: Negotiate"),
    ((401, {"WWW-Authenticate": 'Bearer service="x"'}, b"{}"), "without a realm"),
])
def test_registry_errors_are_reported_with_the_registry_words(fake, route, words):
    """Non-registries, server errors and unmeetable challenges each say what happened."""
    fake.routes["/v2/"] = route
    fake.routes["/v2/x/y/manifests/t"] = route
    with pytest.raises(ImageError) as e:
        Registry(fake.host).manifest("x/y", "t", "x/y:t")
    assert words in str(e.value)


def test_a_registry_that_never_answers_times_out(tmp_path):
    """A registry that accepts the connection and says nothing fails after the timeout."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        host = f"127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(ImageError, match=f"timed out after 0.3s talking to registry {host}"):
            pull(tmp_path, f"{host}/x/y:t", registry_timeout=0.3)
    finally:
        silent.close()


def test_a_registry_that_is_not_there_is_refused_clearly(tmp_path):
    """Nothing listening: the error names the registry and says the connection was refused."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(ImageError, match=f"cannot talk to registry 127.0.0.1:{port}: "
                                         "connection refused"):
        pull(tmp_path, f"127.0.0.1:{port}/x/y:t")


def test_tokens_are_cached_per_repository(tmp_path, busybox_images):
    """Pulls of two tags of one repository through one provisioner fetch one token."""
    host = busybox_images.token_registry
    p = Provisioner(str(tmp_path / "store"),
                    docker_credentials={host: busybox_images.token_credentials})
    issued = len(busybox_images.token_server.issued)
    for i, tag in enumerate(("v2s2", "oci", "multi")):
        p.provision(f"c{i}", {"type": "DOCKER", "cached": False,
                              "docker": {"name": f"{host}/ctrverify/busybox:{tag}"}})
    assert busybox_images.token_server.issued[issued:] == ["repository:ctrverify/busybox:pull"]


def test_challenges_and_loopback_hosts_parse():
    """WWW-Authenticate parameters (quoted, with commas) and which hosts are loopback."""
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/busybox:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                      "scope": "repository:library/busybox:pull,push"}
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
    assert [is_loopback(h) for h in ("127.0.0.1:5000", "127.1.2.3", "localhost:80", "[::1]:5",
                                     "registry-1.docker.io", "10.0.0.1:5000")] == \
        [True, True, True, True, False, False]


def test_https_registries_are_verified(busybox_images):
    """https with a CA that trusts the registry works; without it, the error says the
    certificate is not trusted; plain http to an https registry is refused by it."""
    host = busybox_images.tls_registry
    trusted = Registry(host, secure=True,
                       ssl_context=ssl.create_default_context(cafile=busybox_images.tls_ca))
    data, content_type, digest = trusted.manifest("ctrverify/busybox", "v2s2", "busybox")
    assert content_type == mf.DOCKER_MANIFEST and digest == _digest(data)
    with pytest.raises(ImageError, match="CA certificates do not trust it"):
        Registry(host, secure=True).check()
    with pytest.raises(ImageError, match="answered 400"):
        Registry(host).check()  # loopback: plain http
