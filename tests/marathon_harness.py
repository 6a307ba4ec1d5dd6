"""`agora marathon` processes for tests, and the real marathon 0.13 client made to work on
this Python.

The client uses `collections.Iterable`, which Python 3.10 removed (spec §0 rule 10); the
shim below is the one the spec prescribes and is applied on import of this module.
"""

import collections
import collections.abc
import json
import threading
import urllib.error
import urllib.request

from tests.cluster import Process, wait_for

collections.Iterable = collections.abc.Iterable

import marathon  # noqa: E402

#: Quick timings so that tests take seconds (Marathon's defaults are minutes).
FAST = ("--min-revive-offers-interval", "0.2", "--decline-offer-duration", "1",
        "--scale-apps-interval", "2", "--reconciliation-interval", "30",
        "--kill-retry-timeout", "5", "--task-launch-timeout", "60")


class MarathonProcess(Process):
    """`agora marathon` on a free port, registered with `master`."""

    def __init__(self, tmp_path, master: str, args=(), name: str = "marathon"):
        self.work_dir = str(tmp_path / name)
        super().__init__(["marathon", "--master", master, "--port", "0", "--work-dir",
                          self.work_dir, *FAST, *args],
                         str(tmp_path / f"{name}.log"), r"Marathon: http://([\d.]+):(\d+)")
        self.port = int(self.match.group(2))
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = marathon.MarathonClient([self.url])


def request(url: str, method: str = "GET", body=None, headers=None):
    """(status, parsed JSON or text, headers) without raising on HTTP errors."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={
        "Content-Type": "application/json", "Accept": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw, hdrs = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), dict(e.headers)
    try:
        return status, json.loads(raw) if raw else None, hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


class EventLog:
    """The client's event_stream() in a thread; every event kept as the raw JSON dict."""

    def __init__(self, client, event_types=None):
        self.events = []
        self.lock = threading.Lock()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(client, event_types),
                                       daemon=True)
        self.thread.start()
        wait_for(lambda: self.of("event_stream_attached"), what="the event stream")

    def _run(self, client, event_types):
        try:
            for raw in client.event_stream(raw=True, event_types=event_types):
                event = json.loads(raw)
                with self.lock:
                    self.events.append(event)
        except Exception as e:  # the stream ended (the test stops Marathon)
            self.error = e

    def of(self, *kinds):
        with self.lock:
            return [e for e in self.events if e["eventType"] in kinds]


def settled(client, app_id: str, count: int, healthy: bool = False):
    """The app once `count` tasks run (healthy, if asked) and no deployment is left."""
    app = client.get_app(app_id)
    ok = app.tasks_running == count and len(app.tasks) == count and not app.deployments
    if healthy:
        ok = ok and app.tasks_healthy == count
    return app if ok else None
