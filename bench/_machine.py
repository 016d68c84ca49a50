"""What the numbers were measured on: CPU, cores, memory, disk, load, software versions.

Throughput of a consumer that fsyncs per batch depends on the disk as much as
on the CPU, and a 2-core machine shared with other work can halve any row, so
every report carries this description (and the load average at the start)
next to its table.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, plus family/model when the name is generic."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "family" not in name.lower() and "cpu family" in info:
        name += f" (family {info['cpu family']}, model {info.get('model', '?')})"
    if "hypervisor" in info.get("flags", "").split():
        name += ", virtualised"
    return name


def memory_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _filesystem(path: str) -> str:
    try:
        out = subprocess.run(
            ["df", "-T", path], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
        return out[-1].split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _binary_version(args: list[str]) -> str:
    if shutil.which(args[0]) is None and not os.path.exists(args[0]):
        return "not installed"
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=False, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def describe(tmpdir: str, extra: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(label, value) pairs for the report header."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    try:
        import confluent_kafka

        kafka_client = (
            f"confluent-kafka {confluent_kafka.version()}, "
            f"librdkafka {confluent_kafka.libversion()[0]}"
        )
    except ImportError:
        kafka_client = "confluent-kafka not installed"
    rows = [
        ("CPU", cpu_model()),
        ("cores", str(os.cpu_count() or "?")),
        ("RAM", f"{memory_gib():.1f} GiB"),
        ("temp dir filesystem", f"{_filesystem(tmpdir)} ({tmpdir})"),
        ("load average at start", " ".join(f"{x:.2f}" for x in load)),
        ("OS", f"{platform.system()} {platform.release()}"),
        ("Python", platform.python_version()),
        ("Kafka client", kafka_client),
        ("rocksdict", _version("rocksdict")),
    ]
    rows.extend((extra or {}).items())
    return rows


def binary_version(args: list[str]) -> str:
    """First line of ``args`` output (e.g. ``redis-server --version``), or why not."""
    return _binary_version(args)
