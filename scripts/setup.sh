# shellcheck shell=bash
# Shared install logic for scripts/test and scripts/local; source it, do not run it.
#
# Knobs (environment):
#   PYTHON=python3.12   interpreter for the venv (default: python3)
#   AGORA_VENV=path     venv location (default: <repo>/.venv)
#   AGORA_SKIP_APT=1    never touch apt (print what is missing instead)
#
# See docs/install.md.

# ---------------------------------------------------------------------------
# Debian packages the test suite needs. THE place to add one: append a line.
# Names must exist in Debian 12 (check with `apt-cache policy NAME`).
# ---------------------------------------------------------------------------
# shellcheck disable=SC2034  # used by scripts/test
AGORA_APT_TEST_PACKAGES=(
    zookeeper                    # real ZooKeeper for HA tests; pulls in default-jre (OpenJDK 17)
    busybox-static               # rootfs of the test images
    skopeo                       # copies test images into the local registry
    umoci                        # builds OCI images from the busybox rootfs
    docker-registry              # a real registry v2 on 127.0.0.1
    containernetworking-plugins  # CNI plugins (/usr/lib/cni) for the network isolator
    runc                         # reference OCI runtime for comparisons
    crun                         # reference OCI runtime for comparisons
    iproute2                     # `ip netns` for network tests
    zstd                         # zstd-compressed image layers (the provisioner pipes through it)
    procps                       # pgrep, in the launch-helper tests
)

AGORA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
AGORA_VENV="${AGORA_VENV:-$AGORA_ROOT/.venv}"
AGORA_WHEEL_DIR="$AGORA_ROOT/build/wheels"
PYTHON="${PYTHON:-python3}"

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

