"""Real container images for tests, built the way specs/containerizer-toolchain.md does.

`busybox_images` (session-scoped) builds, once per test run:
- an OCI layout with umoci: layer 1 is a busybox-static rootfs plus a marker
  (`/etc/agora-image` = "busybox"), a hard link, a setuid file, a device node, an xattr and
  files the next layer removes; layer 2 (hand-written tar, `umoci raw add-layer`) deletes
  `/etc/doomed` with a `.wh.` whiteout and makes `/data` opaque (`.wh..wh..opq`) with one new
  file. Config: Cmd `/bin/sh -c 'cat /etc/agora-image'`, Env `PATH=/bin`,
  `AGORA_IMAGE=busybox`, WorkingDir `/srv`;
- that image as an OCI layout directory (`<oci_image_dir>/busybox`, tag `latest`), an OCI
  archive (`<oci_image_dir>/busybox-archive.tar`) and a `docker save` archive
  (`<docker_archive_dir>/ctrverify/busybox:latest.tar`), all with skopeo;
- a real `docker-registry` on 127.0.0.1 holding it as Docker schema2 (`:v2s2`), OCI
  (`:oci`) and OCI with zstd layers (`:zstd`), plus a Docker manifest list (`:multi`) and
  an OCI index (`:multi-oci`) whose other entry is a linux/arm64 image with marker "arm64";
- three more registries on the same storage: htpasswd Basic auth, bearer-token auth with a
  token server of ours (RS256 JWTs, x5c chain, certificate made with `cryptography`), and
  https with a self-signed certificate;
- an AppC ACI (tarfile: `manifest` + `rootfs/`, gzipped) in a store directory and served
  for simple discovery by an HTTP server on 127.0.0.1.

Use from a test module with `from tests.images import busybox_images  # noqa: F401`.
Everything runs on 127.0.0.1 with free ports and is stopped at the end of the session.
Skips (with the reason) when not root or a tool is missing.
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import gzip
import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import attrs
import pytest

from tests.cluster import wait_for
from tests.zookeeper import free_ports

BUSYBOX = "/bin/busybox"
TOOLS = ("umoci", "skopeo", "docker-registry")
REPOSITORY = "ctrverify/busybox"
MARKER = "busybox\n"
IMAGE_ENV = ("PATH=/bin", "AGORA_IMAGE=busybox")
WORKING_DIR = "/srv"
CMD = ("/bin/sh", "-c", "cat /etc/agora-image")
ACI_NAME = "example.com/busybox"
ACI_VERSION = "1.35.0"
BASIC_CREDENTIALS = ("agora", "basic-secret")
TOKEN_CREDENTIALS = ("tokenuser", "token-secret")
TOKEN_SERVICE = "agora-test-registry"
TOKEN_ISSUER = "agora-test-token-server"


def missing_tools() -> list[str]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not os.path.exists(BUSYBOX):
        missing.append("busybox-static")
    return missing


def require_images() -> None:
    """Skip unless real images can be built here (root, and the Debian tools)."""
    if os.geteuid() != 0:
        pytest.skip("building and unpacking real images needs root (ownership, devices, "
                    "trusted.* xattrs)")
    missing = missing_tools()
    if missing:
        pytest.skip(f"image tools missing: {', '.join(missing)} (scripts/test installs them)")


def run(*args, cwd=None) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def tree(root: str) -> dict:
    """Every entry below `root` (not following symlinks) as [type, mode, uid, gid, what]:
    size and sha256 of files, symlink targets, device numbers, plus user./security. xattrs.
    Two root filesystems with the same tree hold the same image."""
    import stat

    out = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            entry = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid]
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as f:
                    entry += [st.st_size, hashlib.sha256(f.read()).hexdigest()]
            elif stat.S_ISLNK(st.st_mode):
                entry.append(os.readlink(path))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry.append(st.st_rdev)
            try:
                names = os.listxattr(path, follow_symlinks=False)
            except OSError:
                names = []
            entry.append(sorted((n, os.getxattr(path, n, follow_symlinks=False).hex())
                                for n in names if n.startswith(("user.", "security."))))
            out[os.path.relpath(path, root)] = entry
    return out


# --- a registry process -------------------------------------------------------------------


class RegistryServer:
    """A `docker-registry serve` on 127.0.0.1, its own config; access log on stderr."""

    def __init__(self, base: str, storage: str, auth: dict | None = None,
                 tls: tuple[str, str] | None = None):
        self.port = free_ports(1)[0]
        self.host = f"127.0.0.1:{self.port}"
        os.makedirs(base, exist_ok=True)
        self.log_path = os.path.join(base, "registry.log")
        config = {"version": 0.1,
                  "log": {"level": "info", "accesslog": {"disabled": False}},
                  "storage": {"filesystem": {"rootdirectory": storage},
                              "delete": {"enabled": True}},
                  "http": {"addr": self.host}}
        if auth:
            config["auth"] = auth
        self.ca = None
        if tls:
            config["http"]["tls"] = {"certificate": tls[0], "key": tls[1]}
            self.ca = tls[0]
        self.config_path = os.path.join(base, "config.yml")
        with open(self.config_path, "w") as f:
            json.dump(config, f)  # YAML is a superset of JSON
        self.proc = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(["docker-registry", "serve", self.config_path],
                                     stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        wait_for(self._answers, timeout=20, what=f"registry {self.host} to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"registry exited: {self.tail()}")
        try:
            if self.ca:
                import ssl
                context = ssl.create_default_context(cafile=self.ca)
                urllib.request.urlopen(f"https://{self.host}/v2/", timeout=1,
                                       context=context).close()
            else:
                urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1).close()
            return True
        except urllib.error.HTTPError:
            return True  # 401: up, and wants auth
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.log.close()

    def tail(self, n: int = 20) -> str:
        with open(self.log_path, "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")

    def gets(self, path: str) -> int:
        """How many GETs of `path` (or paths it ends) answered 200 to our provisioner, by
        the access log."""
        needle = f' {path} HTTP/1.1" 200 '.encode()
        with open(self.log_path, "rb") as f:
            return sum(1 for line in f if b'"GET ' in line and needle in line
                       and b"agora-provisioner" in line)

    def blob_gets(self, digest: str) -> int:
        return self.gets(f"/v2/{REPOSITORY}/blobs/{digest}")


# --- small HTTP servers in this process ---------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class FileServer:
    """Serves a directory on 127.0.0.1 (simple discovery of ACIs); counts requests."""

    def __init__(self, directory: str):
        self.requests: list[str] = []
        server = self

        class Handler(_Quiet):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=directory, **kwargs)

            def do_GET(self):
                server.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class TokenServer:
    """A registry token server: Basic credentials in, an RS256 JWT with an x5c chain out
    (what distribution's `auth: token` verifies against its rootcertbundle)."""

    def __init__(self, base: str, credentials: tuple[str, str]):
        from cryptography.hazmat.primitives import serialization

        self.key, self.cert = self_signed("agora test token signer")
        os.makedirs(base, exist_ok=True)
        self.cert_path = os.path.join(base, "token-cert.pem")
        with open(self.cert_path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))
        self.credentials = credentials
        self.issued: list[str] = []  # the scopes tokens were issued for
        self.refused = 0
        server = self

        class Handler(_Quiet):
            def do_GET(self):
                server._serve(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _serve(self, handler) -> None:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(handler.path).query)
        expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
        if handler.headers.get("Authorization") != expected:
            self.refused += 1
            body = json.dumps({"errors": [{"code": "UNAUTHORIZED",
                                           "message": "bad credentials"}]}).encode()
            handler.send_response(401)
        else:
            scope = (query.get("scope") or [""])[0]
            self.issued.append(scope)
            body = json.dumps({"token": self.token(query["service"][0], scope),
                               "expires_in": 300}).encode()
            handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def token(self, service: str, scope: str) -> str:
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding

        access = []
        if scope:
            kind, name, actions = scope.split(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "x5c": [base64.b64encode(
            self.cert.public_bytes(serialization.Encoding.DER)).decode()]}
        claims = {"iss": TOKEN_ISSUER, "sub": self.credentials[0], "aud": service,
                  "exp": now + 300, "nbf": now - 30, "iat": now, "jti": os.urandom(8).hex(),
                  "access": access}
        signing = b".".join(_b64url(json.dumps(x).encode()) for x in (header, claims))
        signature = self.key.sign(signing, padding.PKCS1v15(), hashes.SHA256())
        return (signing + b"." + _b64url(signature)).decode()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def self_signed(common_name: str, ip: str | None = None):
    """(RSA key, self-signed CA certificate), valid for `ip` too when given."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), True))
    if ip is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(ip))]), False)
    return key, builder.sign(key, hashes.SHA256())


def write_tls(base: str, ip: str = "127.0.0.1") -> tuple[str, str]:
    """(certificate, key) PEM files of a self-signed server certificate for `ip`."""
    from cryptography.hazmat.primitives import serialization

    key, cert = self_signed(f"agora test registry {ip}", ip)
    os.makedirs(base, exist_ok=True)
    cert_path, key_path = os.path.join(base, "tls-cert.pem"), os.path.join(base, "tls-key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def bcrypt(password: str) -> str:
    """A bcrypt hash (htpasswd, as distribution wants) from libcrypt, whatever Python has."""
    libcrypt = ctypes.CDLL("libcrypt.so.1")
    libcrypt.crypt_gensalt.restype = ctypes.c_char_p
    libcrypt.crypt.restype = ctypes.c_char_p
    salt = libcrypt.crypt_gensalt(b"$2b$", 5, None, 0)  # cheap: checked per request
    return libcrypt.crypt(password.encode(), salt).decode()


# --- building -----------------------------------------------------------------------------


@attrs.define
class BusyboxImages:
    """Where the test images are; see the module docstring."""

    base: str
    registry: str = ""  # "127.0.0.1:PORT", anonymous
    registry_server: RegistryServer | None = None
    v2s2_name: str = ""  # "<registry>/ctrverify/busybox:v2s2"
    oci_name: str = ""  # the same image with OCI media types, in the registry
    list_name: str = ""  # a Docker manifest list: linux/amd64 (this) and linux/arm64
    index_name: str = ""  # the same as an OCI index
    zstd_name: str = ""  # OCI, layers compressed with zstd
    docker_archive_dir: str = ""
    docker_archive_name: str = "ctrverify/busybox:latest"
    oci_image_dir: str = ""
    oci_layout_name: str = "busybox:latest"
    oci_archive_name: str = "busybox-archive:latest"
    oci_layout: str = ""  # the umoci-built layout (tag "busybox")
    rootfs: str = ""  # the image unpacked by umoci (whiteouts applied): the expected tree
    aci_store_dir: str = ""
    aci_prefix: str = ""  # "http://127.0.0.1:PORT/"
    aci_name: str = ACI_NAME
    aci_version: str = ACI_VERSION
    aci_id: str = ""  # sha512-<hex>
    aci_server: FileServer | None = None
    basic_registry: str = ""
    basic_server: RegistryServer | None = None
    basic_credentials: tuple = BASIC_CREDENTIALS
    token_registry: str = ""
    token_server: TokenServer | None = None
    token_registry_server: RegistryServer | None = None
    token_credentials: tuple = TOKEN_CREDENTIALS
    tls_registry: str = ""  # https with a self-signed certificate (`tls_ca`)
    tls_ca: str = ""
    tls_server: RegistryServer | None = None
    layer_digests: tuple = ()  # of the v2s2 manifest's (gzipped) layers
    diff_ids: tuple = ()

    def docker_image(self, name: str, credential: tuple | None = None, **extra) -> dict:
        docker = {"name": name}
        if credential:
            docker["credential"] = {"principal": credential[0], "secret": credential[1]}
        return {"type": "DOCKER", "docker": docker, **extra}

    def appc_image(self, with_id: bool = True, **extra) -> dict:
        appc = {"name": self.aci_name,
                "labels": {"labels": [{"key": "version", "value": self.aci_version}]}}
        if with_id:
            appc["id"] = self.aci_id
        return {"type": "APPC", "appc": appc, **extra}

    def stop(self) -> None:
        for server in (self.registry_server, self.basic_server, self.token_registry_server,
                       self.token_server, self.tls_server, self.aci_server):
            if server is not None:
                server.stop()


def _base_rootfs(rootfs: str) -> None:
    for d in ("bin", "proc", "sys", "dev", "etc", "tmp", "root", "srv", "data", "usr/bin"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin/busybox"))
    for applet in run(BUSYBOX, "--list").split():
        if applet != "busybox":
            link = os.path.join(rootfs, "bin", applet)
            if not os.path.lexists(link):
                os.symlink("busybox", link)
    files = {"etc/passwd": "root:x:0:0:root:/root:/bin/sh\nagora:x:1000:1000::/srv:/bin/sh\n",
             "etc/group": "root:x:0:\nagora:x:1000:\n", "etc/agora-image": MARKER,
             "etc/doomed": "this file is deleted by layer 2\n",
             "data/old.txt": "hidden by layer 2's opaque /data\n",
             "usr/bin/suid-file": "#!/bin/sh\n"}
    for path, text in files.items():
        with open(os.path.join(rootfs, path), "w") as f:
            f.write(text)
    os.chmod(os.path.join(rootfs, "usr/bin/suid-file"), 0o4755)
    os.chown(os.path.join(rootfs, "srv"), 1000, 1000)
    os.link(os.path.join(rootfs, "etc/agora-image"), os.path.join(rootfs, "etc/agora-link"))
    os.setxattr(os.path.join(rootfs, "etc/agora-image"), "user.agora", b"marker")
    node = os.path.join(rootfs, "dev/agora-null")
    if not os.path.exists(node):
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))


def whiteout_layer(path: str) -> None:
    """Layer 2: delete /etc/doomed, make /data opaque with one new file."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name, kind=tarfile.REGTYPE, data=b"", mode=0o644):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size, info.mtime = kind, mode, len(data), 1700000000
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("etc", tarfile.DIRTYPE, mode=0o755)
        add("etc/.wh.doomed")
        add("data", tarfile.DIRTYPE, mode=0o755)
        add("data/.wh..wh..opq")
        add("data/new.txt", data=b"new in layer 2\n")


