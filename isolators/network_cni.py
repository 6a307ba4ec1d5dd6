"""network/cni: a network namespace per container, joined to CNI networks by the real plugins.

    ContainerInfo.network_infos: [{"name": "agora-net"}, ...]
    --network-cni-config-dir DIR   *.conf (one plugin) / *.conflist (a chain), by "name"
    --network-cni-plugins-dir DIR  the plugin binaries (Debian: /usr/lib/cni)

prepare: a network namespace bound to `<state>/<container id>/ns` (`unshare --net=FILE`),
`lo` brought up by the loopback plugin, then for each network its plugins called with
CNI_COMMAND=ADD (interface eth0, eth1, ... in the order given), their results kept in
`<state>/<container id>/<n>.json`; the container joins the namespace (LaunchInfo.netns).
status: the addresses, as the task's `container_status.network_infos`. cleanup: DEL for
each network in reverse order, the namespace unmounted and its directory removed; recover
does the same for namespaces no recovered container holds. Plugins run in the agent's own
network namespace, as Mesos runs them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from agent.containerizer import syscalls as sc
from isolators.interface import ContainerConfig, Isolator, LaunchInfo, Settings

log = Logger()

DEFAULT_PLUGINS_DIR = "/usr/lib/cni"
PLUGIN_TIMEOUT = 30.0


class CniError(Exception):
    """A network could not be set up; the message names it and the plugin's error."""


def network_names(container_info: dict | None) -> list[str]:
    """The CNI network names a ContainerInfo asks for, in order, without duplicates."""
    names = []
    for info in (container_info or {}).get("network_infos") or ():
        name = info.get("name") if isinstance(info, dict) else None
        if isinstance(name, str) and name and name not in names:
            names.append(name)
    return names


def load_configs(directory: str) -> dict[str, dict]:
    """Network name -> its config (a .conflist as is, a .conf as a one-plugin list)."""
    configs = {}
    for entry in sorted(os.listdir(directory)):
        path = os.path.join(directory, entry)
        if not entry.endswith((".conf", ".conflist", ".json")) or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise CniError(f"CNI config {path} is unreadable: {e}") from None
        if not isinstance(config, dict) or not isinstance(config.get("name"), str):
            raise CniError(f"CNI config {path} has no 'name'")
        if "plugins" not in config:
            plugin = {k: v for k, v in config.items() if k not in ("cniVersion", "name")}
            config = {"cniVersion": config.get("cniVersion", "0.4.0"), "name": config["name"],
                      "plugins": [plugin]}
        configs.setdefault(config["name"], config)
    return configs


def addresses(result: dict) -> list[dict]:
    """Mesos IPAddress JSON for a CNI result's `ips` (0.3+) or `ip4`/`ip6` (0.2)."""
    out = []
    for ip in result.get("ips") or ():
        address = str(ip.get("address", "")).split("/")[0]
        if address:
            out.append({"protocol": "IPv6" if ":" in address else "IPv4",
                        "ip_address": address})
    for key, protocol in (("ip4", "IPv4"), ("ip6", "IPv6")):
        address = str((result.get(key) or {}).get("ip", "")).split("/")[0]
        if address:
            out.append({"protocol": protocol, "ip_address": address})
    return out


