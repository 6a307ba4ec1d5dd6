"""`agora marathon` (the app scheduler) and `agora app why APP` (why an app is not placed).

cli/main.py adds these parsers with `add_parsers` and hands their commands to `main`;
`agora local` starts one Marathon through `local_service`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

COMMANDS = ("marathon", "app")
DEFAULT_URL = "http://127.0.0.1:8080"


def _zk(text: str) -> str:
    from agora import zookeeper
    try:
        zookeeper.parse_url(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _numbers():
    """cli/main's argument types (imported late: cli/main imports this module)."""
    from cli.main import _number, _positive_float
    return _positive_float, _number(int, lambda v: v >= 1, "a whole number >= 1")


def scheduler_options(p: argparse.ArgumentParser) -> None:
    """The flags that tune the scheduler (also taken by `agora local`)."""
    _positive, _count = _numbers()
    g = p.add_argument_group("scheduler (Marathon's flags, same defaults)")
    g.add_argument("--framework-name", default="marathon")
    g.add_argument("--mesos-role", default="*", help="the role to register with (default *)")
    g.add_argument("--mesos-user", default=None,
                   help="the user tasks run as unless an app names one (default: ours)")
    g.add_argument("--failover-timeout", type=_positive, default=604800.0, metavar="SECS",
                   help="how long the master keeps our tasks while no Marathon is "
                        "registered (default 1 week)")
    g.add_argument("--max-instances-per-offer", type=_count, default=5, metavar="N")
    g.add_argument("--decline-offer-duration", type=_positive, default=120.0, metavar="SECS",
                   help="refuse_seconds of declined offers (default 120)")
    g.add_argument("--min-revive-offers-interval", type=_positive, default=5.0,
                   metavar="SECS", help="at most one REVIVE this often (default 5)")
    g.add_argument("--task-launch-timeout", type=_positive, default=300.0, metavar="SECS")
    g.add_argument("--task-launch-confirm-timeout", type=_positive, default=300.0,
                   metavar="SECS")
    g.add_argument("--kill-retry-timeout", type=_positive, default=30.0, metavar="SECS")
    g.add_argument("--reconciliation-interval", type=_positive, default=600.0, metavar="SECS")
    g.add_argument("--scale-apps-interval", type=_positive, default=300.0, metavar="SECS")
    g.add_argument("--max-running-deployments", type=_count, default=100, metavar="N")
    g.add_argument("--zk-max-versions", type=_count, default=50, metavar="N",
                   help="versions kept per app (default 50)")
    g.add_argument("--mesos-authentication-principal", default=None, metavar="P",
                   help="authenticate to the master as P (needs the secret file)")
    g.add_argument("--mesos-authentication-secret-file", default=None, metavar="FILE",
                   help="file holding the principal's secret")


def add_parsers(sub) -> None:
    _positive, _ = _numbers()
    m = sub.add_parser("marathon", help="run Marathon, the app scheduler (a framework)")
    m.add_argument("--master", required=True, metavar="HOST:PORT|zk://HOST:PORT/PATH",
                   help="the Mesos master, or the ZooKeeper path masters are elected under")
    m.add_argument("--zk", type=_zk, default=None, metavar="zk://HOST:PORT[,...]/PATH",
                   help="run as one of several Marathons: elect a leader and keep the state "
                        "in ZooKeeper under PATH; followers proxy to the leader")
    m.add_argument("--zk-session-timeout", type=_positive, default=10.0, metavar="SECS")
    m.add_argument("--ip", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    m.add_argument("--port", type=int, default=8080)
    m.add_argument("--hostname", default=None, help="the name other Marathons and clients "
                                                    "reach us by (default: this host's)")
    m.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "agora-marathon"),
                   help="where the embedded store (marathon.sqlite) lives without --zk")
    m.add_argument("--http-credentials", default=None, metavar="USER:PASSWORD",
                   help="require HTTP Basic authentication with these credentials on every "
                        "endpoint but /ping (Marathon's --http_credentials)")
    m.add_argument("--store", choices=("sqlite", "zk", "memory"), default=None,
                   help="where apps, deployments and instances are kept (default: zk with "
                        "--zk, else a SQLite file in --work-dir)")
    scheduler_options(m)

    a = sub.add_parser("app", help="ask Marathon about an app")
    asub = a.add_subparsers(dest="app_command", required=True)
    why = asub.add_parser("why", help="why the app's waiting instances are not placed")
    why.add_argument("app", help="the app id, e.g. /shop/web")
    why.add_argument("--marathon", default=os.environ.get("MARATHON_URL", DEFAULT_URL),
                     help=f"Marathon's URL (default $MARATHON_URL or {DEFAULT_URL})")


