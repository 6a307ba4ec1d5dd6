"""Image pull + unpack from a local registry: our provisioner against skopeo + umoci.

Builds an image with umoci (busybox-static plus layers of random, compressible and many
small files), pushes it with skopeo into a `docker-registry` on 127.0.0.1, then times, in
alternating order, `runs` cold pulls of each:

    ours          Provisioner(<empty store>).provision(...): manifest, config, layers
                  fetched, checked and unpacked into the layer store (overlay backend)
    skopeo+umoci  skopeo copy docker://<registry>/<image> oci:<dir>:<tag>
                  umoci unpack --image <dir>:<tag> <bundle>

Needs root and the Debian tools (scripts/test installs them). The last line holds the
figures as key=value pairs (medians; ratio = ours / skopeo+umoci, the goal is <= 1.0).

    .venv/bin/python benchmarks/image_pull.py [--runs 5] [--random-mb 24] [--text-mb 24]
                                              [--small-files 2000]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agent.containerizer.provisioner import Provisioner  # noqa: E402
from tests import images as test_images  # noqa: E402

WORDS = ("cluster scheduler offer agent framework resource container image layer overlay "
         "registry manifest digest whiteout executor task status update").split()


def build(base: str, random_mb: int, text_mb: int, small_files: int) -> str:
    """A five-layer OCI layout (tag `bench`): busybox (umoci repack), then random,
    compressible, many small files, and a small top layer with a whiteout (tars written
    here, added with `umoci raw add-layer`, which gzips them). Its path."""
    layout, bundle = os.path.join(base, "oci"), os.path.join(base, "bundle")
    image = f"{layout}:bench"
    test_images.run("umoci", "init", "--layout", layout)
    test_images.run("umoci", "new", "--image", image)
    test_images.run("umoci", "unpack", "--image", image, bundle)
    test_images._base_rootfs(os.path.join(bundle, "rootfs"))
    test_images.run("umoci", "repack", "--image", image, bundle)
    shutil.rmtree(bundle)
    rng = random.Random(42)

    def text(size: int) -> bytes:
        out, n = [], 0
        while n < size:
            line = " ".join(rng.choice(WORDS) for _ in range(12)) + "\n"
            out.append(line)
            n += len(line)
        return "".join(out).encode()

    layers = [
        [(f"opt/random/blob{i:03}.bin", rng.randbytes(1 << 20)) for i in range(random_mb)],
        [(f"usr/share/text/doc{i:04}.txt", text(128 << 10)) for i in range(text_mb * 8)],
        [(f"usr/lib/small/d{i // 100:02}/f{i:05}.conf",
          f"key{i} = {rng.random()}\n".encode() * rng.randint(1, 40))
         for i in range(small_files)],
        [("etc/.wh.doomed", b""), ("etc/motd", b"benchmark image\n")],
    ]
    for n, files in enumerate(layers):
        path = os.path.join(base, f"layer{n}.tar")
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            made = set()
            for name, data in files:
                parts = name.split("/")[:-1]
                for k in range(1, len(parts) + 1):
                    d = "/".join(parts[:k])
                    if d not in made:
                        made.add(d)
                        info = tarfile.TarInfo(d)
                        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1700000000
                        tar.addfile(info)
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 1700000000
                tar.addfile(info, io.BytesIO(data))
        test_images.run("umoci", "raw", "add-layer", "--image", image, path)
        os.unlink(path)
    test_images.run("umoci", "config", "--image", image, "--config.cmd", "/bin/sh",
                    "--config.env", "PATH=/bin", "--os", "linux", "--architecture", "amd64")
    test_images.run("umoci", "gc", "--layout", layout)
    return layout


def time_ours(registry: str, name: str, scratch: str) -> float:
    store = os.path.join(scratch, "store")
    start = time.perf_counter()
    Provisioner(store).provision("bench", {"type": "DOCKER",
                                           "docker": {"name": f"{registry}/{name}"}})
    elapsed = time.perf_counter() - start
    shutil.rmtree(store)
    return elapsed


def time_skopeo_umoci(registry: str, name: str, scratch: str) -> tuple[float, float]:
    layout, bundle = os.path.join(scratch, "pulled"), os.path.join(scratch, "bundle")
    start = time.perf_counter()
    test_images.run("skopeo", "copy", "-q", "--src-tls-verify=false",
                    f"docker://{registry}/{name}", f"oci:{layout}:bench")
    copied = time.perf_counter()
    test_images.run("umoci", "unpack", "--image", f"{layout}:bench", bundle)
    done = time.perf_counter()
    shutil.rmtree(layout)
    shutil.rmtree(bundle)
    return copied - start, done - copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--random-mb", type=int, default=24)
    parser.add_argument("--text-mb", type=int, default=24)
    parser.add_argument("--small-files", type=int, default=2000)
    args = parser.parse_args()
    if os.geteuid() != 0 or test_images.missing_tools():
        sys.exit("needs root and " + ", ".join(test_images.TOOLS) + " and busybox-static")
    base = tempfile.mkdtemp(prefix="agora-image-pull-")
    server = None
    try:
        t = time.perf_counter()
        layout = build(os.path.join(base, "build"), args.random_mb, args.text_mb,
                       args.small_files)
        server = test_images.RegistryServer(os.path.join(base, "registry"),
                                            os.path.join(base, "registry-data"))
        server.start()
        name = "bench/image:latest"
        test_images.run("skopeo", "copy", "-q", "--dest-tls-verify=false",
                        f"oci:{layout}:bench", f"docker://{server.host}/{name}")
        blobs = os.path.join(layout, "blobs", "sha256")
        compressed = sum(os.path.getsize(os.path.join(blobs, b)) for b in os.listdir(blobs))
        print(f"built and pushed in {time.perf_counter() - t:.1f}s: "
              f"{compressed / 1e6:.1f} MB compressed", flush=True)
        ours, skopeo, umoci = [], [], []
        for i in range(args.runs):
            scratch = os.path.join(base, f"run{i}")
            os.makedirs(scratch)
            order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
            for who in order:
                subprocess.run(["sync"], check=True)  # don't bill one side for the other's writeback
                if who == "ours":
                    ours.append(time_ours(server.host, name, scratch))
                else:
                    s, u = time_skopeo_umoci(server.host, name, scratch)
                    skopeo.append(s)
                    umoci.append(u)
            print(f"run {i + 1}: ours {ours[-1] * 1e3:.0f} ms, skopeo {skopeo[-1] * 1e3:.0f} ms "
                  f"+ umoci {umoci[-1] * 1e3:.0f} ms", flush=True)
        theirs = [s + u for s, u in zip(skopeo, umoci)]
        ours_ms, theirs_ms = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
        print(f"ours_ms={ours_ms:.0f} skopeo_umoci_ms={theirs_ms:.0f} "
              f"ratio={ours_ms / theirs_ms:.2f} skopeo_ms={statistics.median(skopeo) * 1e3:.0f} "
              f"umoci_ms={statistics.median(umoci) * 1e3:.0f} runs={args.runs} layers=5 "
              f"compressed_mb={compressed / 1e6:.1f} cpus={os.cpu_count()}")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
