"""Running daemons under the reactor: start, print where they are, stop cleanly."""

import gc
import logging
import os
import resource
import sys

from twisted.internet import defer
from twisted.logger import (FilteringLogObserver, LogLevel, LogLevelFilterPredicate,
                            globalLogBeginner, textFileLogObserver)

from agora.resources import DEFAULT_PORTS


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("AGORA_LOG_LEVEL", "info")
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    # Modules that run in threads (the fetcher) log through the standard library.
    logging.basicConfig(stream=sys.stderr, level=level.upper(),
                        format="%(asctime)s [%(name)s#%(levelname)s] %(message)s")


def prepare_process() -> None:
    """Process-wide settings for a daemon: many open files, a calmer garbage collector."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:  # one socket per agent and per scheduler connection
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _master_kwargs(args) -> dict:
    return dict(allocation_interval=args.allocation_interval, offer_timeout=args.offer_timeout,
                agent_ping_timeout=args.agent_ping_timeout,
                max_agent_ping_timeouts=args.max_agent_ping_timeouts,
                agent_reregister_timeout=args.agent_reregister_timeout)


def _serve(reactor, services: list, banner) -> int:
    """Start services in order, print the banner, stop them in reverse on shutdown."""
    failed = []

    @defer.inlineCallbacks
    def start():
        try:
            for service in services:
                yield service.start()
        except Exception as e:
            failed.append(e)
            print(f"agora: failed to start: {e}", file=sys.stderr)
            reactor.stop()
            return
        # What start-up built lives as long as the process: keep the collector off it.
        gc.freeze()
        banner()

    @defer.inlineCallbacks
    def stop():
        for service in reversed(services):
            try:
                yield service.stop()
            except Exception as e:  # keep stopping the others
                print(f"agora: error while stopping: {e}", file=sys.stderr)

    prepare_process()
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.callWhenRunning(start)
    reactor.run()
    return 1 if failed else 0


def _http_authentication(args, kinds: tuple) -> tuple:
    """(credentials or None, the `kinds` whose --authenticate-http-KIND flag is on), from
    --credentials; SystemExit with what to do when they do not go together."""
    from agora.http_auth import Credentials

    authenticate = frozenset(k for k in kinds if getattr(args, f"authenticate_http_{k}"))
    if args.credentials:
        try:
            return Credentials.load(args.credentials), authenticate
        except ValueError as e:
            _usage_error(f"--credentials: {e}")
    if authenticate:
        _usage_error("--authenticate-http-* needs --credentials FILE (the principals and "
                     "secrets to accept)")
    return None, authenticate


def _usage_error(message: str):
    print(f"agora: {message}", file=sys.stderr)
    raise SystemExit(2)  # as argparse's


def run_master(reactor, args, secret) -> int:
    from agora import zookeeper
    from master.service import MasterService

    if args.zk:
        try:
            zookeeper.parse_url(args.zk)
        except ValueError as e:
            print(f"agora: --zk: {e}", file=sys.stderr)
            return 2
        if not args.zk_session_timeout > 0:
            print("agora: --zk-session-timeout must be positive", file=sys.stderr)
            return 2
    elif args.registry == "zk":
        print("agora: --registry zk needs --zk zk://HOST:PORT/PATH", file=sys.stderr)
        return 2
    credentials, authenticate = _http_authentication(args, ("frameworks", "readonly",
                                                            "readwrite"))
    master = MasterService(reactor, ip=args.ip, port=args.port, work_dir=args.work_dir,
                           registry=args.registry, hostname=args.hostname, secret=secret,
                           zk=args.zk, zk_session_timeout=args.zk_session_timeout,
                           credentials=credentials, authenticate=authenticate,
                           **_master_kwargs(args))
    return _serve(reactor, [master],
                  lambda: print(f"Master: http://{args.ip}:{master.port}", flush=True))


def _agent_kwargs(args, fetcher_cache_dir) -> dict:
    return dict(resources=args.resources, attributes=args.attributes,
                status_update_retry=args.status_update_retry,
                fetcher_cache_dir=fetcher_cache_dir,
                fetcher_cache_size=args.fetcher_cache_size, gc_delay=args.gc_delay,
                gc_disk_headroom=args.gc_disk_headroom,
                disk_watch_interval=args.disk_watch_interval, switch_user=args.switch_user,
                recover=args.recover,
                executor_reregistration_timeout=args.executor_reregistration_timeout,
                **_launcher(args), container_flags=container_flags(args))


def _launcher(args) -> dict:
    """launcher and isolation: `--launcher auto` picks for this host (docs/containers.md)."""
    from agent.containerizer import choose_launcher
    if args.launcher != "auto":
        return {"launcher": args.launcher, "isolation": args.isolation}
    launcher, isolation = choose_launcher()
    return {"launcher": launcher,
            "isolation": args.isolation if args.isolation is not None else isolation}


def container_flags(args) -> dict:
    """The containerizer's settings (agent.containerizer.build) from the command line."""
    insecure = tuple(h for h in args.docker_insecure_registries.split(",") if h)
    return {
        "runtime_dir": args.runtime_dir, "cgroups_root": args.cgroups_root,
        "cgroups_enable_cfs": args.cgroups_enable_cfs,
        "cgroups_pids_limit": args.cgroups_pids_limit,
        "allowed_devices": args.allowed_devices, "image_providers": args.image_providers,
        "image_store_dir": args.image_store_dir, "backend": args.image_provisioner_backend,
        "image_gc_budget": args.image_gc_budget, "docker_registry": args.docker_registry,
        "docker_insecure_registries": insecure, "oci_image_dir": args.oci_image_dir,
        "appc_store_dir": args.appc_store_dir,
        "appc_simple_discovery_uri_prefix": args.appc_simple_discovery_uri_prefix,
        "network_cni_config_dir": args.network_cni_config_dir,
        "network_cni_plugins_dir": args.network_cni_plugins_dir,
        "enforce_container_disk_quota": args.enforce_container_disk_quota,
        "container_disk_watch_interval": args.container_disk_watch_interval,
    }


