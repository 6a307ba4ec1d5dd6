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
