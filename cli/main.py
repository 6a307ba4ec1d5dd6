"""The `agora` command: `agora master`, `agora agent`, `agora local`, `agora marathon`,
`agora app why`."""

import argparse
import os
import sys
import tempfile

from agora.resources import Resources
from cli import marathon as marathon_cli


def _master(text: str):
    from agent.master_detector import parse_master
    try:
        return parse_master(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _resources(text: str) -> str:
    try:
        Resources.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _number(kind, check, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_nonnegative_int = _number(int, lambda v: v >= 0, "a whole number >= 0")
_nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
_positive_float = _number(float, lambda v: v > 0, "a number > 0")
_fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction between 0 and 1")


def _read_secret(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        sys.exit(f"agora: cannot read --secret-file: {e}")
    if not secret:
        sys.exit(f"agora: --secret-file {path} is empty")
    return secret


def _master_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allocation-interval", type=float, default=1.0, metavar="SECS",
                   help="batched allocation cycle period (default 1)")
    p.add_argument("--offer-timeout", type=float, default=None, metavar="SECS",
                   help="rescind offers held longer than this (default: never)")
    p.add_argument("--agent-ping-timeout", type=float, default=15.0, metavar="SECS",
                   help="period of agent pings (default 15)")
    p.add_argument("--max-agent-ping-timeouts", type=int, default=5, metavar="N",
                   help="missed pings before an agent is unreachable (default 5)")
    p.add_argument("--registry", choices=("zk", "sqlite", "in_memory"), default=None,
                   help="where admitted agents, frameworks and weights are kept (default: in "
                        "ZooKeeper under <--zk path>_registry with --zk, else a SQLite file "
                        "in --work-dir)")
    p.add_argument("--agent-reregister-timeout", type=float, default=600.0, metavar="SECS",
                   help="after a failover, how long agents the registry knows have to "
                        "re-register before they are marked unreachable (default 600)")


def _agent_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resources", type=_resources, default=None,
                   help="e.g. 'cpus:4;mem:2048;ports:[31000-32000]' (default: detected)")
    p.add_argument("--attributes", default=None, help="e.g. 'rack:r1;zone:a'")
    p.add_argument("--status-update-retry", type=float, default=10.0, metavar="SECS",
                   help="first retry interval of unacknowledged status updates (default 10)")
    p.add_argument("--fetcher-cache-dir", default=None, metavar="DIR",
                   help="where fetched URIs with cache=true are kept (default: WORK_DIR/fetch)")
    p.add_argument("--fetcher-cache-size", type=_nonnegative_int, default=2 * 1024**3,
                   metavar="BYTES", help="most bytes the fetcher cache holds (default 2 GiB)")
    p.add_argument("--gc-delay", type=_nonnegative_float, default=7 * 86400.0, metavar="SECS",
                   help="longest a finished sandbox is kept (default 1 week); less as the "
                        "disk fills: delay * (1 - headroom - used fraction)")
    p.add_argument("--gc-disk-headroom", type=_fraction, default=0.1, metavar="FRACTION",
                   help="disk share to keep free, 0..1 (default 0.1); 1 collects every "
                        "finished sandbox at the next disk check")
    p.add_argument("--disk-watch-interval", type=_positive_float, default=60.0, metavar="SECS",
                   help="how often the disk is checked and due sandboxes removed (default 60)")
    p.add_argument("--recover", choices=("reconnect", "cleanup"), default="reconnect",
                   help="with a checkpoint in the work dir: take back its frameworks, "
                        "executors and tasks (reconnect, the default), or kill what it left "
                        "running and start as a new agent (cleanup)")
    p.add_argument("--executor-reregistration-timeout", type=_positive_float, default=10.0,
                   metavar="SECS", help="how long a recovered executor has to re-subscribe "
                                        "before it is killed (default 10)")
    p.add_argument("--switch-user", action=argparse.BooleanOptionalAction, default=True,
                   help="when running as root, run executors and tasks as the user the task "
                        "or framework names (default: on)")
    _containerizer_options(p)


def _containerizer_options(p: argparse.ArgumentParser) -> None:
    c = p.add_argument_group("containers (docs/containers.md)")
    c.add_argument("--launcher", choices=("auto", "posix", "linux"), default="auto",
                   help="posix: plain processes in their own sessions; linux (root): "
                        "containers forked by a launch helper, with namespaces, cgroups and "
                        "images; auto (the default): linux when root with cgroups, else posix")
    c.add_argument("--isolation", default=None, metavar="NAMES",
                   help="comma-separated isolators, e.g. 'filesystem/linux,namespaces/pid,"
                        "cgroups/cpu,cgroups/mem,network/cni' (default for linux: "
                        "filesystem/linux,namespaces/pid and the cgroups/cpu and cgroups/mem "
                        "this host has)")
    c.add_argument("--runtime-dir", default=None, metavar="DIR",
                   help="containers' runtime state (default WORK_DIR/run)")
    c.add_argument("--cgroups-root", default="agora", metavar="NAME",
                   help="parent cgroup of this agent's containers in every hierarchy "
                        "(default agora; each agent takes a subdirectory of its own)")
    c.add_argument("--cgroups-enable-cfs", action="store_true",
                   help="cgroups/cpu: also cap CPU time at the cpus given (CFS quota)")
    c.add_argument("--cgroups-pids-limit", type=_nonnegative_int, default=None, metavar="N",
                   help="cgroups/pids: most processes a container may have (default none)")
    c.add_argument("--allowed-devices", default=None, metavar="JSON",
                   help="cgroups/devices: devices allowed besides the defaults (Mesos JSON)")
    c.add_argument("--image-providers", default="docker,oci,appc", metavar="LIST",
                   help="image types tasks may name (default docker,oci,appc)")
    c.add_argument("--image-store-dir", default=None, metavar="DIR",
                   help="layer and image store (default WORK_DIR/provisioner)")
    c.add_argument("--image-provisioner-backend", choices=("overlay", "copy"),
                   default="overlay", help="how a rootfs is built from layers (default overlay)")
    c.add_argument("--image-gc-budget", type=_nonnegative_int, default=None, metavar="BYTES",
                   help="remove unused images when the store holds more (default: never)")
    c.add_argument("--docker-registry", default=None, metavar="URL|DIR",
                   help="default Docker registry, or a directory of `docker save` archives "
                        "named repository:tag.tar (default https://registry-1.docker.io)")
    c.add_argument("--docker-insecure-registries", default="", metavar="HOST:PORT,...",
                   help="registries reached over plain http (loopback ones always are)")
    c.add_argument("--oci-image-dir", default=None, metavar="DIR",
                   help="OCI image layouts and archives for images of type OCI")
    c.add_argument("--appc-store-dir", default=None, metavar="DIR",
                   help="AppC ACI files for images of type APPC")
    c.add_argument("--appc-simple-discovery-uri-prefix", default=None, metavar="URL",
                   help="AppC simple discovery: PREFIX{name}-{version}-{os}-{arch}.aci")
    c.add_argument("--network-cni-config-dir", default=None, metavar="DIR",
                   help="network/cni: CNI network configs (*.conf, *.conflist)")
    c.add_argument("--network-cni-plugins-dir", default="/usr/lib/cni", metavar="DIR",
                   help="network/cni: the plugin binaries (default /usr/lib/cni)")
    c.add_argument("--enforce-container-disk-quota", action="store_true",
                   help="disk/du: a container using more disk than its `disk` fails "
                        "(REASON_CONTAINER_LIMITATION_DISK)")
    c.add_argument("--container-disk-watch-interval", type=_positive_float, default=15.0,
                   metavar="SECS", help="disk/du: how often sandboxes are measured (default 15)")


def _authentication_options(p: argparse.ArgumentParser, kinds) -> None:
    p.add_argument("--credentials", default=None, metavar="FILE",
                   help="principals and secrets for HTTP authentication: Mesos's JSON "
                        '({"credentials": [{"principal": P, "secret": S}]}) or one '
                        "'principal secret' per line")
    for kind, what in kinds:
        p.add_argument(f"--authenticate-http-{kind}", action="store_true",
                       help=f"require credentials (HTTP Basic) on {what}")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="agora", description="A Mesos-style cluster scheduler.")
    sub = top.add_subparsers(dest="command", required=True)

    m = sub.add_parser("master", help="run a master")
    m.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=5050)
    m.add_argument("--hostname", default=None)
    m.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "agora-master"))
    m.add_argument("--secret-file", default=None,
                   help="file holding a secret agents must prove they know")
    _authentication_options(m, (("frameworks", "the scheduler API (frameworks)"),
                                ("readonly", "state endpoints and read-only operator calls"),
                                ("readwrite", "operator calls that change state")))
    m.add_argument("--zk", default=None, metavar="zk://HOST:PORT[,HOST:PORT...]/PATH",
                   help="run as one of several masters: elect the leader in ZooKeeper under "
                        "PATH (use /mesos for mesoshttp clients); followers redirect to it")
    m.add_argument("--zk-session-timeout", type=float, default=10.0, metavar="SECS",
                   help="ZooKeeper session timeout: how long a dead leader holds on "
                        "(default 10)")
    _master_options(m)

    a = sub.add_parser("agent", help="run an agent")
    a.add_argument("--master", type=_master, required=True,
                   metavar="HOST:PORT|zk://HOST:PORT[,HOST:PORT...]/PATH",
                   help="the master, or the ZooKeeper path the masters are elected under "
                        "(the agent follows the leader)")
    a.add_argument("--zk-session-timeout", type=_positive_float, default=10.0,
                   metavar="SECS", help="ZooKeeper session timeout with a zk:// --master "
                                        "(default 10)")
    a.add_argument("--ip", default="127.0.0.1")
    a.add_argument("--port", type=int, default=5051)
    a.add_argument("--hostname", default=None)
    a.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "agora-agent"))
    a.add_argument("--secret-file", default=None)
    _authentication_options(a, (("readonly", "/state, /files, /monitor, /metrics and /flags"),))
    _agent_options(a)

    loc = sub.add_parser("local", help="run a master and N agents in one process")
    loc.add_argument("--agents", type=int, default=1, metavar="N")
    loc.add_argument("--ip", default="127.0.0.1")
    loc.add_argument("--port", type=int, default=5050, help="master port; agents take the next ones")
    loc.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "agora-local"))
    _master_options(loc)
    _agent_options(loc)
    marathon_cli.local_options(loc)
    marathon_cli.add_parsers(sub)
    return top


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.command in marathon_cli.COMMANDS:
        return marathon_cli.main(args)
    from twisted.internet import reactor

    from cli.run import run_agent, run_local, run_master, setup_logging

    setup_logging()
    if args.command == "master":
        return run_master(reactor, args, _read_secret(args.secret_file))
    if args.command == "agent":
        return run_agent(reactor, args, _read_secret(args.secret_file))
    if args.agents < 1:
        sys.exit("agora: --agents must be at least 1")
    return run_local(reactor, args)


if __name__ == "__main__":
    sys.exit(main())