def build_oci(base: str) -> str:
    """The two-layer busybox OCI layout (tag `busybox`) built with umoci; its path."""
    layout = os.path.join(base, "oci")
    bundle = os.path.join(base, "bundle")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:busybox")
    run("umoci", "unpack", "--image", f"{layout}:busybox", bundle)
    _base_rootfs(os.path.join(bundle, "rootfs"))
    run("umoci", "repack", "--image", f"{layout}:busybox", bundle)
    layer2 = os.path.join(base, "layer2.tar")
    whiteout_layer(layer2)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:busybox", layer2)
    config = ["umoci", "config", "--image", f"{layout}:busybox", "--author", "agora-tests",
              "--os", "linux", "--architecture", "amd64", "--config.workingdir", WORKING_DIR]
    for arg in CMD:
        config += ["--config.cmd", arg]
    for env in IMAGE_ENV:
        config += ["--config.env", env]
    run(*config)
    run("umoci", "gc", "--layout", layout)
    shutil.rmtree(bundle)
    return layout


def build_other_arch(base: str, layout: str) -> None:
    """A one-layer linux/arm64 image (marker "arm64") tagged `arm64` in `layout`."""
    run("umoci", "new", "--image", f"{layout}:arm64")
    layer = os.path.join(base, "arm64.tar")
    with tarfile.open(layer, "w") as tar:
        for name, data in (("etc", None), ("etc/agora-image", b"arm64\n")):
            info = tarfile.TarInfo(name)
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:arm64", layer)
    run("umoci", "config", "--image", f"{layout}:arm64", "--os", "linux",
        "--architecture", "arm64", "--config.cmd", "/bin/sh")
    run("umoci", "gc", "--layout", layout)


