"""Who a container runs as: the user a task or framework names, looked up on this host.

Mesos's rule (`--switch_user`, on by default): an executor runs as its command's `user`,
else as the framework's `user`; a command task as its command's `user`, else the
framework's. That only applies when the agent can switch users, i.e. runs as root;
otherwise everything runs as the agent's own user and the names are not looked up.
"""

from __future__ import annotations

import os
import pwd

import attrs


class UnknownUser(ValueError):
    """The named user does not exist on this host."""


@attrs.frozen
class RunAs:
    """A user resolved on this host: credentials for setuid, and the login environment."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, the primary one included
    home: str

    def environment(self) -> dict:
        """HOME, USER and LOGNAME, as a login as this user would set them."""
        return {"HOME": self.home, "USER": self.name, "LOGNAME": self.name}


def lookup(name: str) -> RunAs:
    """The user `name` on this host; UnknownUser saying so if there is none."""
    try:
        entry = pwd.getpwnam(name)
    except (KeyError, ValueError):  # ValueError: a NUL in the name
        raise UnknownUser(f"user '{name}' does not exist") from None
    groups = tuple(sorted(set(os.getgrouplist(name, entry.pw_gid))))
    return RunAs(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=groups,
                 home=entry.pw_dir)


def can_switch() -> bool:
    """Whether this process may run others as any user (it is root)."""
    return os.geteuid() == 0