def _mesos_secret(args) -> str:
    """The secret for --mesos-authentication-principal; SystemExit saying what is missing."""
    if not args.mesos_authentication_principal:
        if args.mesos_authentication_secret_file:
            sys.exit("agora: --mesos-authentication-secret-file needs "
                     "--mesos-authentication-principal")
        return ""
    if not args.mesos_authentication_secret_file:
        sys.exit("agora: --mesos-authentication-principal needs "
                 "--mesos-authentication-secret-file FILE")
    try:
        with open(args.mesos_authentication_secret_file, encoding="utf-8") as f:
            secret = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        sys.exit(f"agora: cannot read --mesos-authentication-secret-file: {e}")
    if not secret:
        sys.exit(f"agora: {args.mesos_authentication_secret_file} is empty")
    return secret


def options_from(args, hostname: str | None = None):
    from frameworks.marathon.scheduler import Options
    import getpass

    return Options(
        principal=args.mesos_authentication_principal or "", secret=_mesos_secret(args),
        framework_name=args.framework_name, role=args.mesos_role,
        user=args.mesos_user or getpass.getuser(), failover_timeout=args.failover_timeout,
        max_instances_per_offer=args.max_instances_per_offer,
        decline_offer_duration=args.decline_offer_duration,
        min_revive_interval=args.min_revive_offers_interval,
        task_launch_timeout=args.task_launch_timeout,
        task_launch_confirm_timeout=args.task_launch_confirm_timeout,
        kill_retry_timeout=args.kill_retry_timeout,
        reconciliation_interval=args.reconciliation_interval,
        scale_apps_interval=args.scale_apps_interval, hostname=hostname or "localhost")


def main(args) -> int:
    if args.command == "app":
        return why(args.app, args.marathon)
    return run(args)


def run(args) -> int:
    import socket

    from twisted.internet import reactor

    from agora.http_auth import Credentials
    from cli.run import _serve, setup_logging
    from frameworks.marathon.service import MarathonService

    setup_logging()
    if args.store == "zk" and not args.zk:
        print("agora: --store zk needs --zk zk://HOST:PORT/PATH", file=sys.stderr)
        return 2
    credentials = None
    if args.http_credentials is not None:
        try:
            credentials = Credentials.parse(args.http_credentials)
        except ValueError:
            print("agora: --http-credentials: expected USER:PASSWORD", file=sys.stderr)
            return 2
    hostname = args.hostname or socket.gethostname()
    service = MarathonService(
        reactor, master=args.master, port=args.port, ip=args.ip, hostname=hostname,
        work_dir=args.work_dir, zk=args.zk, zk_session_timeout=args.zk_session_timeout,
        store=args.store, options=options_from(args, hostname), http_credentials=credentials,
        max_versions=args.zk_max_versions,
        max_running_deployments=args.max_running_deployments)
    rc = _serve(reactor, [service],
                lambda: print(f"Marathon: http://{args.ip}:{service.port}", flush=True))
    return rc or service.exit_code


