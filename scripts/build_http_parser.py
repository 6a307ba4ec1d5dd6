"""Build http-parser 0.9.0 (a pymesos dependency) as a pure-Python wheel, cached in a directory.

Why: http-parser 0.9.0 is the newest release (2020). Its C extension includes
longintrepr.h and does not compile on CPython >= 3.11, and its setup.py only
chooses the pure-Python parser on PyPy (`run_setup(not IS_PYPY)`). We download
the sdist, patch that call to `run_setup(False)`, drop the stale binaries the
sdist ships, and build a `py3-none-any` wheel. `http_parser.http` then falls
back to `http_parser.pyparser.HttpParser`, which is what pymesos uses.

Run it with the interpreter of the venv the wheel is for (its pip is used):

    .venv/bin/python scripts/build_http_parser.py --wheel-dir build/wheels

It prints the wheel's path. If a matching wheel is already in the directory it
does nothing else, so calling it on every install is cheap.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

VERSION = "0.9.0"
WHEEL_GLOB = f"http_parser-{VERSION}-*-none-any.whl"

# Python >= 3.12 has no `imp` module; the sdist's setup.py does `from imp import load_source`.
IMP_SHIM = '''\
"""Minimal `imp` for old setup.py files on Python >= 3.12 (only load_source)."""
import importlib.util, sys


def load_source(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
'''

SETUP_IMP_LINE = "from imp import load_source"
SETUP_IMP_REPLACEMENT = """\
try:
    from imp import load_source
except ImportError:  # Python >= 3.12 (patched by agora scripts/build_http_parser.py)
    import importlib.util

    def load_source(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module"""
SETUP_RUN_LINE = "run_setup(not IS_PYPY)"
SETUP_RUN_REPLACEMENT = "run_setup(False)  # pure Python: the C parser does not build on CPython >= 3.11"


def cached_wheel(wheel_dir):
    found = sorted(glob.glob(os.path.join(wheel_dir, WHEEL_GLOB)))
    return found[-1] if found else None


def run(cmd, env=None):
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL)


def pip_env():
    env = dict(os.environ)
    env["PIP_NO_INPUT"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def download_sdist(tmp, dest):
    """Download the sdist with pip, which runs the unpatched setup.py to read its metadata.

    On Python >= 3.12 that setup.py fails (`from imp import ...`), and pip's isolated build
    environment ignores PYTHONPATH. So there we put an `imp` shim and a throwaway setuptools
    on PYTHONPATH and download without build isolation.
    """
    env = pip_env()
    isolation = []
    if sys.version_info >= (3, 12):
        shim_dir, tools_dir = os.path.join(tmp, "imp-shim"), os.path.join(tmp, "build-tools")
        os.makedirs(shim_dir)
        with open(os.path.join(shim_dir, "imp.py"), "w") as f:
            f.write(IMP_SHIM)
        run([sys.executable, "-m", "pip", "install", "--quiet", "--target", tools_dir,
             "setuptools", "wheel"], env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (shim_dir, tools_dir, env.get("PYTHONPATH")) if p)
        isolation = ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *isolation,
         "--no-binary", ":all:", "--dest", dest, f"http-parser=={VERSION}"], env)


def patch_setup_py(path):
    with open(path) as f:
        text = f.read()
    for old in (SETUP_RUN_LINE, SETUP_IMP_LINE):
        if text.count(old) != 1:
            raise SystemExit(f"{path}: expected exactly one {old!r}; is this http-parser {VERSION}?")
    text = text.replace(SETUP_RUN_LINE, SETUP_RUN_REPLACEMENT)
    text = text.replace(SETUP_IMP_LINE, SETUP_IMP_REPLACEMENT)
    with open(path, "w") as f:
        f.write(text)


def strip_sdist(src):
    """Remove what the sdist ships prebuilt: a build/ tree, egg-info and a macOS parser .so."""
    for name in ("build", "http_parser.egg-info"):
        shutil.rmtree(os.path.join(src, name), ignore_errors=True)
    for path in glob.glob(os.path.join(src, "http_parser", "*.so")):
        os.remove(path)


def check_wheel(path):
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    binaries = [n for n in names if n.endswith((".so", ".pyd", ".dylib"))]
    if binaries or "http_parser/pyparser.py" not in names:
        raise SystemExit(f"{path}: not a pure-Python http-parser wheel (binaries: {binaries})")


def build(wheel_dir):
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="agora-http-parser-") as tmp:
        dl, out = os.path.join(tmp, "dl"), os.path.join(tmp, "out")
        download_sdist(tmp, dl)
        sdists = glob.glob(os.path.join(dl, "http*parser-*.tar.gz"))
        if len(sdists) != 1:
            raise SystemExit(f"expected one http-parser sdist in {dl}, got {os.listdir(dl)}")
        with tarfile.open(sdists[0]) as tf:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(tmp, filter="data")
            else:
                tf.extractall(tmp)
        src = os.path.join(tmp, os.path.basename(sdists[0])[: -len(".tar.gz")])
        patch_setup_py(os.path.join(src, "setup.py"))
        strip_sdist(src)
        run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
             "--wheel-dir", out, src], pip_env())
        built = glob.glob(os.path.join(out, WHEEL_GLOB))
        if len(built) != 1:
            raise SystemExit(f"expected one pure-Python wheel in {out}, got {os.listdir(out)}")
        check_wheel(built[0])
        # Copy next to the target, then rename: a concurrent reader never sees half a wheel.
        target = os.path.join(wheel_dir, os.path.basename(built[0]))
        partial = target + ".partial"
        shutil.copyfile(built[0], partial)
        os.replace(partial, target)
        return target


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", required=True, help="where the wheel is cached")
    args = parser.parse_args(argv)
    wheel = cached_wheel(args.wheel_dir) or build(args.wheel_dir)
    print(wheel)


if __name__ == "__main__":
    main()