class CniIsolator(Isolator):
    def __init__(self, settings: Settings):
        self.settings = settings
        flags = settings.flags
        self.config_dir = flags.get("network_cni_config_dir")
        self.plugins_dir = flags.get("network_cni_plugins_dir") or DEFAULT_PLUGINS_DIR
        self.state_dir = flags.get("network_cni_root_dir") or os.path.join(
            settings.runtime_dir, "cni")
        self.reactor = settings.reactor
        self._status: dict[str, list[dict]] = {}

    def _thread(self, f, *args):
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), f, *args)

    # --- hooks ---------------------------------------------------------------------------

    def prepare(self, config: ContainerConfig):
        names = network_names(config.container_info)
        if not names:
            return None
        return self._thread(self._attach, config.container_id, names)

    def status(self, container_id: str) -> dict:
        infos = self._status.get(container_id)
        return {"network_infos": infos} if infos else {}

    def cleanup(self, container_id: str):
        self._status.pop(container_id, None)
        return self._thread(self._detach, container_id)

    def recover(self, states: list):
        return self._thread(self._recover, {s.container_id for s in states})

    # --- in threads ----------------------------------------------------------------------

    def _attach(self, container_id: str, names: list[str]) -> LaunchInfo:
        if not self.config_dir:
            raise CniError("the task asks for CNI networks "
                           f"{', '.join(names)}, but the agent has no --network-cni-config-dir")
        configs = load_configs(self.config_dir)
        unknown = [n for n in names if n not in configs]
        if unknown:
            raise CniError(f"unknown CNI network(s) {', '.join(unknown)}; "
                           f"{self.config_dir} has {', '.join(sorted(configs)) or 'none'}")
        directory = os.path.join(self.state_dir, container_id)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        netns = os.path.join(directory, "ns")
        try:
            self._create_netns(netns)
            lo = os.path.join(self.plugins_dir, "loopback")
            if os.path.exists(lo):
                self._plugin({"cniVersion": "0.4.0", "name": "lo", "type": "loopback"},
                             "ADD", container_id, netns, "lo")
            infos = []
            for index, name in enumerate(names):
                result = self._add(configs[name], container_id, netns, f"eth{index}")
                with open(os.path.join(directory, f"{index}.json"), "w") as f:
                    json.dump({"config": configs[name], "ifname": f"eth{index}",
                               "result": result}, f)
                infos.append({"name": name, "ip_addresses": addresses(result)})
        except Exception:
            self._detach(container_id)
            raise
        self._status[container_id] = infos
        return LaunchInfo(netns=netns)

    def _create_netns(self, path: str) -> None:
        with open(path, "w"):
            pass
        done = subprocess.run(["unshare", f"--net={path}", "true"], capture_output=True,
                              text=True, timeout=PLUGIN_TIMEOUT)
        if done.returncode != 0:
            raise CniError(f"cannot create a network namespace: {done.stderr.strip()}")

    def _add(self, config: dict, container_id: str, netns: str, ifname: str) -> dict:
        previous = None
        for plugin in config["plugins"]:
            conf = {"cniVersion": config.get("cniVersion", "0.4.0"), "name": config["name"],
                    **plugin}
            if previous is not None:
                conf["prevResult"] = previous
            previous = self._plugin(conf, "ADD", container_id, netns, ifname)
        return previous or {}

    def _plugin(self, conf: dict, command: str, container_id: str, netns: str,
                ifname: str) -> dict:
        kind = conf.get("type")
        program = os.path.join(self.plugins_dir, str(kind))
        if not isinstance(kind, str) or "/" in kind or not os.path.exists(program):
            raise CniError(f"CNI plugin {kind!r} of network {conf.get('name')} is not in "
                           f"{self.plugins_dir}")
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
               "CNI_IFNAME": ifname, "CNI_PATH": self.plugins_dir,
               "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        try:
            done = subprocess.run([program], input=json.dumps(conf), capture_output=True,
                                  text=True, env=env, timeout=PLUGIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise CniError(f"CNI plugin {kind} ({command}) of network {conf.get('name')} "
                           f"timed out after {PLUGIN_TIMEOUT:g}s") from None
        if done.returncode != 0:
            try:
                error = json.loads(done.stdout)
                message = error.get("msg", "") + (f": {error['details']}"
                                                  if error.get("details") else "")
            except ValueError:
                message = (done.stdout + done.stderr).strip()
            raise CniError(f"CNI plugin {kind} ({command}) of network {conf.get('name')} "
                           f"failed: {message}")
        try:
            return json.loads(done.stdout) if done.stdout.strip() else {}
        except ValueError:
            raise CniError(f"CNI plugin {kind} printed no JSON result: {done.stdout!r}") \
                from None

    def _detach(self, container_id: str) -> None:
        """DEL every network (in reverse order), then drop the namespace. Idempotent."""
        directory = os.path.join(self.state_dir, container_id)
        if not os.path.isdir(directory):
            return
        netns = os.path.join(directory, "ns")
        records = sorted((n for n in os.listdir(directory) if n.endswith(".json")),
                         key=lambda n: int(n.split(".")[0]), reverse=True)
        for name in records:
            try:
                with open(os.path.join(directory, name)) as f:
                    record = json.load(f)
                config = record["config"]
                for plugin in reversed(config["plugins"]):
                    conf = {"cniVersion": config.get("cniVersion", "0.4.0"),
                            "name": config["name"], **plugin,
                            "prevResult": record.get("result") or {}}
                    self._plugin(conf, "DEL", container_id, netns, record["ifname"])
            except (OSError, ValueError, KeyError, CniError) as e:
                log.error("CNI DEL for container {cid}: {e}", cid=container_id, e=e)
        try:
            sc.umount2(netns, sc.MNT_DETACH)
        except OSError:
            pass  # not mounted (it failed before, or was cleaned up already)
        shutil.rmtree(directory, ignore_errors=True)

    def _recover(self, live: set[str]) -> None:
        if not os.path.isdir(self.state_dir):
            return
        for container_id in os.listdir(self.state_dir):
            directory = os.path.join(self.state_dir, container_id)
            if container_id not in live:
                self._detach(container_id)
                continue
            infos = []
            for name in sorted(n for n in os.listdir(directory) if n.endswith(".json")):
                try:
                    with open(os.path.join(directory, name)) as f:
                        record = json.load(f)
                    infos.append({"name": record["config"]["name"],
                                  "ip_addresses": addresses(record.get("result") or {})})
                except (OSError, ValueError, KeyError):
                    continue
            self._status[container_id] = infos
