"""HTTP Basic authentication for the HTTP APIs, as Mesos's `--credentials` with
`--authenticate_http_*` and Marathon's `--http_credentials` do it.

pymesos sends `Authorization: Basic base64(principal:secret)` when its driver is given a
principal and a secret; the `marathon` client sends it for a username and password. A request
without valid credentials gets 401 with a `WWW-Authenticate` challenge (spec mesos-v1-wire.md
§2.1; with authentication off the header is ignored, §5.1 #4).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
from typing import Callable

from agora.http import HTTPError, Request


class Credentials:
    """Principals and their secrets."""

    def __init__(self, secrets: dict[str, str]):
        if not secrets:
            raise ValueError("no credentials given")
        self.secrets = dict(secrets)

    @classmethod
    def parse(cls, text: str) -> Credentials:
        """Mesos's JSON (`{"credentials": [{"principal": p, "secret": s}, ...]}`), or one
        `principal secret` (or `principal:secret`) per line; ValueError says what is wrong."""
        stripped = text.strip()
        secrets: dict[str, str] = {}
        if stripped.startswith("{"):
            try:
                items = json.loads(stripped).get("credentials")
            except (ValueError, AttributeError) as e:
                raise ValueError(f"not Mesos credentials JSON: {e}") from None
            if not isinstance(items, list):
                raise ValueError('expected {"credentials": [{"principal": ..., "secret": ...}]}')
            for item in items:
                if not (isinstance(item, dict) and isinstance(item.get("principal"), str)
                        and isinstance(item.get("secret"), str) and item["principal"]):
                    raise ValueError(f"a credential needs a principal and a secret: {item!r:.80}")
                secrets[item["principal"]] = item["secret"]
        else:
            for n, line in enumerate(stripped.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                principal, sep, secret = line.replace(":", " ", 1).partition(" ")
                if not sep or not principal or not secret.strip():
                    raise ValueError(f"line {n}: expected 'principal secret'")
                secrets[principal] = secret.strip()
        return cls(secrets)

    @classmethod
    def load(cls, path: str) -> Credentials:
        """`parse` of the file at `path`; ValueError names the file and the problem."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.parse(f.read())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"credentials file {path}: {e}") from None

    def check(self, authorization: str | None) -> str | None:
        """The principal an `Authorization` header proves, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            principal, sep, secret = base64.b64decode(token.strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        expected = self.secrets.get(principal)
        if not sep or expected is None:
            return None
        if not hmac.compare_digest(expected.encode(), secret.encode()):
            return None
        return principal


def basic_authorization(principal: str, secret: str) -> str:
    """The `Authorization` header value for `principal` and `secret`."""
    return "Basic " + base64.b64encode(f"{principal}:{secret}".encode()).decode("ascii")


class Authenticator:
    """Asks for one of `credentials` on a request: `principal(request)` names who it is, or
    raises HTTPError 401 with a Basic challenge for `realm`."""

    def __init__(self, credentials: Credentials, realm: str):
        self.credentials, self.realm = credentials, realm

    def principal(self, request: Request) -> str:
        principal = self.credentials.check(request.header("authorization"))
        if principal is None:
            given = request.header("authorization") is not None
            raise HTTPError(401, "Invalid credentials" if given else
                            "This endpoint needs credentials (HTTP Basic authentication)",
                            {"WWW-Authenticate": f'Basic realm="{self.realm}"'})
        return principal

    def guard(self, handler: Callable) -> Callable:
        """`handler`, served only to authenticated requests."""
        def guarded(request):
            self.principal(request)
            return handler(request)
        return guarded
