"""The unified containerizer: launchers, the launch helper, the provisioner, the containerizer.

`build(...)` makes an agent's Containerizer from its flags; see README.md for the picture.
"""

from __future__ import annotations

import hashlib
import os

LAUNCHERS = ("posix", "linux")
CGROUP_ISOLATORS = (("cgroups/cpu", "cpu"), ("cgroups/mem", "memory"))
DEFAULT_LINUX_ISOLATION = "filesystem/linux,namespaces/pid,cgroups/cpu,cgroups/mem"
DEFAULT_POSIX_ISOLATION = "posix/cpu,posix/mem"


def default_isolation(launcher: str) -> str:
    return DEFAULT_LINUX_ISOLATION if launcher == "linux" else DEFAULT_POSIX_ISOLATION


def choose_launcher(cgroups_base: str = "/sys/fs/cgroup") -> tuple[str, str | None]:
    """`--launcher auto`: (launcher, isolation) for this host. linux as root with a freezer
    (v1 or v2) and the cgroup isolators whose controllers are there; posix otherwise."""
    if os.geteuid() != 0 or not os.path.isdir(cgroups_base):
        return "posix", None
    from isolators.cgroups import hierarchy
    try:
        hierarchies = hierarchy.discover(cgroups_base)
    except OSError:
        return "posix", None
    if hierarchies.version("freezer") is None:
        return "posix", None
    names = ["filesystem/linux", "namespaces/pid"] + [
        name for name, controller in CGROUP_ISOLATORS if hierarchies.version(controller)]
    return "linux", ",".join(names)


def agent_cgroups_root(cgroups_root: str, runtime_dir: str) -> str:
    """This agent's own cgroup directory under `cgroups_root`: one per runtime directory, so
    agents sharing a host (`agora local`, tests) never take each other's containers for
    orphans."""
    return f"{cgroups_root.strip('/')}/{hashlib.sha256(runtime_dir.encode()).hexdigest()[:12]}"


def build(reactor, *, work_dir: str, launcher: str = "posix", isolation: str | None = None,
          flags: dict | None = None, python: str, code_root: str, on_limitation=None):
    """The Containerizer for an agent: ValueError (with what to do) for a bad combination."""
    from agent.containerizer.containerizer import Containerizer
    from agent.containerizer.launcher import PosixLauncher
    from isolators import catalog
    from isolators.interface import Settings

    flags = dict(flags or {})
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {launcher!r}")
    runtime_dir = os.path.abspath(flags.get("runtime_dir") or os.path.join(work_dir, "run"))
    names = catalog.parse(isolation if isolation is not None else default_isolation(launcher))
    if launcher == "posix":
        if names:
            raise ValueError(f"isolators {', '.join(names)} need the linux launcher "
                             "(--launcher linux, as root)")
        return Containerizer(reactor, PosixLauncher(reactor), runtime_dir=runtime_dir,
                             on_limitation=on_limitation)
    if os.geteuid() != 0:
        raise ValueError("the linux launcher needs root; run the agent as root or use "
                         "--launcher posix")
    from agent.containerizer.linux import LinuxLauncher
    from isolators.cgroups import hierarchy

    flags["cgroups_root"] = agent_cgroups_root(flags.get("cgroups_root") or "agora",
                                               runtime_dir)
    hierarchies = hierarchy.discover(flags.get("cgroups_hierarchy") or hierarchy.DEFAULT_BASE)
    root = flags["cgroups_root"]
    settings = Settings(work_dir=work_dir, runtime_dir=runtime_dir, flags=flags,
                        reactor=reactor)
    isolators = catalog.load(",".join(names), settings)
    provisioner = None
    providers = flags.get("image_providers")
    providers = [p for p in ("docker,oci,appc" if providers is None else providers).split(",")
                 if p]
    if providers:
        from agent.containerizer.provisioner import Provisioner
        provisioner = Provisioner(
            flags.get("image_store_dir") or os.path.join(work_dir, "provisioner"),
            **{key: flags[key] for key in PROVISIONER_FLAGS if flags.get(key) is not None})
    mounts = set(hierarchies.v1.values()) | ({hierarchies.v2} if hierarchies.v2 else set())
    linux = LinuxLauncher(reactor, runtime_dir,
                          lambda cid: hierarchy.membership(hierarchies, root, cid),
                          python=python, code_root=code_root,
                          roots=[os.path.join(m, root) for m in sorted(mounts)])
    return Containerizer(reactor, linux, runtime_dir=runtime_dir, isolators=isolators,
                         provisioner=provisioner, on_limitation=on_limitation)


#: Agent flags passed on to the Provisioner by name.
PROVISIONER_FLAGS = ("backend", "docker_registry", "docker_insecure_registries",
                     "docker_credentials", "oci_image_dir", "appc_store_dir",
                     "appc_simple_discovery_uri_prefix", "image_gc_budget")