class LocalMarathon:
    """The Marathon `agora local` runs, made when it starts: after the master, whose port
    (maybe picked at random) it needs."""

    def __init__(self, reactor, args, master_port):
        self.reactor, self.args, self.master_port = reactor, args, master_port
        self.service = None

    @classmethod
    def if_installed(cls, reactor, args, master_port):
        """A LocalMarathon, or None (with a note) when pymesos is not installed."""
        try:
            import pymesos  # noqa: F401
        except ImportError:
            print("agora: not starting Marathon: pymesos is not installed "
                  "(pip install -e '.[clients]'; see docs/install.md)", file=sys.stderr)
            return None
        return cls(reactor, args, master_port)

    @property
    def port(self) -> int:
        return self.service.port if self.service is not None else self._wanted_port()

    def _wanted_port(self) -> int:
        if self.args.marathon_port is not None:
            return self.args.marathon_port
        return 0 if self.args.port == 0 else 8080

    def start(self):
        from frameworks.marathon.service import MarathonService

        args = self.args
        self.service = MarathonService(
            self.reactor, master=f"{args.ip}:{self.master_port()}", port=self._wanted_port(),
            ip=args.ip, hostname=args.ip, work_dir=os.path.join(args.work_dir, "marathon"),
            options=options_from(args, args.ip), max_versions=args.zk_max_versions,
            max_running_deployments=args.max_running_deployments)
        return self.service.start()

    def stop(self):
        from twisted.internet import defer
        return self.service.stop() if self.service is not None else defer.succeed(None)


def local_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--marathon-port", type=int, default=None,
                   help="Marathon's port (default 8080, or a free one with --port 0)")
    p.add_argument("--no-marathon", dest="marathon", action="store_false",
                   help="do not start Marathon")
    scheduler_options(p)


# --- agora app why ---------------------------------------------------------------------------

def _get(url: str):
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def why(app_id: str, marathon: str, out=sys.stdout) -> int:
    """Print why APP's waiting instances are not placed; exit 0 when it has an answer."""
    base = marathon.rstrip("/")
    if not app_id.startswith("/"):
        app_id = "/" + app_id
    try:
        queue = _get(f"{base}/v2/queue?embed=lastUnusedOffers")["queue"]
        app = _get(f"{base}/v2/apps{urllib.parse.quote(app_id)}")["app"]
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:
            body = json.loads(body).get("message", body)
        except ValueError:
            pass
        print(f"agora: {body}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"agora: cannot ask Marathon at {base}: {e}", file=sys.stderr)
        return 1
    item = next((q for q in queue if q["app"]["id"] == app_id), None)
    running, wanted = app.get("tasksRunning", 0), app.get("instances", 0)
    if item is None:
        print(f"{app_id}: nothing is waiting to be placed ({running} of {wanted} instances "
              "running).", file=out)
        return 0
    print(f"{app_id}: {item['count']} instance(s) waiting to be placed "
          f"({running} of {wanted} running), waiting since {item.get('since')}.", file=out)
    delay = item.get("delay") or {}
    if not delay.get("overdue", True):
        print(f"  backing off after failures: next launch in {delay.get('timeLeftSeconds')}s",
              file=out)
    summary = item.get("processedOffersSummary") or {}
    print(f"  offers looked at: {summary.get('processedOffersCount', 0)}, not used: "
          f"{summary.get('unusedOffersCount', 0)}", file=out)
    declined = [(r["reason"], r["declined"]) for r in
                summary.get("rejectSummaryLaunchAttempt") or [] if r["declined"]]
    if declined:
        print("  declined because:", file=out)
        for reason, count in sorted(declined, key=lambda x: -x[1]):
            print(f"    {reason:<24} {count} offer(s)", file=out)
    elif summary.get("processedOffersCount", 0) == 0:
        print("  no offers have come yet (is any agent free, or are offers refused?)",
              file=out)
    last = item.get("lastUnusedOffers") or []
    if last:
        print("  last offers not used:", file=out)
        for entry in last[-5:]:
            offer = entry.get("offer") or {}
            print(f"    {offer.get('hostname')}: {', '.join(entry.get('reason') or [])}"
                  f"{' (' + entry['detail'] + ')' if entry.get('detail') else ''}", file=out)
    return 0