agora_log() { printf '==> %s\n' "$*" >&2; }
agora_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Run a command as root: directly, through sudo, or not at all (returns 1).
_agora_as_root() {
    if [[ $EUID -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
    else
        return 1
    fi
}

# agora_apt_ensure PKG...: install the packages that are not installed yet.
# Fast path (everything installed) is one dpkg-query call; apt is not touched.
agora_apt_ensure() {
    local -a missing=()
    local installed pkg
    installed=" $(dpkg-query -W -f='${Package}:${db:Status-Abbrev} ' "$@" 2>/dev/null | sed 's/:[a-z]i  */ /g' || true) "
    for pkg in "$@"; do
        [[ "$installed" == *" $pkg "* ]] || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0

    local cmd="apt-get update && apt-get install -y --no-install-recommends ${missing[*]}"
    if [[ -n "${AGORA_SKIP_APT:-}" ]]; then
        agora_log "AGORA_SKIP_APT is set; not installing missing Debian packages: ${missing[*]}"
        agora_log "tests that need them will fail; to install: $cmd"
        return 0
    fi
    if [[ $EUID -ne 0 ]] && ! command -v sudo >/dev/null 2>&1; then
        agora_log "not root and no sudo: please install the missing Debian packages: ${missing[*]}"
        agora_log "  as root: $cmd"
        return 0
    fi
    agora_log "installing Debian packages: ${missing[*]} (apt-get update first)..."
    local -a apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600)
    if ! _agora_as_root "${apt[@]}" update </dev/null ||
       ! _agora_as_root "${apt[@]}" install -y --no-install-recommends "${missing[@]}" </dev/null; then
        if [[ $EUID -eq 0 ]]; then
            agora_die "apt-get failed installing: ${missing[*]}"
        fi
        agora_log "sudo apt-get failed; please install: ${missing[*]}  (as root: $cmd)"
    fi
}

# The venv exists, runs, and was made by the same Python version as $PYTHON.
agora_venv_ensure() {
    command -v "$PYTHON" >/dev/null 2>&1 || agora_die "Python interpreter '$PYTHON' not found (set PYTHON=...)"
    local want have=""
    want="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" ||
        agora_die "'$PYTHON' does not run"
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        agora_die "'$PYTHON' is Python $want; Agora needs Python >= 3.11"
    if [[ -x "$AGORA_VENV/bin/python" ]]; then
        have="$("$AGORA_VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" || have=""
        [[ "$have" == "$want" ]] && return 0
        agora_log "venv $AGORA_VENV is Python ${have:-broken}, want $want: recreating it..."
        rm -rf "$AGORA_VENV"
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        # Debian's own python3 ships venv/ensurepip in a separate package.
        agora_apt_ensure "python$want-venv"
    fi
    agora_log "creating venv $AGORA_VENV with $PYTHON (Python $want)..."
    "$PYTHON" -m venv "$AGORA_VENV" || agora_die "could not create the venv (on Debian: apt-get install python3-venv)"
}

# Hash of everything that decides what pip installs, for the stamp file.
_agora_install_hash() {
    local profile="$1"
    {
        echo "profile=$profile"
        cat "$AGORA_VENV/pyvenv.cfg"
        local f
        for f in setup.cfg pyproject.toml requirements-test.txt scripts/setup.sh scripts/build_http_parser.py; do
            echo "== $f"
            [[ -f "$AGORA_ROOT/$f" ]] && cat "$AGORA_ROOT/$f"
        done
    } | sha256sum | cut -d' ' -f1
}

_agora_stamp_current() {
    local profile="$1" hash="$2"
    [[ -f "$AGORA_VENV/.agora-installed-$profile" && "$(cat "$AGORA_VENV/.agora-installed-$profile")" == "$hash" ]]
}

# agora_pip_ensure runtime|test: Agora editable with its runtime deps (runtime), plus the
# `test` extra (test). Skips pip when the stamp says nothing changed since the last install.
agora_pip_ensure() {
    local profile="$1" hash lock_fd
    hash="$(_agora_install_hash "$profile")"
    _agora_stamp_current "$profile" "$hash" && return 0
    # The test profile includes everything the runtime profile does.
    if [[ "$profile" == runtime ]] && _agora_stamp_current test "$(_agora_install_hash test)"; then
        return 0
    fi

    # Serialize concurrent installs into the same venv (two scripts started at once).
    exec {lock_fd}>"$AGORA_VENV/.agora-install.lock"
    if command -v flock >/dev/null 2>&1; then flock "$lock_fd"; fi
    if _agora_stamp_current "$profile" "$hash"; then
        exec {lock_fd}>&-
        return 0
    fi
    local py="$AGORA_VENV/bin/python" wheel target="${AGORA_ROOT}[clients]"
    [[ "$profile" == test ]] && target="${AGORA_ROOT}[clients,test]"

    # pymesos depends on http-parser, which must come from our pure-Python wheel (see
    # scripts/build_http_parser.py); naming the wheel file in the same pip command makes
    # pip use it instead of building the C extension from PyPI's sdist.
    if [[ -z "$(compgen -G "$AGORA_WHEEL_DIR/http_parser-0.9.0-*-none-any.whl")" ]]; then
        agora_log "building http-parser 0.9.0 as a pure-Python wheel (once per checkout)..."
    fi
    wheel="$("$py" "$AGORA_ROOT/scripts/build_http_parser.py" --wheel-dir "$AGORA_WHEEL_DIR")" ||
        agora_die "could not build the http-parser wheel"

    agora_log "installing Python packages ($profile) into $AGORA_VENV..."
    "$py" -m pip install --quiet --progress-bar off "$wheel" -e "$target" ||
        agora_die "pip install failed"
    "$py" -m pip check >/dev/null || { "$py" -m pip check; agora_die "pip check found broken requirements"; }
    rm -f "$AGORA_VENV"/.agora-installed-*
    echo "$hash" >"$AGORA_VENV/.agora-installed-$profile"
    exec {lock_fd}>&-
    agora_log "Python packages installed."
}
