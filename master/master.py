"""The master: frameworks, agents, offers and tasks, driven by calls and agent messages.

The HTTP layer (master/api/) turns requests into calls on `Master`; agent links
(master/links.py) turn messages into `on_*` calls. The allocator decides who is offered
what; this class keeps the books, validates, and talks to schedulers and agents.
Time comes from the injected reactor (`callLater`, `seconds`).
"""

import itertools
import os
import uuid as _uuid

from twisted.internet import defer
from twisted.internet import task as _task
from twisted.logger import Logger

from agora import mesos_json as mj
from agora import health_checks, protocol, recordio
from agora.resources import Resources, validate_role
from master.allocator.allocator import Allocator
from master.records import (Agent, Executor, Framework, OfferRecord, Task, capabilities_of,
                            roles_of)

log = Logger()

DEFAULT_REFUSE_SECONDS = 5.0
MAX_REFUSE_SECONDS = 365 * 86400.0
#: How many distinct resource lists `Master.resources` remembers before it starts afresh.
PARSED_RESOURCES_MAX = 4096


class CallError(Exception):
    """A scheduler call that cannot be carried out; `status` is the HTTP status to answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class Master:
    """The leading master's state machine."""

    def __init__(self, reactor, *, ip: str, port: int, hostname: str | None = None,
                 registrar=None, allocation_interval: float = 1.0,
                 offer_timeout: float | None = None, agent_ping_timeout: float = 15.0,
                 max_agent_ping_timeouts: int = 5, heartbeat_interval: float = 15.0,
                 agent_reregister_timeout: float = 600.0,
                 secret: bytes | None = None, flags: dict | None = None,
                 max_completed_frameworks: int = 50):
        self.reactor = reactor
        self.id = str(_uuid.uuid4())
        self.ip, self.port = ip, port
        self.hostname = hostname or ip
        self.registrar = registrar
        self.allocation_interval = allocation_interval
        self.offer_timeout = offer_timeout
        self.agent_ping_timeout = agent_ping_timeout
        self.max_agent_ping_timeouts = max_agent_ping_timeouts
        self.heartbeat_interval = heartbeat_interval
        self.agent_reregister_timeout = agent_reregister_timeout
        self.secret = secret
        self.flags = flags or {}
        self.start_time = reactor.seconds()
        self.allocator = Allocator(clock=reactor.seconds)
        self.frameworks: dict[str, Framework] = {}
        self.completed_frameworks: list[Framework] = []
        self.max_completed_frameworks = max_completed_frameworks
        self.agents: dict[str, Agent] = {}
        self.offers: dict[str, OfferRecord] = {}
        self.operator_streams: set = set()
        self._unreachable: dict[str, float] = {}  # agent id -> when it was marked unreachable
        # Agents the registry says were admitted, not yet re-registered with this master.
        self._recovering: dict[str, dict] = {}  # agent id -> AgentInfo
        self._reregister_call = None
        self._recovered_at = 0.0
        self._back = [0, 0]  # recovering agents (and their tasks) back since the last summary
        self._back_call = None
        self.metrics = dict.fromkeys((
            "tasks_finished", "tasks_failed", "tasks_killed", "tasks_lost", "tasks_error",
            "tasks_dropped", "tasks_gone", "tasks_unreachable", "frameworks_removed",
            "slave_registrations", "slave_reregistrations", "slave_removals",
            "valid_status_updates", "invalid_status_updates", "messages_launch_tasks",
            "messages_decline_offers", "messages_kill_task", "outstanding_offers_made",
            "allocation_runs", "dropped_messages", "dropped_registrations"), 0)
        self._framework_seq = itertools.count()
        self._agent_seq = itertools.count()
        self._offer_seq = itertools.count()
        self._allocation_call = None
        self._burst = set()  # frameworks that got events this turn: they get a heartbeat
        self._burst_call = None
        self._loops: list = []
        self._parsed: dict[str | bytes, Resources] = {}  # see resources()

    # --- lifecycle -------------------------------------------------------------------

    @property
    def info(self) -> dict:
        return mj.master_info(self.id, self.ip, self.port, self.hostname)

    def recover(self, records: dict) -> None:
        """Take over from the registry (before `start`): a new leader's first step.

        Admitted agents get `agent_reregister_timeout` to re-register before they are marked
        unreachable; unreachable ones are remembered as such (their tasks are killed when
        they return, unless the framework is PARTITION_AWARE); gone ones stay refused.
        Frameworks are recreated disconnected, their failover timers running.
        """
        now = self.now()
        for role, weight in records.get("weights", {}).items():
            try:
                self.allocator.set_weight(role, weight)
            except ValueError as e:
                log.warn("Ignoring the registry's weight for {role}: {e}", role=role, e=e)
        for agent_id, (state, info) in records.get("agents", {}).items():
            if state == "admitted":
                self._recovering[agent_id] = info
            elif state == "unreachable":
                self._unreachable[agent_id] = now
        for fid, record in records.get("frameworks", {}).items():
            if fid not in self.frameworks:
                fw = self._recover_framework(fid, record.get("info") or {})
                fw.registered_time = record.get("registered_time", now)
        self._recovered_at = now
        if self._recovering:
            log.info("Recovered {a} agents and {f} frameworks from the registry; agents have "
                     "{t}s to re-register", a=len(self._recovering),
                     f=len(records.get("frameworks", {})), t=self.agent_reregister_timeout)
            self._reregister_call = self.reactor.callLater(
                self.agent_reregister_timeout, self._reregister_timed_out)

    @property
    def awaited_agents(self) -> int:
        """How many agents the registry holds as admitted that have not re-registered yet."""
        return len(self._recovering)

    def recovering_agents(self) -> dict:
        """agent id -> AgentInfo of agents still expected to re-register after a failover."""
        return dict(self._recovering)

    def update_weights(self, weight_infos) -> defer.Deferred:
        """Set roles' weights: durable in the registry first, then in the allocator."""
        if not isinstance(weight_infos, list):
            raise CallError(400, "'update_weights.weight_infos' must be a list")
        weights = {}
        for item in weight_infos:
            role = item.get("role") if isinstance(item, dict) else None
            weight = item.get("weight") if isinstance(item, dict) else None
            if not isinstance(role, str) or not role:
                raise CallError(400, "Each weight_info needs a non-empty 'role'")
            if not isinstance(weight, (int, float)) or isinstance(weight, bool) or \
                    not 0 < weight < float("inf"):
                raise CallError(400, f"Weight of role '{role}' must be a positive number, "
                                     f"got {weight!r}")
            weights[role] = float(weight)
        d = defer.gatherResults([self.registrar.set_weight(r, w) for r, w in weights.items()],
                                consumeErrors=True)

        def durable(_):
            for role, weight in weights.items():
                self.allocator.set_weight(role, weight)
            self.trigger_allocation()

        return d.addCallback(durable)

    def _reregister_timed_out(self) -> None:
        """Agents that did not come back after a failover are unreachable."""
        self._reregister_call = None
        recovering, self._recovering = self._recovering, {}
        now = self.now()
        for agent_id, info in recovering.items():
            self._unreachable[agent_id] = now
            self.registrar.mark(agent_id, "unreachable", info)
            self.metrics["slave_removals"] += 1
            log.warn("Agent {aid} did not re-register within {t}s; marked unreachable",
                     aid=agent_id, t=self.agent_reregister_timeout)
        for fw in self.frameworks.values():
            for agent_id in recovering:
                self.send(fw, mj.event("FAILURE", {"agent_id": mj.ident(agent_id)}))

    def start(self) -> None:
        for interval, fn in ((self.allocation_interval, self.allocate),
                             (self.heartbeat_interval, self._heartbeat_frameworks),
                             (self.agent_ping_timeout, self._ping_agents)):
            loop = _task.LoopingCall(fn)
            loop.clock = self.reactor
            loop.start(interval, now=False)
            self._loops.append(loop)

    def stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for call in (self._allocation_call, self._burst_call, self._reregister_call,
                     self._back_call):
            if call is not None and call.active():
                call.cancel()
        for fw in self.frameworks.values():
            if fw.failover_call is not None and fw.failover_call.active():
                fw.failover_call.cancel()
            if fw.stream is not None:
                fw.stream.close()
        for agent in self.agents.values():
            if agent.lost_call is not None and agent.lost_call.active():
                agent.lost_call.cancel()
            if agent.link is not None:
                agent.link.close()
        for offer in self.offers.values():
            if offer.timeout_call is not None and offer.timeout_call.active():
                offer.timeout_call.cancel()
        for stream in list(self.operator_streams):
            stream.close()

    def now(self) -> float:
        return self.reactor.seconds()

    def resources(self, items) -> Resources:
        """`Resources.from_json(items)` (ValueError if invalid), remembered by the list's repr,
        or by the bytes themselves when `items` came packed (`protocol.task_entry`): agents
        and tasks repeat a few shapes, and parsing was a third of the master's work when
        10,000 agents re-registered with 100,000 tasks. Resources are immutable."""
        key = items if isinstance(items, bytes) else repr(items)
        found = self._parsed.get(key)
        if found is None:
            if isinstance(items, bytes):
                items = protocol.unpacked(items)
            found = Resources.from_json(items)
            if len(self._parsed) >= PARSED_RESOURCES_MAX:
                self._parsed.clear()
            self._parsed[key] = found
        return found

    # --- sending ---------------------------------------------------------------------

    def send(self, fw: Framework, event: dict) -> None:
        """Write an event on the framework's stream (dropped when it is disconnected)."""
        if fw.stream is None or fw.stream.closed:
            self.metrics["dropped_messages"] += 1
            return
        fw.stream.write(recordio.encode_json(event))
        # mesoshttp handles an event only when the next record starts: follow each burst
        # with a heartbeat so events are not held back until the next periodic one.
        self._burst.add(fw)
        if self._burst_call is None:
            self._burst_call = self.reactor.callLater(0, self._flush_burst)

    def _flush_burst(self) -> None:
        self._burst_call = None
        burst, self._burst = self._burst, set()
        beat = recordio.encode_json(mj.event("HEARTBEAT"))
        for fw in burst:
            if fw.stream is not None and not fw.stream.closed:
                fw.stream.write(beat)

    def _heartbeat_frameworks(self) -> None:
        beat = recordio.encode_json(mj.event("HEARTBEAT"))
        for fw in self.frameworks.values():
            if fw.stream is not None and not fw.stream.closed:
                fw.stream.write(beat)
        for stream in list(self.operator_streams):
            stream.write(beat)

    def publish(self, event: dict) -> None:
        """Send an event to every operator API subscriber."""
        if self.operator_streams:
            data = recordio.encode_json(event)
            for stream in list(self.operator_streams):
                stream.write(data)

    def send_agent(self, agent: Agent, msg) -> bool:
        if agent.link is None or not agent.connected:
            return False
        agent.link.send(msg)
        return True

    # --- frameworks ------------------------------------------------------------------

    def validate_subscribe(self, call: dict) -> dict:
        """The FrameworkInfo of a SUBSCRIBE call, or CallError(400)."""
        sub = call.get("subscribe")
        if not isinstance(sub, dict) or not isinstance(sub.get("framework_info"), dict):
            raise CallError(400, "Expecting 'subscribe.framework_info' to be present")
        info = dict(sub["framework_info"])
        if not isinstance(info.get("user"), str):
            raise CallError(400, "Expecting 'framework_info.user' to be present")
        caps = capabilities_of(info)
        if "roles" in info and "MULTI_ROLE" not in caps:
            raise CallError(400, "'FrameworkInfo.roles' is set but the framework does not "
                                 "have the MULTI_ROLE capability")
        if "role" in info and "MULTI_ROLE" in caps:
            raise CallError(400, "'FrameworkInfo.role' must not be set with MULTI_ROLE; "
                                 "use 'roles'")
        roles = info.get("roles") if "MULTI_ROLE" in caps else [info.get("role", "*")]
        if not isinstance(roles, list) or not all(isinstance(r, str) and r for r in roles):
            raise CallError(400, "Framework roles must be non-empty strings")
        for role in roles:
            try:
                validate_role(role)
            except ValueError as e:
                raise CallError(400, f"Invalid role: {e}") from None
        fid = mj.id_of(call, "framework_id", required=False) or mj.id_of(info, "id", False)
        if fid:
            info["id"] = mj.ident(fid)
            if any(f.id == fid for f in self.completed_frameworks):
                raise CallError(403, f"Framework {fid} has been removed; subscribe without "
                                     "an id to register anew")
        return info

    def subscribe(self, info: dict, stream, stream_id: str) -> None:
        """Attach a new or returning framework to its event stream."""
        fid = mj.id_of(info, "id", required=False)
        roles = roles_of(info)
        fw = self.frameworks.get(fid) if fid else None
        if fw is None:
            if not fid:
                fid = f"{self.id}-{next(self._framework_seq):04d}"
                info["id"] = mj.ident(fid)
            registered = self.now()
            d = self.registrar.put_framework(fid, info, registered)
            d.addCallback(lambda _: self._attach_new(info, roles, stream, stream_id, registered))
            d.addErrback(lambda f: (log.failure("Registry write failed", f), stream.close()))
            return
        if fw.info != info:
            self.registrar.put_framework(fid, info, fw.registered_time)
        self._attach(fw, info, roles, stream, stream_id, first=False)

    def _attach_new(self, info, roles, stream, stream_id, registered) -> None:
        fid = mj.id_of(info, "id")
        if stream.closed:  # it went while the registry was written: it fails over from here
            if fid not in self.frameworks:
                fw = self._recover_framework(fid, info)
                fw.registered_time = registered
            return
        fw = self.frameworks.get(fid)
        if fw is not None:  # e.g. an agent reported its tasks meanwhile
            self._attach(fw, info, roles, stream, stream_id, first=False)
            return
        fw = Framework(id=fid, info=info, roles=roles, registered_time=registered)
        self.frameworks[fid] = fw
        self.allocator.add_framework(fid, roles, used=self._framework_used(fid))
        self._attach(fw, info, roles, stream, stream_id, first=True)

    def _attach(self, fw: Framework, info, roles, stream, stream_id, first: bool) -> None:
        fid = fw.id
        if not first:
            old = fw.stream
            fw.info, fw.reregistered_time = info, self.now()
            if roles != fw.roles:
                fw.roles = roles
                self.allocator.update_framework_roles(fid, roles)
            if fw.failover_call is not None and fw.failover_call.active():
                fw.failover_call.cancel()
            fw.failover_call = None
            fw.stream = None
            if old is not None and not old.closed:
                old.close()
        fw.stream, fw.stream_id, fw.connected = stream, stream_id, True
        stream.on_close(lambda: self._stream_closed(fw, stream))
        self.allocator.activate_framework(fid)
        self.send(fw, mj.event("SUBSCRIBED", {
            "framework_id": mj.ident(fid), "heartbeat_interval_seconds": self.heartbeat_interval,
            "master_info": self.info}))
        for agent in self.agents.values():
            if fid in agent.executors or any(k[0] == fid for k in agent.tasks):
                self.send_agent(agent, protocol.UpdateFramework(framework=info))
        self.publish(mj.event("FRAMEWORK_ADDED" if first else "FRAMEWORK_UPDATED",
                              {"framework": self._framework_view(fw)}))
        log.info("Framework {fid} ({name}) {what}", fid=fid, name=fw.name,
                 what="registered" if first else "re-subscribed")
        self.trigger_allocation()

    def _framework_used(self, fid: str) -> dict:
        used = {}
        for agent in self.agents.values():
            res = agent.used().get(fid)
            if res:
                used[agent.id] = res
        return used

    def _stream_closed(self, fw: Framework, stream) -> None:
        if fw.stream is not stream or fw.removed:
            return
        fw.stream, fw.connected = None, False
        fw.unregistered_time = self.now()
        self.allocator.deactivate_framework(fw.id)
        for offer_id in list(fw.offers):
            self._remove_offer(offer_id, rescind=False)
        timeout = fw.failover_timeout
        log.info("Framework {fid} disconnected; failover timeout {t}s", fid=fw.id, t=timeout)
        fw.failover_call = self.reactor.callLater(timeout, self._failover_expired, fw)

    def _failover_expired(self, fw: Framework) -> None:
        fw.failover_call = None
        if not fw.connected and not fw.removed:
            log.info("Framework {fid} failover timeout expired; removing it", fid=fw.id)
            self.remove_framework(fw)

    def framework_for_call(self, call: dict, stream_id: str | None) -> Framework:
        """The subscribed framework a call is for, or CallError."""
        fid = mj.id_of(call, "framework_id", required=False)
        if not fid:
            raise CallError(400, "Expecting 'framework_id' to be present")
        fw = self.frameworks.get(fid)
        if fw is None:
            raise CallError(400, f"Framework {fid} not found")
        if not fw.connected:
            raise CallError(403, "Framework is not subscribed")
        if not stream_id:
            raise CallError(400, "All non-subscribe calls should include the "
                                 "'Mesos-Stream-Id' header")
        if stream_id != fw.stream_id:
            raise CallError(400, f"The stream ID '{stream_id}' included in this request "
                                 f"didn't match the stream ID currently associated with "
                                 f"framework ID {fid}")
        return fw

    def teardown(self, fw: Framework) -> None:
        self.remove_framework(fw)

    def remove_framework(self, fw: Framework) -> None:
        """Remove a framework: its offers, tasks and executors everywhere."""
        if fw.removed:
            return
        fw.removed = True
        for offer_id in list(fw.offers):
            self._remove_offer(offer_id, rescind=False)
        for agent in self.agents.values():
            if fw.id in agent.executors or any(k[0] == fw.id for k in agent.tasks):
                self.send_agent(agent, protocol.ShutdownFramework(framework_id=fw.id))
            for key in [k for k in agent.tasks if k[0] == fw.id]:
                task = agent.tasks.pop(key)
                if not mj.is_terminal(task.state):
                    task.state = "TASK_KILLED"
                fw.completed_tasks.append(task)
            agent.executors.pop(fw.id, None)
        fw.tasks.clear()
        self.allocator.remove_framework(fw.id)
        if fw.failover_call is not None and fw.failover_call.active():
            fw.failover_call.cancel()
        stream, fw.stream, fw.connected = fw.stream, None, False
        if stream is not None and not stream.closed:
            stream.close()
        fw.unregistered_time = self.now()
        self.registrar.remove_framework(fw.id)
        del self.frameworks[fw.id]
        self.completed_frameworks.append(fw)
        del self.completed_frameworks[:-self.max_completed_frameworks]
        self.metrics["frameworks_removed"] += 1
        self.publish(mj.event("FRAMEWORK_REMOVED", {"framework_info": fw.info}))
        log.info("Framework {fid} removed", fid=fw.id)
        self.trigger_allocation()

    # --- allocation and offers -------------------------------------------------------

    def trigger_allocation(self) -> None:
        """Run an allocation cycle soon; triggers in the same turn are coalesced."""
        if self._allocation_call is None:
            self._allocation_call = self.reactor.callLater(0, self._allocate_pending)

    def _allocate_pending(self) -> None:
        self._allocation_call = None
        self._make_offers(self.allocator.allocate(self.allocator.pending_agents()))

    def allocate(self) -> None:
        """The batched cycle over all agents."""
        self._make_offers(self.allocator.allocate())

    def _make_offers(self, decisions) -> None:
        self.metrics["allocation_runs"] += 1
        by_framework: dict[str, list] = {}
        for d in decisions:
            fw, agent = self.frameworks.get(d.framework_id), self.agents.get(d.agent_id)
            if fw is None or agent is None or not fw.connected:
                self.allocator.recover(d.framework_id, d.agent_id, d.resources)
                continue
            offer = OfferRecord(id=f"{self.id}-O{next(self._offer_seq)}", framework_id=fw.id,
                                agent_id=agent.id, role=d.role, resources=d.resources)
            self.offers[offer.id] = offer
            fw.offers.add(offer.id)
            agent.offers.add(offer.id)
            if self.offer_timeout:
                offer.timeout_call = self.reactor.callLater(
                    self.offer_timeout, self._remove_offer, offer.id, True)
            by_framework.setdefault(fw.id, []).append(self._offer_view(offer, fw, agent))
        for fid, offers in by_framework.items():
            self.metrics["outstanding_offers_made"] += len(offers)
            self.send(self.frameworks[fid], mj.event("OFFERS", {"offers": offers}))

    def _offer_view(self, offer: OfferRecord, fw: Framework, agent: Agent) -> dict:
        view = {
            "id": mj.ident(offer.id), "framework_id": mj.ident(fw.id),
            "agent_id": mj.ident(agent.id), "hostname": agent.hostname,
            "url": {"scheme": "http", "address": {"hostname": agent.hostname, "ip": agent.ip,
                                                  "port": agent.port}, "path": "/slave(1)"},
            "resources": offer.resources.to_json(
                allocation_role=offer.role if fw.multi_role else None),
            "attributes": agent.attributes,
            "executor_ids": [mj.ident(e) for e in agent.executors.get(fw.id, {})],
        }
        if fw.multi_role:
            view["allocation_info"] = {"role": offer.role}
        return view

    def _remove_offer(self, offer_id: str, rescind: bool,
                      refuse_seconds: float | None = None) -> OfferRecord | None:
        """Forget an offer and give its resources back to the allocator."""
        offer = self.offers.pop(offer_id, None)
        if offer is None:
            return None
        if offer.timeout_call is not None and offer.timeout_call.active():
            offer.timeout_call.cancel()
        fw = self.frameworks.get(offer.framework_id)
        agent = self.agents.get(offer.agent_id)
        if fw is not None:
            fw.offers.discard(offer_id)
            if rescind:
                self.send(fw, mj.event("RESCIND", {"offer_id": mj.ident(offer_id)}))
        if agent is not None:
            agent.offers.discard(offer_id)
        self.allocator.recover(offer.framework_id, offer.agent_id, offer.resources,
                               refuse_seconds)
        return offer

    def _take_offers(self, fw: Framework, offer_ids: list) -> tuple[list, str | None]:
        """Remove the named offers from the books; (valid offers, first error)."""
        error, taken, seen = None, [], set()
        for oid in offer_ids:
            offer = self.offers.get(oid)
            if oid in seen:
                error = error or f"Offer {oid} appears more than once"
                continue
            seen.add(oid)
            if offer is None:
                error = error or f"Offer {oid} is no longer valid"
            elif offer.framework_id != fw.id:
                error = error or f"Offer {oid} is not for framework {fw.id}"
                continue
            else:
                self.offers.pop(oid)
                if offer.timeout_call is not None and offer.timeout_call.active():
                    offer.timeout_call.cancel()
                fw.offers.discard(oid)
                agent = self.agents.get(offer.agent_id)
                if agent is not None:
                    agent.offers.discard(oid)
                taken.append(offer)
        if len({o.agent_id for o in taken}) > 1:
            error = error or "Aggregated offers must belong to one agent"
        if not offer_ids:
            error = error or "No offers given"
        return taken, error

    def decline(self, fw: Framework, call: dict) -> None:
        body = call.get("decline") or {}
        refuse = _refuse_seconds(body.get("filters"))
        self.metrics["messages_decline_offers"] += 1
        for oid in _offer_ids(body):
            offer = self.offers.get(oid)
            if offer is not None and offer.framework_id == fw.id:
                self._remove_offer(oid, rescind=False, refuse_seconds=refuse)

    def accept(self, fw: Framework, call: dict) -> None:
        """Carry out the operations of an ACCEPT against the offered resources."""
        body = call.get("accept") or {}
        operations = body.get("operations") or []
        refuse = _refuse_seconds(body.get("filters"))
        offers, error = self._take_offers(fw, _offer_ids(body))
        if error is not None:
            for offer in offers:
                self.allocator.recover(fw.id, offer.agent_id, offer.resources)
            state = "TASK_DROPPED" if fw.partition_aware else "TASK_LOST"
            for task in _tasks_of(operations):
                tid = mj.id_of(task, "task_id", required=False) or "?"
                self._send_master_update(fw, tid, state, "REASON_INVALID_OFFERS",
                                         f"Task launched with invalid offers: {error}",
                                         agent_id=mj.id_of(task, "agent_id", False))
            return
        agent = self.agents[offers[0].agent_id]
        available = Resources.sum(o.resources for o in offers)
        seen: set = set()
        for op in operations:
            kind = op.get("type") if isinstance(op, dict) else None
            if kind == "LAUNCH":
                for task in (op.get("launch") or {}).get("task_infos") or []:
                    available = self._launch(fw, agent, task, None, available, seen)
            elif kind == "LAUNCH_GROUP":
                available = self._launch_group(fw, agent, op.get("launch_group") or {},
                                               available, seen)
            else:
                log.info("Ignoring unsupported operation {kind} from {fid}", kind=kind,
                         fid=fw.id)
        if available:
            self.allocator.recover(fw.id, agent.id, available, refuse)

    def _validate_task(self, fw: Framework, agent: Agent, task: dict, seen: set,
                       available: Resources, group_executor: dict | None):
        """(resources the task consumes, new Executor or None); raises InvalidMessage."""
        if not isinstance(task, dict):
            raise mj.InvalidMessage("TaskInfo must be an object")
        tid = mj.id_of(task, "task_id")
        if tid in seen or tid in fw.tasks:
            raise mj.InvalidMessage(f"Task {tid} has a duplicate ID")
        aid = mj.id_of(task, "agent_id", required=False)
        if aid is None:
            raise mj.InvalidMessage("TaskInfo is missing 'agent_id' (mesoshttp's 'slave_id' "
                                    "is not read: set 'agent_id')")
        if aid != agent.id:
            raise mj.InvalidMessage(f"Task uses agent {aid} but the offers are for {agent.id}")
        try:
            resources = self.resources(task.get("resources") or [])
        except ValueError as e:
            raise mj.InvalidMessage(f"Invalid task resources: {e}") from None
        if not resources:
            raise mj.InvalidMessage("Task uses no resources")
        if group_executor is None and (("command" in task) == ("executor" in task)):
            raise mj.InvalidMessage("Task must have exactly one of 'command' or 'executor'")
        if task.get("health_check") is not None:
            try:
                health_checks.parse(task["health_check"])
            except ValueError as e:
                raise mj.InvalidMessage(f"Task uses an invalid health check: {e}") from None
        needed, new_executor = resources, None
        if group_executor is None and "executor" in task:  # a group's executor is charged once
            new_executor = self._new_executor(fw, agent, task["executor"])
            if new_executor is not None:
                needed = needed + new_executor.resources
        if not available.contains(needed):
            raise mj.InvalidMessage(f"Task uses more resources {needed} than available "
                                    f"{available}")
        return needed, resources, new_executor

    def _new_executor(self, fw: Framework, agent: Agent, info: dict) -> Executor | None:
        """An Executor record for `info` if it does not run on the agent yet (not registered)."""
        if not isinstance(info, dict):
            raise mj.InvalidMessage("ExecutorInfo must be an object")
        eid = mj.id_of(info, "executor_id")
        known = agent.executors.get(fw.id, {}).get(eid)
        if known is not None:
            if _executor_key(known.info) != _executor_key(info):
                raise mj.InvalidMessage(f"ExecutorInfo for {eid} differs from the one already "
                                        "running on this agent")
            return None
        try:
            resources = self.resources(info.get("resources") or [])
        except ValueError as e:
            raise mj.InvalidMessage(f"Invalid executor resources: {e}") from None
        return Executor(id=eid, framework_id=fw.id,
                        info=dict(info, framework_id=mj.ident(fw.id)), resources=resources)

    def _launch(self, fw, agent, task, group_executor, available, seen) -> Resources:
        try:
            needed, resources, executor = self._validate_task(fw, agent, task, seen, available,
                                                              group_executor)
        except mj.InvalidMessage as e:
            tid = mj.id_of(task, "task_id", False) if isinstance(task, dict) else None
            self.metrics["tasks_error"] += 1
            self._send_master_update(fw, tid or "?", "TASK_ERROR", "REASON_TASK_INVALID",
                                     str(e), agent_id=agent.id)
            return available
        tid = mj.id_of(task, "task_id")
        seen.add(tid)
        if executor is not None:
            agent.executors.setdefault(fw.id, {})[executor.id] = executor
        ex_info = task.get("executor") or group_executor
        record = Task(id=tid, framework_id=fw.id, agent_id=agent.id,
                      executor_id=mj.id_of(ex_info, "executor_id") if ex_info else "",
                      info=task, resources=resources)
        record.statuses.append(("TASK_STAGING", self.now()))
        fw.tasks[tid] = record
        agent.tasks[(fw.id, tid)] = record
        self.metrics["messages_launch_tasks"] += 1
        if group_executor is None:
            if "executor" in task:
                task = dict(task, executor=agent.executors[fw.id][record.executor_id].info)
            self.send_agent(agent, protocol.RunTask(framework=fw.info, task=task))
        if self.operator_streams:
            self.publish(mj.event("TASK_ADDED", {"task": self.task_view(record)}))
        return available - needed

    def _launch_group(self, fw, agent, body: dict, available, seen) -> Resources:
        """Launch a task group all or nothing; its executor is charged once, if new."""
        executor = body.get("executor")
        tasks = (body.get("task_group") or {}).get("tasks") or []
        error, new_executor = None, None
        try:
            if not isinstance(executor, dict) or not mj.id_of(executor, "executor_id", False):
                raise mj.InvalidMessage("LAUNCH_GROUP needs an 'executor' with an "
                                        "'executor_id'")
            if executor.get("type", "DEFAULT") != "DEFAULT":
                raise mj.InvalidMessage("LAUNCH_GROUP's executor must be of type DEFAULT")
            if not tasks:
                raise mj.InvalidMessage("LAUNCH_GROUP's task group is empty")
            trial, trial_seen = available, set(seen)
            new_executor = self._new_executor(fw, agent, executor)
            if new_executor is not None:
                if not trial.contains(new_executor.resources):
                    raise mj.InvalidMessage(f"The executor uses more resources "
                                            f"{new_executor.resources} than available {trial}")
                trial = trial - new_executor.resources
            for task in tasks:
                if isinstance(task, dict) and "executor" in task:
                    raise mj.InvalidMessage("Tasks in a group must not name an executor")
                needed, _, _ = self._validate_task(fw, agent, task, trial_seen, trial,
                                                   executor)
                trial_seen.add(mj.id_of(task, "task_id"))
                trial = trial - needed
        except mj.InvalidMessage as e:
            error = str(e)
        if error is not None:
            for task in tasks:
                tid = mj.id_of(task, "task_id", False) if isinstance(task, dict) else None
                self.metrics["tasks_error"] += 1
                self._send_master_update(fw, tid or "?", "TASK_ERROR", "REASON_TASK_GROUP_INVALID",
                                         error, agent_id=agent.id)
            return available
        if new_executor is not None:
            agent.executors.setdefault(fw.id, {})[new_executor.id] = new_executor
            available = available - new_executor.resources
        for task in tasks:
            available = self._launch(fw, agent, task, executor, available, seen)
        ex_info = agent.executors[fw.id][mj.id_of(executor, "executor_id")].info
        self.send_agent(agent, protocol.RunTaskGroup(framework=fw.info, executor=ex_info,
                                                     task_group={"tasks": tasks}))
        return available

    def _send_master_update(self, fw: Framework, task_id: str, state: str, reason: str,
                            message: str, agent_id: str | None = None) -> None:
        """A status made by the master: carries no uuid, so nobody acknowledges it."""
        self.send(fw, mj.event("UPDATE", {"status": mj.task_status(
            task_id, state, source="SOURCE_MASTER", timestamp=self.now(), agent_id=agent_id,
            reason=reason, message=message)}))

    def suppress(self, fw: Framework, call: dict) -> None:
        self.allocator.suppress(fw.id, tuple((call.get("suppress") or {}).get("roles") or ()))

    def revive(self, fw: Framework, call: dict) -> None:
        self.allocator.revive(fw.id, tuple((call.get("revive") or {}).get("roles") or ()))
        self.trigger_allocation()

    # --- tasks -----------------------------------------------------------------------

    def kill(self, fw: Framework, call: dict) -> None:
        body = call.get("kill") or {}
        tid = mj.id_of(body, "task_id")
        self.metrics["messages_kill_task"] += 1
        task = fw.tasks.get(tid)
        if task is None:
            self._reconcile_unknown(fw, tid, mj.id_of(body, "agent_id", False))
            return
        task.kill_requested = True
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            self.send_agent(agent, protocol.KillTask(framework_id=fw.id, task_id=tid,
                                                     kill_policy=body.get("kill_policy")))

    def acknowledge(self, fw: Framework, call: dict) -> None:
        body = call.get("acknowledge") or {}
        aid, tid = mj.id_of(body, "agent_id"), mj.id_of(body, "task_id")
        uuid = body.get("uuid")
        if not mj.valid_uuid_b64(uuid):
            raise CallError(400, "'acknowledge.uuid' must be the base64 of a 16-byte UUID")
        agent = self.agents.get(aid)
        task = fw.tasks.get(tid)
        if agent is not None:
            self.send_agent(agent, protocol.StatusUpdateAck(framework_id=fw.id, task_id=tid,
                                                            uuid=uuid))
        if (task is not None and mj.is_terminal(task.state) and task.status is not None
                and task.status.get("uuid") == uuid):
            self._forget_task(task)

    def _forget_task(self, task: Task) -> None:
        """Move an acknowledged terminal task to the completed list."""
        fw = self.frameworks.get(task.framework_id)
        agent = self.agents.get(task.agent_id)
        if agent is not None:
            agent.tasks.pop((task.framework_id, task.id), None)
        if fw is not None and fw.tasks.pop(task.id, None) is not None:
            fw.completed_tasks.append(task)

    def reconcile(self, fw: Framework, call: dict) -> None:
        items = (call.get("reconcile") or {}).get("tasks") or []
        if not items:  # implicit: every task the master knows
            for task in list(fw.tasks.values()) + list(fw.unreachable_tasks.values()):
                self._send_reconciled(fw, task)
            return
        for item in items:
            tid = mj.id_of(item, "task_id", required=False)
            if tid is None:
                continue
            task = fw.tasks.get(tid) or fw.unreachable_tasks.get(tid)
            if task is not None:
                self._send_reconciled(fw, task)
            else:
                self._reconcile_unknown(fw, tid, mj.id_of(item, "agent_id", False))

    def _send_reconciled(self, fw: Framework, task: Task) -> None:
        status = dict(task.status) if task.status else mj.task_status(
            task.id, task.state, source="SOURCE_MASTER", timestamp=self.now(),
            agent_id=task.agent_id)
        status.pop("uuid", None)
        status.update(state=task.state, reason="REASON_RECONCILIATION",
                      source="SOURCE_MASTER", timestamp=self.now())
        self.send(fw, mj.event("UPDATE", {"status": status}))

    def _reconcile_unknown(self, fw: Framework, tid: str, agent_id: str | None) -> None:
        """Answer for a task the master does not know, as Mesos's master does.

        While agents may still re-register after a failover, the task may be on one of them:
        no answer (for a task on such an agent, or with no agent named); the framework asks
        again later. On an unreachable agent: UNREACHABLE (PARTITION_AWARE) or LOST; on a
        registered agent: GONE or LOST; on an agent marked gone: GONE_BY_OPERATOR or LOST;
        otherwise UNKNOWN or LOST.
        """
        if agent_id in self._recovering or (agent_id is None and self._recovering):
            return
        registered = self.registrar.agents().get(agent_id) if agent_id else None
        message = "Reconciliation: task is unknown"
        if not fw.partition_aware:
            state = "TASK_LOST"
        elif agent_id in self.agents:
            state = "TASK_GONE"
        elif agent_id in self._unreachable:
            state, message = "TASK_UNREACHABLE", "Reconciliation: agent is unreachable"
        elif registered is not None and registered[0] == "gone":
            state, message = "TASK_GONE_BY_OPERATOR", "Reconciliation: agent is gone"
        else:
            state = "TASK_UNKNOWN"
        self._send_master_update(fw, tid, state, "REASON_RECONCILIATION", message,
                                 agent_id=agent_id)

    def message(self, fw: Framework, call: dict) -> None:
        body = call.get("message") or {}
        aid, eid = mj.id_of(body, "agent_id"), mj.id_of(body, "executor_id")
        data = mj.unb64(body.get("data", ""))
        agent = self.agents.get(aid)
        if agent is None:
            raise CallError(400, f"Agent {aid} is not known")
        self.send_agent(agent, protocol.FrameworkMessage(framework_id=fw.id, executor_id=eid,
                                                         data=data))

    def shutdown_executor(self, fw: Framework, call: dict) -> None:
        body = call.get("shutdown") or {}
        aid, eid = mj.id_of(body, "agent_id"), mj.id_of(body, "executor_id")
        agent = self.agents.get(aid)
        if agent is None:
            raise CallError(400, f"Agent {aid} is not known")
        self.send_agent(agent, protocol.ShutdownExecutor(framework_id=fw.id, executor_id=eid))

    def update_framework(self, fw: Framework, call: dict) -> None:
        body = call.get("update_framework") or {}
        info = body.get("framework_info")
        if not isinstance(info, dict) or mj.id_of(info, "id", False) != fw.id:
            raise CallError(400, "'update_framework.framework_info.id' must be the "
                                 "framework's id")
        probe = self.validate_subscribe({"subscribe": {"framework_info": info}})
        roles = roles_of(probe)
        if probe != fw.info:
            self.registrar.put_framework(fw.id, probe, fw.registered_time)
        fw.info = probe
        if roles != fw.roles:
            fw.roles = roles
            self.allocator.update_framework_roles(fw.id, roles)
        if body.get("suppressed_roles"):
            self.allocator.suppress(fw.id, tuple(body["suppressed_roles"]))
        self.publish(mj.event("FRAMEWORK_UPDATED", {"framework": self._framework_view(fw)}))
        self.trigger_allocation()

    # --- agents ----------------------------------------------------------------------

    def agent_connected(self, link, leading: bool = True) -> None:
        """A new agent link: challenge it; it answers with (Re)RegisterAgent. `leading`:
        this master will answer it (a follower ignores registrations)."""
        link.nonce = os.urandom(16)
        link.agent = None
        link.registering = False  # a (re)registration from this link is being worked on
        link.send(protocol.Challenge(nonce=link.nonce, master_id=self.id, leading=leading))

    def on_agent_message(self, link, msg) -> None:
        kind = type(msg)
        if kind is protocol.RegisterAgent or kind is protocol.ReregisterAgent:
            # An agent sends its registration again on the same link while unanswered
            # (agent/master_link.py): a copy is not a new registration.
            if link.registering:
                self.metrics["dropped_registrations"] += 1
                return
            agent = link.agent
            if agent is not None and (kind is protocol.RegisterAgent or msg.agent_id == agent.id):
                self.metrics["dropped_registrations"] += 1
                link.send(protocol.AgentRegistered(agent_id=agent.id, master_id=self.id,
                                                   ping_interval=self.agent_ping_timeout))
                return
            if not protocol.check_proof(self.secret, link.nonce, msg.proof):
                log.warn("Agent at {peer} failed the shared-secret handshake", peer=link._peer())
                link.send(protocol.AgentRefused(message="Authentication failed: the agent's "
                                                        "--secret does not match the master's"))
                link.close()
                return
            try:
                info, total = _agent_info(msg.info, link, self.resources)
            except ValueError as e:
                link.send(protocol.AgentRefused(message=f"Invalid agent info: {e}"))
                link.close()
                return
            if kind is protocol.RegisterAgent:
                self._register_agent(link, info, total)
                return
            try:
                reported = self._reported_resources(msg)
            except ValueError as e:
                link.send(protocol.AgentRefused(message=f"Invalid re-registration: {e}"))
                link.close()
                return
            self._reregister_agent(link, msg, info, total, reported)
            return
        agent = link.agent
        if agent is None:
            log.warn("Message {kind} from an unregistered agent link; dropping it",
                     kind=kind.__name__)
            return
        if kind is protocol.StatusUpdate:
            self._on_status_update(agent, msg)
        elif kind is protocol.Pong:
            agent.pong_pending, agent.missed_pings = False, 0
        elif kind is protocol.FrameworkMessage:
            fw = self.frameworks.get(msg.framework_id)
            if fw is not None:
                self.send(fw, mj.event("MESSAGE", {
                    "agent_id": mj.ident(agent.id), "executor_id": mj.ident(msg.executor_id),
                    "data": mj.b64(msg.data)}))
        elif kind is protocol.ExitedExecutor:
            self._on_executor_exited(agent, msg)
        else:
            log.warn("Unexpected {kind} from agent {aid}", kind=kind.__name__, aid=agent.id)

    def _register_agent(self, link, info: dict, total: Resources) -> None:
        agent_id = f"{self.id}-S{next(self._agent_seq)}"
        link.registering = True
        d = self.registrar.admit(agent_id, info)
        d.addCallback(lambda _: self._admitted(link, agent_id, info, total))
        d.addErrback(lambda f: (setattr(link, "registering", False),
                                log.failure("Registry write failed", f),
                                link.send(protocol.AgentRefused(message="registry failure"))))

    def _admitted(self, link, agent_id, info, total) -> None:
        link.registering = False
        if not link.connected:
            return
        agent = Agent(id=agent_id, info=info, total=total, registered_time=self.now(),
                      link=link, connected=True)
        self.agents[agent_id] = agent
        link.agent = agent
        self.allocator.add_agent(agent_id, total, used={})
        self.metrics["slave_registrations"] += 1
        link.send(protocol.AgentRegistered(agent_id=agent_id, master_id=self.id,
                                           ping_interval=self.agent_ping_timeout))
        if self.operator_streams:  # the view costs more than the rest of a re-registration
            self.publish(mj.event("AGENT_ADDED", {"agent": self.agent_view(agent)}))
        log.info("Agent {aid} at {host}:{port} registered with {res}", aid=agent_id,
                 host=agent.hostname, port=agent.port, res=str(total))
        self.trigger_allocation()

    def _reported_resources(self, msg) -> tuple[list, list]:
        """The resources of a ReregisterAgent's executors and of its tasks, in its order;
        ValueError names the first entry that is not valid (nothing is admitted then). A
        task's resources come packed beside its TaskInfo (`protocol.task_entry`) or, from
        older agents, in it."""
        if not isinstance(msg.executors, list) or not isinstance(msg.tasks, list):
            raise ValueError("executors and tasks must be arrays")
        executors, tasks = [], []
        for ex in msg.executors:
            if not isinstance(ex, dict):
                raise ValueError(f"executor entry {ex!r:.60} is not an object")
            executors.append(self.resources(ex.get("resources") or []))
        for t in msg.tasks:
            if not isinstance(t, dict):
                raise ValueError(f"task entry {t!r:.60} is not an object")
            items = t.get("resources")
            if not items:
                info = t.get("info") or t
                info = protocol.unpacked(info) if isinstance(info, bytes) else info
                items = info.get("resources") if isinstance(info, dict) else None
            try:
                tasks.append(self.resources(items or []))
            except ValueError as e:
                raise ValueError(f"task {mj.id_of(t, 'task_id', False)!r}: {e}") from None
        return executors, tasks

    def _reregister_agent(self, link, msg, info: dict, total: Resources,
                          reported: tuple[list, list]) -> None:
        agent_id = msg.agent_id
        registered = self.registrar.agents().get(agent_id)
        if registered is not None and registered[0] == "gone":
            link.send(protocol.AgentRefused(message=f"Agent {agent_id} was marked gone; "
                                                    "start it with a clean work dir"))
            link.close()
            return
        if registered == ("admitted", info):  # already durable as it is: nothing to write
            self._readmitted(link, msg, info, total, reported)
            return
        link.registering = True
        d = self.registrar.admit(agent_id, info)
        d.addCallback(lambda _: self._readmitted(link, msg, info, total, reported))
        d.addErrback(lambda f: (setattr(link, "registering", False),
                                log.failure("Registry write failed", f)))

    def _readmitted(self, link, msg, info, total, reported) -> None:
        link.registering = False
        if not link.connected:
            return
        agent_id = msg.agent_id
        agent = self.agents.get(agent_id)
        was_unreachable = agent is None and agent_id in self._unreachable
        if agent is not None:  # a reconnect: drop the old link's view and take the report
            if agent.link is not None and agent.link is not link:
                agent.link.agent = None
                agent.link.close()
            if agent.lost_call is not None and agent.lost_call.active():
                agent.lost_call.cancel()
            agent.lost_call = None
            for key, task in list(agent.tasks.items()):
                fw = self.frameworks.get(task.framework_id)
                if fw is not None:
                    fw.tasks.pop(task.id, None)
            agent.tasks.clear()
            agent.executors.clear()
            agent.info, agent.total = info, total
            agent.link, agent.connected = link, True
            agent.pong_pending, agent.missed_pings = False, 0
            self.allocator.remove_agent(agent_id)
        else:
            agent = Agent(id=agent_id, info=info, total=total, registered_time=self.now(),
                          link=link, connected=True)
            self.agents[agent_id] = agent
        agent.reregistered_time = self.now()
        link.agent = agent
        self._unreachable.pop(agent_id, None)
        recovering = self._recovering.pop(agent_id, None) is not None
        infos = {mj.id_of(f, "id", False): f for f in msg.frameworks if isinstance(f, dict)}
        shutdown = set()
        executor_resources, task_resources = reported
        for ex, res in zip(msg.executors, executor_resources):
            fid = mj.id_of(ex, "framework_id", False)
            eid = mj.id_of(ex, "executor_id", False)
            if fid and eid:
                agent.executors.setdefault(fid, {})[eid] = Executor(eid, fid, ex, res)
        for t, res in zip(msg.tasks, task_resources):
            fid, tid = mj.id_of(t, "framework_id", False), mj.id_of(t, "task_id", False)
            if not fid or not tid:
                continue
            fw = self.frameworks.get(fid)
            if was_unreachable and (fw is None or not fw.partition_aware):
                shutdown.add(fid)
                continue
            if fw is None and any(f.id == fid for f in self.completed_frameworks):
                shutdown.add(fid)
                continue
            if fw is None:  # e.g. after a master restart: keep it until it re-subscribes
                fw = self._recover_framework(fid, infos.get(fid, {"id": mj.ident(fid)}))
            task = Task(id=tid, framework_id=fid, agent_id=agent_id,
                        executor_id=mj.id_of(t, "executor_id", False) or "",
                        info=t.get("info") or t, state=t.get("state", "TASK_STAGING"),
                        status=t.get("status"), resources=res)
            fw.unreachable_tasks.pop(tid, None)
            fw.tasks[tid] = task
            agent.tasks[(fid, tid)] = task
            if mj.is_terminal(task.state):
                task.resources_recovered = True
        for fid in shutdown:
            agent.executors.pop(fid, None)
        self.allocator.add_agent(agent_id, total, used=agent.used())
        if not agent.active:
            self.allocator.deactivate_agent(agent_id)
        self.metrics["slave_reregistrations"] += 1
        link.send(protocol.AgentRegistered(agent_id=agent_id, master_id=self.id,
                                           ping_interval=self.agent_ping_timeout))
        # After AgentRegistered: an agent drops what the master sends before it.
        for fid in shutdown:
            link.send(protocol.ShutdownFramework(framework_id=fid))
        for task in agent.tasks.values():
            if task.kill_requested and not mj.is_terminal(task.state):
                link.send(protocol.KillTask(framework_id=task.framework_id, task_id=task.id))
        if self.operator_streams:  # the view costs more than the rest of a re-registration
            self.publish(mj.event("AGENT_ADDED", {"agent": self.agent_view(agent)}))
        if recovering:  # one line a second while thousands come back, not one each
            self._back[0] += 1
            self._back[1] += len(agent.tasks)
            if self._back_call is None:
                self._back_call = self.reactor.callLater(1.0, self._log_back)
            if not self._recovering:
                self._log_back()
        else:
            log.info("Agent {aid} re-registered with {n} tasks", aid=agent_id,
                     n=len(agent.tasks))
        self.trigger_allocation()

    def _log_back(self) -> None:
        if self._back_call is not None and self._back_call.active():
            self._back_call.cancel()
        self._back_call = None
        (agents, tasks), self._back = self._back, [0, 0]
        log.info("{n} agents re-registered with {t} tasks; {left} of those in the registry "
                 "still expected", n=agents, t=tasks, left=len(self._recovering))
        if not self._recovering:
            log.info("Every agent in the registry is back, {s:.2f}s after recovery",
                     s=self.now() - self._recovered_at)

    def _recover_framework(self, fid: str, info: dict) -> Framework:
        info = dict(info, id=mj.ident(fid))
        roles = roles_of(info)
        fw = Framework(id=fid, info=info, roles=roles, registered_time=self.now())
        self.frameworks[fid] = fw
        self.allocator.add_framework(fid, roles, used={}, active=False)
        fw.failover_call = self.reactor.callLater(max(fw.failover_timeout, 0.0),
                                                  self._failover_expired, fw)
        return fw

    def agent_link_lost(self, link) -> None:
        agent = link.agent
        if agent is None or agent.link is not link:
            return
        agent.link, agent.connected = None, False
        self.allocator.deactivate_agent(agent.id)
        for offer_id in list(agent.offers):
            self._remove_offer(offer_id, rescind=True)
        timeout = self.agent_ping_timeout * self.max_agent_ping_timeouts
        log.info("Agent {aid} disconnected; marking it unreachable in {t}s unless it returns",
                 aid=agent.id, t=timeout)
        agent.lost_call = self.reactor.callLater(timeout, self.mark_unreachable, agent)

    def agent_for_operator(self, agent_id) -> Agent:
        agent = self.agents.get(agent_id) if isinstance(agent_id, str) else None
        if agent is None:
            raise CallError(404, f"Agent {agent_id} is not registered")
        return agent

    def deactivate_agent(self, agent: Agent) -> None:
        """No more offers from this agent; what runs there keeps running."""
        agent.active = False
        self.allocator.deactivate_agent(agent.id)
        for offer_id in list(agent.offers):
            self._remove_offer(offer_id, rescind=True)

    def reactivate_agent(self, agent: Agent) -> None:
        """Offer the agent again, ending any drain."""
        agent.active, agent.drain_state, agent.drain_config = True, None, None
        if agent.connected:
            self.allocator.activate_agent(agent.id)
        self.trigger_allocation()

    def drain_agent(self, agent: Agent, max_grace_period: float | None,
                    mark_gone: bool) -> None:
        """Deactivate the agent and kill its tasks (within `max_grace_period`, if given).

        The agent is DRAINING until no task runs there, then DRAINED; with `mark_gone` it is
        then marked gone and told to shut down, and may never come back under its id.
        """
        self.deactivate_agent(agent)
        agent.drain_state = "DRAINING"
        agent.drain_config = {"max_grace_period": max_grace_period, "mark_gone": mark_gone}
        policy = None
        if max_grace_period is not None:
            policy = {"grace_period": {"nanoseconds": int(max_grace_period * 1e9)}}
        for task in agent.tasks.values():
            if not mj.is_terminal(task.state):
                task.kill_requested = True
                self.send_agent(agent, protocol.KillTask(framework_id=task.framework_id,
                                                         task_id=task.id, kill_policy=policy))
        log.info("Agent {aid} draining", aid=agent.id)
        self._check_drained(agent)

    def _check_drained(self, agent: Agent) -> None:
        if agent.drain_state != "DRAINING":
            return
        if any(not mj.is_terminal(t.state) for t in agent.tasks.values()):
            return
        agent.drain_state = "DRAINED"
        log.info("Agent {aid} drained", aid=agent.id)
        if agent.drain_config and agent.drain_config.get("mark_gone"):
            self.mark_gone(agent)

    def mark_gone(self, agent: Agent) -> None:
        """The agent is gone for good: shut it down and refuse it if it comes back."""
        self.registrar.mark(agent.id, "gone", agent.info)
        link = agent.link
        if link is not None:
            self.send_agent(agent, protocol.ShutdownAgent(
                message=f"Agent {agent.id} was marked gone by an operator"))
        self.mark_unreachable(agent, state="TASK_GONE_BY_OPERATOR",
                              reason="REASON_AGENT_REMOVED_BY_OPERATOR")
        if link is not None:
            self.reactor.callLater(0, link.close)

    def _ping_agents(self) -> None:
        for agent in list(self.agents.values()):
            if not agent.connected:
                continue
            if agent.pong_pending:
                agent.missed_pings += 1
                if agent.missed_pings >= self.max_agent_ping_timeouts:
                    log.warn("Agent {aid} missed {n} pings", aid=agent.id, n=agent.missed_pings)
                    link = agent.link
                    self.mark_unreachable(agent)
                    if link is not None:
                        link.close()
                    continue
            agent.pong_pending = True
            self.send_agent(agent, protocol.Ping())

    def mark_unreachable(self, agent: Agent, state: str | None = None,
                         reason: str = "REASON_AGENT_UNREACHABLE") -> None:
        """The agent is gone from view: its offers go, its tasks become LOST/UNREACHABLE.

        With `state` (e.g. TASK_GONE_BY_OPERATOR) every task ends in that state instead.
        """
        if self.agents.get(agent.id) is not agent:
            return
        if agent.lost_call is not None and agent.lost_call.active():
            agent.lost_call.cancel()
        agent.lost_call = None
        del self.agents[agent.id]
        if agent.link is not None:
            agent.link.agent = None
        for offer_id in list(agent.offers):
            self._remove_offer(offer_id, rescind=True)
        self.allocator.remove_agent(agent.id)
        if state is None:
            self._unreachable[agent.id] = self.now()
            self.registrar.mark(agent.id, "unreachable", agent.info)
        self.metrics["slave_removals"] += 1
        now = self.now()
        for task in agent.tasks.values():
            fw = self.frameworks.get(task.framework_id)
            if fw is None or mj.is_terminal(task.state):
                continue
            fw.tasks.pop(task.id, None)
            unreachable = state is None and fw.partition_aware
            task_state = state or ("TASK_UNREACHABLE" if unreachable else "TASK_LOST")
            task.state = task_state
            key = "tasks_" + task_state[len("TASK_"):].lower()
            self.metrics[key] = self.metrics.get(key, 0) + 1
            if unreachable:
                fw.unreachable_tasks[task.id] = task
            else:
                fw.completed_tasks.append(task)
            status = mj.task_status(
                task.id, task_state, source="SOURCE_MASTER", timestamp=now, agent_id=agent.id,
                reason=reason, message="Agent is unreachable" if state is None else
                "Agent was removed by an operator",
                unreachable_time={"nanoseconds": int(now * 1e9)})
            task.status = status
            self.send(fw, mj.event("UPDATE", {"status": status}))
            self.publish(mj.event("TASK_UPDATED", {
                "task_id": mj.ident(task.id), "framework_id": mj.ident(fw.id),
                "state": task_state, "status": status}))
        for fw in self.frameworks.values():
            self.send(fw, mj.event("FAILURE", {"agent_id": mj.ident(agent.id)}))
        self.publish(mj.event("AGENT_REMOVED", {"agent_id": mj.ident(agent.id)}))
        log.warn("Agent {aid} marked unreachable", aid=agent.id)

    def _on_status_update(self, agent: Agent, msg) -> None:
        status = msg.status
        tid = mj.id_of(status, "task_id", required=False)
        state = status.get("state")
        if tid is None or state not in mj.TASK_STATES:
            self.metrics["invalid_status_updates"] += 1
            log.warn("Invalid status update from agent {aid}: {s!r:.200}", aid=agent.id, s=status)
            return
        self.metrics["valid_status_updates"] += 1
        status = dict(status)
        status.setdefault("agent_id", mj.ident(agent.id))
        fw = self.frameworks.get(msg.framework_id)
        task = agent.tasks.get((msg.framework_id, tid))
        if task is not None:
            if task.state != state:
                task.statuses.append((state, status.get("timestamp", self.now())))
                self.publish(mj.event("TASK_UPDATED", {
                    "task_id": mj.ident(tid), "framework_id": mj.ident(msg.framework_id),
                    "state": state, "status": status}))
                if mj.is_terminal(state):
                    key = "tasks_" + state[len("TASK_"):].lower()
                    if key in self.metrics:
                        self.metrics[key] += 1
            task.state, task.status = state, status
            if mj.is_terminal(state) and not task.resources_recovered:
                task.resources_recovered = True
                self.allocator.recover(msg.framework_id, agent.id, task.resources)
                self.trigger_allocation()
                self._check_drained(agent)
        if fw is not None:
            self.send(fw, mj.event("UPDATE", {"status": status}))
            if task is not None and mj.is_terminal(state) and "uuid" not in status:
                self._forget_task(task)

    def _on_executor_exited(self, agent: Agent, msg) -> None:
        executor = agent.executors.get(msg.framework_id, {}).pop(msg.executor_id, None)
        if executor is None:
            return
        if not agent.executors.get(msg.framework_id):
            agent.executors.pop(msg.framework_id, None)
        self.allocator.recover(msg.framework_id, agent.id, executor.resources)
        fw = self.frameworks.get(msg.framework_id)
        if fw is not None:
            self.send(fw, mj.event("FAILURE", {
                "agent_id": mj.ident(agent.id), "executor_id": mj.ident(msg.executor_id),
                "status": msg.status}))
        self.trigger_allocation()

    # --- views -----------------------------------------------------------------------

    def task_view(self, task: Task) -> dict:
        """Task JSON (v1 `Task` message)."""
        view = {
            "name": task.name, "task_id": mj.ident(task.id),
            "framework_id": mj.ident(task.framework_id), "agent_id": mj.ident(task.agent_id),
            "state": task.state, "resources": task.resources.to_json(),
            "statuses": [task.status] if task.status else [],
        }
        if task.executor_id:
            view["executor_id"] = mj.ident(task.executor_id)
        for key in ("labels", "discovery", "container", "health_check", "kill_policy"):
            if key in task.info:
                view[key] = task.info[key]
        if task.status:
            view["status_update_state"] = task.state
            if "uuid" in task.status:
                view["status_update_uuid"] = task.status["uuid"]
        return view

    def _framework_view(self, fw: Framework) -> dict:
        return {"framework_info": fw.info, "active": fw.connected, "connected": fw.connected,
                "recovered": False,
                "registered_time": {"nanoseconds": int(fw.registered_time * 1e9)}}

    def agent_view(self, agent: Agent) -> dict:
        return {
            "agent_info": {"id": mj.ident(agent.id), "hostname": agent.hostname,
                           "port": agent.port, "resources": agent.total.to_json(),
                           "attributes": agent.attributes},
            "active": agent.connected and agent.active, "pid": agent.pid,
            "deactivated": not agent.active,
            **({"drain_info": {"state": agent.drain_state, "config": agent.drain_config}}
               if agent.drain_state else {}),
            "registered_time": {"nanoseconds": int(agent.registered_time * 1e9)},
            "total_resources": agent.total.to_json(),
        }