def run_agent(reactor, args, secret) -> int:
    from agent.agent import Agent

    from agora.http_auth import Authenticator

    credentials, authenticate = _http_authentication(args, ("readonly",))
    try:
        agent = Agent(reactor, master=args.master, work_dir=args.work_dir, ip=args.ip,
                      port=args.port, hostname=args.hostname, secret=secret,
                      zk_session_timeout=args.zk_session_timeout,
                      http_authenticator=Authenticator(credentials, "mesos")
                      if authenticate else None,
                      **_agent_kwargs(args, args.fetcher_cache_dir))
    except ValueError as e:
        print(f"agora: {e}", file=sys.stderr)
        return 2
    return _serve(reactor, [agent],
                  lambda: print(f"Agent: http://{args.ip}:{agent.port}", flush=True))


def _local_agent_identity(index: int, count: int, ip: str, resources: str | None) -> dict:
    """What tells a local cluster's agents apart, as separate hosts would be: on loopback
    each its own address, 127.0.0.<1+index>, which is also its hostname (resolvable, so a
    task may bind $HOST; placement constraints on hostname spread over them), and, unless
    --resources names ports, a slice each of the default port range."""
    if count == 1:
        return {}
    out = {}
    if ip == "127.0.0.1":
        out["ip"] = out["hostname"] = f"127.0.0.{1 + index}"
    if resources is None or "ports" not in resources:
        (first, last), = DEFAULT_PORTS
        span = (last - first + 1) // count
        begin = first + index * span
        ports = f"ports:[{begin}-{begin + span - 1}]"
        out["resources"] = f"{resources};{ports}" if resources else ports
    return out


def run_local(reactor, args) -> int:
    from agent.agent import Agent
    from master.service import MasterService

    os.makedirs(args.work_dir, exist_ok=True)
    if args.registry == "zk":
        print("agora: --registry zk needs --zk, which agora local does not take",
              file=sys.stderr)
        return 2
    master = MasterService(reactor, ip=args.ip, port=args.port,
                           work_dir=os.path.join(args.work_dir, "master"),
                           registry=args.registry, **_master_kwargs(args))
    services = [master]
    agents = []

    class _Agents:
        """Creates the agents once the master's port is known (it may be 0)."""

        def start(self):
            ds = []
            for i in range(args.agents):
                port = 0 if args.port == 0 else args.port + 1 + i
                # A fetcher cache belongs to one agent: each gets its own directory.
                cache = (os.path.join(args.fetcher_cache_dir, f"agent{i}")
                         if args.fetcher_cache_dir else None)
                kwargs = dict(_agent_kwargs(args, cache), ip=args.ip)
                kwargs.update(_local_agent_identity(i, args.agents, args.ip, args.resources))
                agent = Agent(reactor, master=(args.ip, master.port),
                              work_dir=os.path.join(args.work_dir, f"agent{i}"),
                              port=port, **kwargs)
                agents.append(agent)
                ds.append(agent.start())
            return defer.gatherResults(ds, consumeErrors=True)

        def stop(self):
            return defer.DeferredList([a.stop() for a in agents])

    services.append(_Agents())
    marathon = None
    if args.marathon:
        from cli.marathon import LocalMarathon
        marathon = LocalMarathon.if_installed(reactor, args, lambda: master.port)
        if marathon is not None:
            services.append(marathon)

    def banner():
        print(f"Agora local cluster ({len(agents)} agents), work dir {args.work_dir}", flush=True)
        print(f"  master: http://{args.ip}:{master.port}   (pymesos: {args.ip}:{master.port})",
              flush=True)
        for i, a in enumerate(agents):
            print(f"  agent{i}: http://{a.ip}:{a.port}", flush=True)
        if marathon is not None:
            print(f"  marathon: http://{args.ip}:{marathon.port}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)

    return _serve(reactor, services, banner)
