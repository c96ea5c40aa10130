"""
Install the benchmark's tools from Debian when they are missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["TOOLS", "ensure_tools", "which"]

#: tool -> (where to look for it, Debian package that provides it)
TOOLS: dict[str, tuple[tuple[str, ...], str]] = {
    "wrk": (("wrk",), "wrk"),
    "nginx": (("nginx", "/usr/sbin/nginx"), "nginx-light"),
    "sshd": (("/usr/sbin/sshd", "sshd"), "openssh-server"),
    "ssh": (("ssh",), "openssh-client"),
    "ssh-keygen": (("ssh-keygen",), "openssh-client"),
    "iperf3": (("iperf3",), "iperf3"),
    "curl": (("curl",), "curl"),
}


def which(tool: str) -> str | None:
    for candidate in TOOLS[tool][0]:
        if os.path.isabs(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
        else:
            found = shutil.which(candidate) or shutil.which(candidate, path="/usr/sbin:/sbin:/usr/bin:/bin")
            if found:
                return os.path.abspath(found)
    return None


def _apt(args: list[str], log: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", RUNLEVEL="1")
    try:
        done = subprocess.run(
            ["apt-get", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.append(f"apt-get {' '.join(args)}: {e}")
        return False
    if done.returncode != 0:
        log.append(f"apt-get {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-400:]}")
    return done.returncode == 0


def ensure_tools(install: bool = True) -> tuple[dict[str, str | None], list[str]]:
    """
    Find every tool, installing the missing ones with apt-get when we are
    root (C{apt-get update} once if the first install fails).

    @return: tool -> absolute path or None, and messages for the report.
    """
    messages: list[str] = []
    found = {tool: which(tool) for tool in TOOLS}
    missing = sorted({TOOLS[t][1] for t, path in found.items() if path is None})
    if missing:
        if not install:
            messages.append(f"not installing {', '.join(missing)} (--no-install); what needs them is skipped")
        elif os.geteuid() != 0:
            messages.append(
                f"missing {', '.join(missing)} and not root: run `sudo apt-get install -y {' '.join(missing)}`;"
                " what needs them is skipped"
            )
        elif shutil.which("apt-get") is None:
            messages.append(f"missing {', '.join(missing)} and no apt-get here; what needs them is skipped")
        else:
            print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
            log: list[str] = []
            if not _apt(["install", "-y", "--no-install-recommends", *missing], log):
                _apt(["update"], log)
                _apt(["install", "-y", "--no-install-recommends", *missing], log)
            messages.extend(log)
            found = {tool: which(tool) for tool in TOOLS}
    still = sorted(t for t, path in found.items() if path is None)
    if still:
        messages.append(f"still missing: {', '.join(still)}")
    return found, messages
