"""The cgroups isolators (cpu, memory, pids, devices) on cgroup v1 and v2; see ../README.md."""
