"""What an agent offers: resources detected on the host, `--resources` overrides, attributes.

The rules are Mesos's (src/slave/containerizer/containerizer.cpp `Containerizer::resources`):
leave the host 1 GB of memory (or half of it on small hosts) and 5 GB of disk (or half),
offer every CPU and the ports 31000-32000. A name given in `--resources` replaces the
detected value for that name entirely (roles included). The arithmetic is pure; only
`detect_resources` looks at the machine.
"""

from __future__ import annotations

import os
import shutil

from agora.resources import DEFAULT_PORTS, Resources

MB = 1024 * 1024


def default_mem_mb(total_mb: float) -> float:
    """Memory to offer: total minus 1 GB when the host has more than 2 GB, else half."""
    return total_mb - 1024 if total_mb > 2048 else total_mb / 2


def default_disk_mb(free_mb: float) -> float:
    """Disk to offer: free space minus 5 GB when there is more than 10 GB, else half."""
    return free_mb - 5 * 1024 if free_mb > 10 * 1024 else free_mb / 2


def default_resources(cpus: float, mem_total_mb: float, disk_free_mb: float,
                      ports=DEFAULT_PORTS) -> Resources:
    """The resources Mesos would offer on a host with these totals (pure)."""
    ranges = ",".join(f"{begin}-{end}" for begin, end in ports)
    text = (f"cpus:{float(cpus):.3f};mem:{int(default_mem_mb(mem_total_mb))};"
            f"disk:{int(default_disk_mb(disk_free_mb))}")
    if ranges:
        text += f";ports:[{ranges}]"
    return Resources.parse(text)


def merge_resources(detected: Resources, override_text: str | None) -> Resources:
    """`detected`, with every name that `override_text` mentions replaced by its value."""
    if not override_text or not override_text.strip():
        return detected
    override = Resources.parse(override_text)
    named = override.names()
    return detected.filter(lambda r: r.name not in named) + override


def host_memory_mb() -> float:
    """Total physical memory in MB (/proc/meminfo, or sysconf elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024  # the value is in kB
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB
    except (ValueError, OSError):
        return 0.0


def detect_resources(work_dir: str, override_text: str | None = None) -> Resources:
    """The agent's total resources: the host's, less Mesos's reserve, then `--resources`."""
    os.makedirs(work_dir, exist_ok=True)
    free_mb = shutil.disk_usage(work_dir).free / MB
    detected = default_resources(os.cpu_count() or 1, host_memory_mb(), free_mb)
    return merge_resources(detected, override_text)


def parse_attributes(text: str | None) -> list[dict]:
    """Mesos Attribute JSON from `rack:r1;zone:a;level:3` (numbers become SCALARs).

    Mesos also knows RANGES (`[1-10]`) and SETs (`{a,b}`) for attributes; we accept them too.
    Raises ValueError with a hint on a malformed item.
    """
    attributes: list[dict] = []
    if not text:
        return attributes
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise ValueError(f"bad attribute {part!r}: write 'name:value' items separated "
                             "by ';', e.g. 'rack:r1;zone:a;level:3'")
        attributes.append(_attribute(name, value))
    return attributes


def _attribute(name: str, value: str) -> dict:
    if value.startswith("[") and value.endswith("]"):
        ranges = []
        for item in value[1:-1].split(","):
            begin, _, end = item.strip().partition("-")
            try:
                ranges.append({"begin": int(begin), "end": int(end or begin)})
            except ValueError:
                raise ValueError(f"bad range {item!r} in attribute {name!r}; "
                                 "write e.g. '[1-10,20-30]'") from None
        return {"name": name, "type": "RANGES", "ranges": {"range": ranges}}
    if value.startswith("{") and value.endswith("}"):
        items = [i.strip() for i in value[1:-1].split(",") if i.strip()]
        return {"name": name, "type": "SET", "set": {"item": items}}
    try:
        number = float(value)
    except ValueError:
        return {"name": name, "type": "TEXT", "text": {"value": value}}
    if number != number or number in (float("inf"), float("-inf")):
        return {"name": name, "type": "TEXT", "text": {"value": value}}
    return {"name": name, "type": "SCALAR", "scalar": {"value": number}}


def attributes_view(attributes: list[dict]) -> dict:
    """Attributes as the /state endpoint shows them: {"rack": "r1", "level": 3.0}."""
    view: dict = {}
    for a in attributes:
        kind = a.get("type")
        if kind == "TEXT":
            view[a["name"]] = a["text"]["value"]
        elif kind == "SCALAR":
            view[a["name"]] = a["scalar"]["value"]
        elif kind == "RANGES":
            view[a["name"]] = "[" + ", ".join(f"{r['begin']}-{r['end']}"
                                              for r in a["ranges"]["range"]) + "]"
        elif kind == "SET":
            view[a["name"]] = "{" + ",".join(a["set"]["item"]) + "}"
    return view


def resources_view(resources: Resources) -> dict:
    """Resources as the /state endpoint shows them: {"cpus": 4.0, "ports": "[31000-32000]"}."""
    view: dict = {name: value for name, value in resources.scalars().items()}
    for name in resources.names():
        ranges = resources.ranges(name)
        if ranges:
            view[name] = "[" + ", ".join(f"{b}-{e}" for b, e in ranges) + "]"
        items = resources.set_items(name)
        if items:
            view[name] = "{" + ",".join(sorted(items)) + "}"
    for name in ("cpus", "mem", "disk", "gpus"):
        view.setdefault(name, 0.0)
    return view
