"""namespaces/pid, namespaces/ipc, namespaces/uts: a container of its own for each.

They only ask for the namespace; the launcher makes it. With `namespaces/pid` the container
gets an init as PID 1 (agent.containerizer.spawn) that passes signals on to the task and
reaps orphans, and its own /proc. `namespaces/uts` sets the hostname to
`ContainerInfo.hostname` (else the container id's first 12 characters), as Mesos does with
a network namespace.
"""

from __future__ import annotations

from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Settings


class _NamespaceIsolator(Isolator):
    namespace = ""

    def __init__(self, settings: Settings):
        self.settings = settings

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        return LaunchInfo(namespaces=frozenset({self.namespace}))


class PidNamespaceIsolator(_NamespaceIsolator):
    namespace = "pid"

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        return LaunchInfo(namespaces=frozenset({"pid", "mnt"}))  # its own /proc needs mnt


class IpcNamespaceIsolator(_NamespaceIsolator):
    namespace = "ipc"


class UtsNamespaceIsolator(_NamespaceIsolator):
    namespace = "uts"

    def prepare(self, config: ContainerConfig) -> LaunchInfo:
        hostname = (config.container_info or {}).get("hostname")
        if not isinstance(hostname, str) or not hostname:
            hostname = config.container_id[:12]
        return LaunchInfo(namespaces=frozenset({"uts"}), hostname=hostname)