def build_aci(base: str, rootfs: str) -> tuple[str, str]:
    """(gzipped ACI path, image id) of the image's rootfs, written with tarfile."""
    manifest = {"acKind": "ImageManifest", "acVersion": "0.8.11", "name": ACI_NAME,
                "labels": [{"name": "version", "value": ACI_VERSION},
                           {"name": "os", "value": "linux"}, {"name": "arch", "value": "amd64"}],
                "app": {"exec": list(CMD), "user": "0", "group": "0",
                        "workingDirectory": WORKING_DIR,
                        "environment": [{"name": k, "value": v} for k, v in
                                        (e.split("=", 1) for e in IMAGE_ENV)]}}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = json.dumps(manifest).encode()
        info = tarfile.TarInfo("manifest")
        info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
        tar.addfile(info, io.BytesIO(data))
        tar.add(rootfs, arcname="rootfs", filter=_with_xattrs(rootfs))
    plain = raw.getvalue()
    path = os.path.join(base, "busybox.aci")
    with open(path, "wb") as f:
        f.write(gzip.compress(plain, 6))
    return path, "sha512-" + hashlib.sha512(plain).hexdigest()


def _with_xattrs(rootfs: str):
    """A tarfile filter that records each entry's user.* xattrs (tarfile itself does not;
    an ACI must keep them)."""
    def add(info: tarfile.TarInfo) -> tarfile.TarInfo:
        path = os.path.join(rootfs, os.path.relpath(info.name, "rootfs"))
        for name in os.listxattr(path, follow_symlinks=False):
            if name.startswith("user."):
                value = os.getxattr(path, name, follow_symlinks=False)
                info.pax_headers[f"SCHILY.xattr.{name}"] = value.decode("utf-8",
                                                                         "surrogateescape")
        return info
    return add


