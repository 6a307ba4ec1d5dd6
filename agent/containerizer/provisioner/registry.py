"""A blocking Docker Registry HTTP API v2 client: manifests and blobs, with auth.

    GET /v2/                                   is it a v2 registry; which auth it wants
    GET /v2/<repository>/manifests/<ref>       Accept: schema2, OCI manifest, list, index
    GET /v2/<repository>/blobs/<digest>        streamed; redirects followed

Auth follows the challenge a 401 carries (`WWW-Authenticate`): none, `Basic` (credentials
sent on every request), or `Bearer realm=...,service=...,scope=...` (a token fetched from
the realm, with the credentials if there are any, cached per scope until it expires).
Plain http for loopback hosts and the insecure registries; https (system CAs) otherwise.
A redirect to another host drops the Authorization header (S3-style blob storage must not
see registry credentials).

Thread-safe: each request opens its own connection (loopback connections cost ~0.1 ms; a
pull does a handful of requests plus one per layer); the token cache is locked.
Every failure is an ImageError that says what happened and to which registry.
"""

from __future__ import annotations

import base64
import http.client
import ipaddress
import json
import re
import ssl
import threading
import time
import urllib.parse

from agent.containerizer.provisioner import manifest as mf
from agent.containerizer.provisioner.errors import ImageError
from agent.fetcher import _os_reason as os_reason

DEFAULT_TIMEOUT = 60.0
MAX_MANIFEST = 4 << 20
MAX_REDIRECTS = 5
USER_AGENT = "agora-provisioner/0.1"
_CHALLENGE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost (with or without a port)."""
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")]
    elif name.count(":") == 1:
        name = name.split(":")[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_challenge(header: str) -> tuple[str, dict]:
    """(scheme, params) of a WWW-Authenticate header: ('bearer', {'realm': ...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2).replace('\\"', '"') if m.group(2) is not None
                                   else m.group(3))
              for m in _CHALLENGE.finditer(rest)}
    return scheme.lower(), params


