"""pymesos under Twisted: the scheduler driver's callbacks on the reactor thread, its calls
on a thread of their own.

pymesos runs an IO thread that reads the master's event stream and calls the Scheduler's
methods there; every call it makes (ACCEPT, KILL, ACKNOWLEDGE, ...) is a blocking HTTP
request. So:

    pymesos IO thread ── Scheduler callbacks ── reactor.callFromThread ──> `target.on_*`
    reactor ── Driver.call(...) ── queue ── call thread ── driver.acceptOffers(...) (blocking)

Calls keep their order (one thread, one queue). A callback never raises into pymesos (an
exception there aborts the driver and interrupts the main thread), and the driver is built
with `failover=True` so that nothing ever TEARDOWNs Marathon's framework: its tasks must
outlive any one Marathon process.
"""

from __future__ import annotations

import queue
import threading

from twisted.internet import threads
from twisted.logger import Logger

log = Logger()

_STOP = object()


def _callbacks_class():
    from pymesos import Scheduler

    class Callbacks(Scheduler):
        """Forwards every pymesos callback to `target.on_<name>` on the reactor thread."""

        def __init__(self, reactor, target):
            self.reactor, self.target = reactor, target

        def _forward(self, name, *args):
            try:
                self.reactor.callFromThread(getattr(self.target, name), *args)
            except Exception:  # the reactor is gone: nothing to tell
                pass

        def registered(self, driver, framework_id, master_info):
            self._forward("on_registered", framework_id["value"], dict(master_info))

        def reregistered(self, driver, master_info):
            self._forward("on_reregistered", dict(master_info))

        def disconnected(self, driver):
            self._forward("on_disconnected")

        def resourceOffers(self, driver, offers):
            self._forward("on_offers", list(offers))

        def offerRescinded(self, driver, offer_id):
            self._forward("on_rescinded", offer_id["value"])

        def statusUpdate(self, driver, status):
            self._forward("on_status", status)

        def frameworkMessage(self, driver, executor_id, agent_id, data):
            self._forward("on_message", executor_id.get("value"), agent_id.get("value"), data)

        def slaveLost(self, driver, agent_id):
            self._forward("on_agent_lost", agent_id.get("value"))

        def executorLost(self, driver, executor_id, agent_id, status):
            self._forward("on_executor_lost", executor_id.get("value"), agent_id.get("value"))

        def error(self, driver, message):
            self._forward("on_error", message)

    return Callbacks


class Driver:
    """One pymesos MesosSchedulerDriver for `target` (which has the `on_*` methods)."""

    def __init__(self, reactor, target, master: str, framework: dict,
                 principal: str | None = None, secret: str | None = None):
        from pymesos import MesosSchedulerDriver

        self.reactor = reactor
        self.master = master
        self.callbacks = _callbacks_class()(reactor, target)
        # Explicit acknowledgements: an update is acknowledged only once it is stored. With a
        # principal, pymesos authenticates every call (HTTP Basic).
        self.driver = MesosSchedulerDriver(self.callbacks, framework, master, use_addict=False,
                                           implicit_acknowledgements=False, failover=True,
                                           principal=principal, secret=secret)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="marathon-driver-calls",
                                        daemon=True)
        self.calls_made = 0

    def start(self) -> None:
        self._thread.start()
        # start() asks the master for /version, blocking: never on the reactor thread (in
        # `agora local` the master is served by this very reactor).
        self.call("start")

    def stop(self):
        """Stop without tearing the framework down (its tasks keep running); a Deferred.

        Not on the reactor thread: pymesos's stop waits for a call in flight, which in
        `agora local` needs this very reactor (its master) to be answered."""
        self._stopping = True
        self._calls.put(_STOP)

        def stop_driver():
            try:
                self.driver.stop(failover=True)
            except Exception:
                log.failure("Stopping the scheduler driver failed")

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                         stop_driver)

    def gave_up(self) -> bool:
        """Whether pymesos stopped by itself once started: it does when the master answers
        SUBSCRIBE with a 4xx (missing or wrong credentials, an invalid FrameworkInfo)."""
        # Not `driver.aborted`: it takes pymesos's lock, which a call in flight may hold
        # while `agora local`'s master (this very reactor) has yet to answer it.
        return self.calls_made > 0 and not self._stopping and not self.driver._started

    def call(self, method: str, *args, on_error=None) -> None:
        """Run `driver.<method>(*args)` on the call thread; `on_error(exception)` runs on the
        reactor thread if it raises."""
        self._calls.put((method, args, on_error))

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is _STOP:
                return
            method, args, on_error = item
            try:
                getattr(self.driver, method)(*args)
                self.calls_made += 1
            except Exception as e:
                log.warn("Scheduler call {method} failed: {e}", method=method, e=e)
                if on_error is not None:
                    try:
                        self.reactor.callFromThread(on_error, e)
                    except Exception:
                        pass