def _offer_ids(body: dict) -> list:
    ids = body.get("offer_ids") or []
    if isinstance(ids, dict):
        ids = [ids]
    return [i["value"] for i in ids if isinstance(i, dict) and isinstance(i.get("value"), str)]


def _refuse_seconds(filters) -> float:
    value = DEFAULT_REFUSE_SECONDS
    if isinstance(filters, dict) and "refuse_seconds" in filters:
        try:
            value = float(filters["refuse_seconds"])
        except (TypeError, ValueError):
            raise CallError(400, "'filters.refuse_seconds' must be a number") from None
    return min(max(value, 0.0), MAX_REFUSE_SECONDS)


def _tasks_of(operations) -> list:
    tasks = []
    for op in operations:
        if not isinstance(op, dict):
            continue
        if op.get("type") == "LAUNCH":
            tasks.extend((op.get("launch") or {}).get("task_infos") or [])
        elif op.get("type") == "LAUNCH_GROUP":
            tasks.extend(((op.get("launch_group") or {}).get("task_group") or {}).get("tasks")
                         or [])
    return [t for t in tasks if isinstance(t, dict)]


def _executor_key(info: dict):
    return (mj.id_of(info, "executor_id", False), (info.get("command") or {}).get("value"),
            info.get("type", "CUSTOM"))


def _agent_info(info, link, parse) -> tuple[dict, Resources]:
    if not isinstance(info, dict):
        raise ValueError("agent info must be a map")
    total = parse(info.get("resources") or [])
    info = dict(info)
    if not info.get("ip"):
        try:
            info["ip"] = link.transport.getPeer().host
        except Exception:
            info["ip"] = info.get("hostname", "")
    info.setdefault("hostname", info["ip"])
    return info, total
