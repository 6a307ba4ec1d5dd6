"""cgroups/devices: a container may open only the devices on its whitelist.

The whitelist is `device_rules.DEFAULT_RULES` (null, zero, full, random, urandom, tty,
console, ptmx, pts/*, and mknod of any node) plus the `allowed_devices` flag (Mesos's
--allowed_devices JSON). Everything else is refused with EPERM.

    v1  devices.deny "a", then one devices.allow line per rule.
    v2  a BPF_PROG_TYPE_CGROUP_DEVICE program built from the rules, attached to the
        container's v2 cgroup (the kernel detaches it when the cgroup is removed).
"""

from __future__ import annotations

import os

from isolators.cgroups import bpf
from isolators.cgroups.device_rules import DEFAULT_RULES, allowed_devices, device_program
from isolators.cgroups.isolator import CgroupIsolator
from isolators.flags import flag_json


class DevicesIsolator(CgroupIsolator):
    name = "cgroups/devices"
    controllers = ("devices",)

    def __init__(self, settings, hierarchies=None):
        super().__init__(settings, hierarchies)
        self.rules = DEFAULT_RULES + allowed_devices(flag_json(settings.flags or {},
                                                               "allowed_devices"))
        self._program = device_program(self.rules)

    def _configure(self, container_id, resources, initial):
        if not initial:
            return  # the whitelist does not depend on the container's resources
        cg = self.cgroup("devices", container_id)
        if cg.version == 1:
            cg.write("devices.deny", "a")
            for rule in self.rules:
                cg.write("devices.allow", rule.v1())
            return
        prog = bpf.load_device_program(self._program)
        try:
            bpf.attach_device_program(cg.path, prog)
        finally:
            os.close(prog)  # the attachment holds the program