def _manifest(registry: str, repository: str, tag: str, accept: str) -> tuple[bytes, str]:
    req = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}",
                                 headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read(), r.headers["Content-Type"]


def _put_list(registry: str, repository: str, tag: str, media_type: str, entries) -> None:
    doc = {"schemaVersion": 2, "mediaType": media_type, "manifests": [
        {"mediaType": t, "digest": "sha256:" + hashlib.sha256(data).hexdigest(),
         "size": len(data), "platform": {"os": "linux", "architecture": arch}}
        for data, t, arch in entries]}
    req = urllib.request.Request(f"http://{registry}/v2/{repository}/manifests/{tag}",
                                 data=json.dumps(doc).encode(), method="PUT",
                                 headers={"Content-Type": media_type})
    urllib.request.urlopen(req, timeout=10).close()


def build_all(base: str) -> BusyboxImages:
    images = BusyboxImages(base)
    try:
        _build(images, base)
    except BaseException:
        images.stop()
        raise
    return images


def _build(images: BusyboxImages, base: str) -> None:
    layout = build_oci(os.path.join(base, "build"))
    build_other_arch(os.path.join(base, "build"), layout)
    images.oci_layout = layout
    images.rootfs = os.path.join(base, "build", "unpacked", "rootfs")
    run("umoci", "unpack", "--image", f"{layout}:busybox", os.path.join(base, "build",
                                                                       "unpacked"))
    # local forms: OCI layout dir, OCI archive, docker archive
    images.oci_image_dir = os.path.join(base, "oci-images")
    os.makedirs(images.oci_image_dir)
    run("skopeo", "copy", "-q", f"oci:{layout}:busybox",
        f"oci:{images.oci_image_dir}/busybox:latest")
    run("skopeo", "copy", "-q", f"oci:{layout}:busybox",
        f"oci-archive:{images.oci_image_dir}/busybox-archive.tar:latest")
    images.docker_archive_dir = os.path.join(base, "docker-archives")
    os.makedirs(os.path.join(images.docker_archive_dir, "ctrverify"))
    scratch = os.path.join(base, "build", "docker.tar")
    run("skopeo", "copy", "-q", f"oci:{layout}:busybox",
        f"docker-archive:{scratch}:{images.docker_archive_name}")
    os.rename(scratch, os.path.join(images.docker_archive_dir, "ctrverify",
                                    "busybox:latest.tar"))
    # the anonymous registry, and what it holds
    storage = os.path.join(base, "registry-data")
    server = RegistryServer(os.path.join(base, "registry"), storage)
    images.registry_server = server
    server.start()
    images.registry = server.host
    reg = f"docker://{server.host}/{REPOSITORY}"
    push = ("skopeo", "copy", "-q", "--dest-tls-verify=false")
    run(*push, "--format", "v2s2", f"oci:{layout}:busybox", f"{reg}:v2s2")
    run(*push, f"oci:{layout}:busybox", f"{reg}:oci")
    run(*push, "--dest-compress-format", "zstd", "--dest-compress", f"oci:{layout}:busybox",
        f"{reg}:zstd")
    run(*push, "--format", "v2s2", f"oci:{layout}:arm64", f"{reg}:arm64-v2s2")
    run(*push, f"oci:{layout}:arm64", f"{reg}:arm64-oci")
    from agent.containerizer.provisioner import manifest as mf
    v2s2 = _manifest(server.host, REPOSITORY, "v2s2", mf.DOCKER_MANIFEST)[0]
    oci = _manifest(server.host, REPOSITORY, "oci", mf.OCI_MANIFEST)[0]
    arm_v2s2 = _manifest(server.host, REPOSITORY, "arm64-v2s2", mf.DOCKER_MANIFEST)[0]
    arm_oci = _manifest(server.host, REPOSITORY, "arm64-oci", mf.OCI_MANIFEST)[0]
    _put_list(server.host, REPOSITORY, "multi", mf.DOCKER_MANIFEST_LIST,
              [(arm_v2s2, mf.DOCKER_MANIFEST, "arm64"), (v2s2, mf.DOCKER_MANIFEST, "amd64")])
    _put_list(server.host, REPOSITORY, "multi-oci", mf.OCI_INDEX,
              [(arm_oci, mf.OCI_MANIFEST, "arm64"), (oci, mf.OCI_MANIFEST, "amd64")])
    parsed = mf.parse_manifest(v2s2, mf.DOCKER_MANIFEST)
    images.layer_digests = tuple(layer.digest for layer in parsed.layers)
    config = json.loads(urllib.request.urlopen(
        f"http://{server.host}/v2/{REPOSITORY}/blobs/{parsed.config.digest}", timeout=10).read())
    images.diff_ids = tuple(config["rootfs"]["diff_ids"])
    images.v2s2_name = f"{server.host}/{REPOSITORY}:v2s2"
    images.oci_name = f"{server.host}/{REPOSITORY}:oci"
    images.list_name = f"{server.host}/{REPOSITORY}:multi"
    images.index_name = f"{server.host}/{REPOSITORY}:multi-oci"
    images.zstd_name = f"{server.host}/{REPOSITORY}:zstd"
    # registries with auth, on the same storage (they only read it)
    htpasswd = os.path.join(base, "htpasswd")
    with open(htpasswd, "w") as f:
        f.write(f"{BASIC_CREDENTIALS[0]}:{bcrypt(BASIC_CREDENTIALS[1])}\n")
    images.basic_server = RegistryServer(
        os.path.join(base, "registry-basic"), storage,
        {"htpasswd": {"realm": "agora-test", "path": htpasswd}})
    images.basic_server.start()
    images.basic_registry = images.basic_server.host
    images.token_server = TokenServer(os.path.join(base, "token"), TOKEN_CREDENTIALS)
    images.token_registry_server = RegistryServer(
        os.path.join(base, "registry-token"), storage,
        {"token": {"realm": images.token_server.realm, "service": TOKEN_SERVICE,
                   "issuer": TOKEN_ISSUER, "rootcertbundle": images.token_server.cert_path}})
    images.token_registry_server.start()
    images.token_registry = images.token_registry_server.host
    images.tls_server = RegistryServer(os.path.join(base, "registry-tls"), storage,
                                       tls=write_tls(os.path.join(base, "tls")))
    images.tls_server.start()
    images.tls_registry, images.tls_ca = images.tls_server.host, images.tls_server.ca
    # AppC: a store directory, and the same file served for simple discovery
    aci, images.aci_id = build_aci(os.path.join(base, "build"), images.rootfs)
    file_name = f"{ACI_NAME}-{ACI_VERSION}-linux-amd64.aci"
    images.aci_store_dir = os.path.join(base, "aci-store")
    served = os.path.join(base, "aci-served")
    for directory in (images.aci_store_dir, served):
        os.makedirs(os.path.dirname(os.path.join(directory, file_name)), exist_ok=True)
        shutil.copy(aci, os.path.join(directory, file_name))
    images.aci_server = FileServer(served)
    images.aci_prefix = images.aci_server.url


@pytest.fixture(scope="session")
def busybox_images(tmp_path_factory):
    """The busybox test images in every form (see the module docstring); skips when they
    cannot be built here."""
    require_images()
    images = build_all(str(tmp_path_factory.mktemp("images")))
    yield images
    images.stop()
