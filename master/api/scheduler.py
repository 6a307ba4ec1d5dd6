"""`POST /api/v1/scheduler`: the Mesos v1 scheduler API over our HTTP server.

SUBSCRIBE answers 200 with a chunked RecordIO event stream and a fresh `Mesos-Stream-Id`;
every other call answers 202 with `Content-Length: 0` (kept alive) before the work is done (pymesos runs
all its callbacks on the thread that waits for this reply). Errors are 4xx with a message.
"""

import uuid as _uuid

from agora import mesos_json as mj
from agora.http import HTTPError, StreamingResponse, empty_response
from master.master import CallError, Master

_CALLS = {
    "TEARDOWN": lambda m, fw, call: m.teardown(fw),
    "ACCEPT": Master.accept,
    "DECLINE": Master.decline,
    "REVIVE": Master.revive,
    "SUPPRESS": Master.suppress,
    "KILL": Master.kill,
    "SHUTDOWN": Master.shutdown_executor,
    "ACKNOWLEDGE": Master.acknowledge,
    "RECONCILE": Master.reconcile,
    "MESSAGE": Master.message,
    "UPDATE_FRAMEWORK": Master.update_framework,
    # Accepted and ignored, as the Mesos allocator ignores them or we have no such feature.
    "REQUEST": lambda m, fw, call: None,
    "ACCEPT_INVERSE_OFFERS": lambda m, fw, call: None,
    "DECLINE_INVERSE_OFFERS": lambda m, fw, call: None,
    "ACKNOWLEDGE_OPERATION_STATUS": lambda m, fw, call: None,
    "RECONCILE_OPERATIONS": lambda m, fw, call: None,
}


def redirect_to_leader(leader, path: str) -> None:
    """On a follower, answer 307 to the same path at the leader (503 when none is known).

    `leader` is None on a master without ZooKeeper, or a callable returning
    (is_leader, "host:port" of the leader or None).
    """
    if leader is None:
        return
    leading, where = leader()
    if not leading:
        if where:
            raise HTTPError(307, "Not the leading master",
                            headers={"Location": f"//{where}{path}"})
        raise HTTPError(503, "No leader elected")


def _content_type_ok(request) -> bool:
    ctype = (request.header("content-type") or "").split(";")[0].strip().lower()
    return ctype == "application/json"


class SchedulerAPI:
    """The handler for `/api/v1/scheduler`."""

    def __init__(self, master: Master, leader=None, authenticator=None):
        self.master = master
        self.leader = leader  # callable -> (is_leader, "host:port" of the leader or None)
        self.authenticator = authenticator  # http_auth.Authenticator, if frameworks need one

    def __call__(self, request):
        redirect_to_leader(self.leader, request.path)
        principal = self.authenticator.principal(request) if self.authenticator else None
        if not _content_type_ok(request):
            raise HTTPError(415, "Expecting 'Content-Type' of application/json")
        call = request.json()
        if not isinstance(call, dict) or not isinstance(call.get("type"), str):
            raise HTTPError(400, "Expecting 'type' to be present")
        kind = call["type"]
        try:
            if kind == "SUBSCRIBE":
                return self._subscribe(request, call, principal)
            handler = _CALLS.get(kind)
            if handler is None:
                raise HTTPError(400, f"Unknown call type '{kind}'")
            fw = self.master.framework_for_call(call, request.header("mesos-stream-id"))
            handler(self.master, fw, call)
        except CallError as e:
            raise HTTPError(e.status, e.message) from None
        except mj.InvalidMessage as e:
            raise HTTPError(400, f"Invalid {kind} call: {e}") from None
        # Kept alive: pymesos sends every call on one connection, and our server never closes
        # an idle one (spec §5.1 #2). A close per call cost ~30% of the master's CPU per task
        # (benchmarks/README.md).
        return empty_response(202)

    def _subscribe(self, request, call, principal: str | None):
        if request.header("mesos-stream-id"):
            raise HTTPError(400, "SUBSCRIBE calls should not include the 'Mesos-Stream-Id' "
                                 "header")
        accept = request.header("accept")
        if accept and not any(t in accept for t in ("application/json", "*/*",
                                                     "application/*")):
            raise HTTPError(406, "Expecting 'Accept' to allow application/json")
        info = self.master.validate_subscribe(call)
        claimed = info.get("principal")
        if principal is not None and claimed not in (None, "", principal):
            raise HTTPError(403, f"Framework principal '{claimed}' does not match the "
                                 f"authenticated principal '{principal}'")
        stream_id = str(_uuid.uuid4())
        return StreamingResponse(
            start=lambda stream: self.master.subscribe(info, stream, stream_id),
            headers=(("Mesos-Stream-Id", stream_id),))