class Body:
    """A streamed response body; closing it closes its connection."""

    def __init__(self, response: http.client.HTTPResponse, conn, where: str):
        self._response, self._conn, self._where = response, conn, where

    def read(self, n: int = -1) -> bytes:
        try:
            return self._response.read(n) if n >= 0 else self._response.read()
        except (OSError, http.client.HTTPException) as e:
            raise ImageError(f"download from {self._where} broke off: {os_reason(e)}") from None

    def close(self) -> None:
        self._response.close()
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Registry:
    """One registry host, as `user` (credentials) if given."""

    def __init__(self, host: str, *, secure: bool | None = None,
                 credentials: tuple[str, str] | None = None, timeout: float = DEFAULT_TIMEOUT,
                 ssl_context: ssl.SSLContext | None = None):
        self.host = host
        self.secure = (not is_loopback(host)) if secure is None else secure
        self.credentials = credentials
        self.timeout = timeout
        self._ssl = ssl_context
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # scope -> (token, expiry)
        self._basic = False  # the registry asked for Basic auth
        self._checked = False

    def __repr__(self) -> str:
        return f"Registry({self.host!r})"

    # --- the API ------------------------------------------------------------------------------

    def check(self) -> None:
        """GET /v2/ once: the registry answers (200, or 401 with a challenge we can meet)."""
        if self._checked:
            return
        response, conn = self._get(self._url("/v2/"), {}, self._authorization(None))
        try:
            if response.status == 401:
                # Up, and wants auth: met on the first repository request, whose challenge
                # names the scope. Basic can be sent from then on without asking.
                scheme, _ = parse_challenge(response.getheader("WWW-Authenticate") or "")
                self._basic = scheme == "basic"
            elif response.status == 404:
                raise ImageError(f"{self.host} is not a Docker registry v2 (GET /v2/ "
                                 "answered 404)")
            elif not 200 <= response.status < 300:
                self._failed(response, "/v2/", None, None)
            response.read()
        finally:
            response.close()
            conn.close()
        self._checked = True

    def manifest(self, repository: str, ref: str, name: str) -> tuple[bytes, str | None, str | None]:
        """(body, Content-Type, Docker-Content-Digest) of a manifest; `name` is the image
        as the user wrote it, for messages. The digest is checked when `ref` is one."""
        self.check()
        path = f"/v2/{repository}/manifests/{urllib.parse.quote(ref, safe=':')}"
        headers = {"Accept": ", ".join(mf.ACCEPT)}
        with self._request(path, scope=repository, headers=headers, name=name) as body:
            data = body.read(MAX_MANIFEST + 1)
            content_type = body._response.getheader("Content-Type")
            digest = body._response.getheader("Docker-Content-Digest")
        if len(data) > MAX_MANIFEST:
            raise ImageError(f"the manifest of {name} is larger than {MAX_MANIFEST} bytes")
        return data, content_type, digest

    def blob(self, repository: str, digest: str, name: str) -> Body:
        """The blob `digest` as a stream (the caller checks what it reads against `digest`)."""
        self.check()
        return self._request(f"/v2/{repository}/blobs/{digest}", scope=repository, name=name,
                             what=f"blob {digest}")

    # --- requests -----------------------------------------------------------------------------

    def _request(self, path: str, *, scope: str | None, headers: dict | None = None,
                 name: str | None = None, what: str | None = None) -> Body:
        """GET `path`, answering one auth challenge and following redirects."""
        headers = dict(headers or {})
        auth = self._authorization(scope)
        for attempt in range(2):
            response, conn = self._get(self._url(path), headers, auth)
            if response.status != 401 or attempt == 1:
                break
            challenge = response.getheader("WWW-Authenticate") or ""
            detail = _error_message(response.read(64 << 10))
            response.close()
            conn.close()
            auth = self._answer(challenge, scope, detail)
        if 200 <= response.status < 300:
            return Body(response, conn, self.host)
        try:
            self._failed(response, path, name, what)
        finally:
            response.close()
            conn.close()

    def _failed(self, response, path: str, name: str | None, what: str | None):
        """Raise the ImageError for an unsuccessful response."""
        status = response.status
        detail = _error_message(response.read(64 << 10))
        subject = what or (f"image {name}" if name else path)
        suffix = f" ({detail})" if detail else ""
        if status == 401:
            raise ImageError(f"authentication failed for registry {self.host}{suffix}; check "
                             "the image's credential or --docker-credentials")
        if status == 403:
            raise ImageError(f"registry {self.host} denied access to {subject}{suffix}")
        if status == 404:
            raise ImageError(f"{subject} not found in registry {self.host}{suffix}")
        if status == 429:
            raise ImageError(f"registry {self.host} refused {subject}: too many requests "
                             f"(rate limited){suffix}")
        raise ImageError(f"registry {self.host} answered {status} {response.reason} for "
                         f"{subject}{suffix}")

    def _url(self, path: str) -> str:
        return f"{'https' if self.secure else 'http'}://{self.host}{path}"

    def _get(self, url: str, headers: dict, auth: str | None):
        """(response, connection) of a GET, redirects followed; connection errors raised as
        ImageError."""
        origin = urllib.parse.urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            parts = urllib.parse.urlsplit(url)
            send = {"User-Agent": USER_AGENT, "Host": parts.netloc, **headers}
            if auth and parts.netloc == origin:
                send["Authorization"] = auth
            conn = self._connection(parts)
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=send)
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise ImageError(self._connection_error(parts.netloc, e)) from None
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                response.read()
                response.close()
                conn.close()
                if not location:
                    raise ImageError(f"registry {self.host} redirected without a Location")
                url = urllib.parse.urljoin(url, location)
                continue
            return response, conn
        raise ImageError(f"registry {self.host}: more than {MAX_REDIRECTS} redirects")

    def _connection(self, parts):
        if parts.scheme == "https":
            context = self._ssl or ssl.create_default_context()
            return http.client.HTTPSConnection(parts.netloc, timeout=self.timeout,
                                               context=context)
        if parts.scheme != "http":
            raise ImageError(f"registry {self.host}: cannot follow a {parts.scheme}: URL")
        return http.client.HTTPConnection(parts.netloc, timeout=self.timeout)

    def _connection_error(self, netloc: str, error: BaseException) -> str:
        where = f"registry {self.host}" if netloc == self.host else f"{netloc} (for {self.host})"
        if isinstance(error, TimeoutError):
            return f"timed out after {self.timeout:g}s talking to {where}"
        message = f"cannot talk to {where}: {os_reason(error)}"
        if isinstance(error, ssl.SSLCertVerificationError):
            message += " (this host's CA certificates do not trust it)"
        elif isinstance(error, ssl.SSLError):
            message += "; if it serves plain HTTP, list it in --docker-insecure-registries"
        return message

    # --- auth ---------------------------------------------------------------------------------

    def _authorization(self, scope: str | None) -> str | None:
        with self._lock:
            if scope is not None and scope in self._tokens:
                token, expiry = self._tokens[scope]
                if time.monotonic() < expiry:
                    return f"Bearer {token}"
        if self._basic and self.credentials:
            return _basic(self.credentials)
        return None

    def _answer(self, challenge: str, scope: str | None, detail: str) -> str:
        """The Authorization header that meets a 401's challenge (ImageError if none can)."""
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials:
                raise ImageError(f"registry {self.host} requires authentication (Basic); give "
                                 "the image a credential or set --docker-credentials")
            self._basic = True
            return _basic(self.credentials)
        if scheme == "bearer":
            return f"Bearer {self._token(params, scope)}"
        raise ImageError(f"registry {self.host} asked for authentication we cannot give: "
                         f"{challenge or 'no WWW-Authenticate header'}"
                         + (f" ({detail})" if detail else ""))

    def _token(self, params: dict, scope: str | None) -> str:
        realm = params.get("realm")
        if not realm:
            raise ImageError(f"registry {self.host} sent a Bearer challenge without a realm")
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        wanted = params.get("scope") or (f"repository:{scope}:pull" if scope else None)
        if wanted:
            query["scope"] = wanted
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ImageError(f"registry {self.host}: token realm {realm!r} is not http(s)")
        if parts.scheme == "http" and not is_loopback(parts.netloc) and self.secure:
            raise ImageError(f"registry {self.host}: refusing to send credentials to the "
                             f"plain-http token realm {realm}")
        auth = _basic(self.credentials) if self.credentials else None
        response, conn = self._get(url, headers, auth)  # credentials go to the realm's host
        try:
            data = response.read(1 << 20)
            status = response.status
        finally:
            response.close()
            conn.close()
        if status == 401 or status == 403:
            detail = f" ({_error_message(data)})" if _error_message(data) else ""
            if not self.credentials:
                raise ImageError(f"registry {self.host} requires authentication (its token "
                                 f"server {parts.netloc} gives no anonymous token){detail}; "
                                 "give the image a credential or set --docker-credentials")
            raise ImageError(f"authentication failed for registry {self.host}: the token "
                             f"server {parts.netloc} refused the credentials{detail}")
        if status != 200:
            raise ImageError(f"the token server {parts.netloc} of registry {self.host} "
                             f"answered {status}")
        try:
            doc = json.loads(data)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"the token server {parts.netloc} of registry {self.host} sent "
                             "no token")
        lifetime = doc.get("expires_in") if isinstance(doc.get("expires_in"), int) else 60
        if scope is not None:
            with self._lock:
                # Renew a little early: a token that expires in flight costs a failed request.
                self._tokens[scope] = (token, time.monotonic() + max(lifetime - 5, 1))
        return token


def _basic(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _error_message(data: bytes) -> str:
    """The registry's own words from an error body ({"errors": [{code, message}]})."""
    try:
        doc = json.loads(data)
        errors = doc.get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ")
                         for e in errors if isinstance(e, dict))
    except (ValueError, AttributeError):
        text = data.decode("utf-8", "replace").strip()
        return text[:200]
