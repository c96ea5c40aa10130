#!/usr/bin/env python3
"""
txtunnel benchmarks: the direct path, txtunnel's HTTP and TCP tunnels and
``ssh -R`` measured side by side, alternating, in one run.

    python bench/run.py            # full run, under ~20 minutes
    python bench/run.py --quick    # ~3 minutes, fewer and shorter runs
    tox -e bench -- --quick

Everything it starts (nginx, an upload sink, iperf3, a private sshd, ssh
clients, txtunnel relays and agents) listens on 127.0.0.1 only and is
stopped by PID at the end, also on Ctrl-C or an error.  Results go to
bench/results/latest.{md,json,png}; see bench/README.rst.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from harness import idle, measure, origin, pyspy, report, sshpath, tunnels, udp  # noqa: E402
from harness.install import ensure_tools  # noqa: E402
from harness.procs import Procs, RSSSampler, free_range, raise_nofile, rss_kb  # noqa: E402

MiB = 1 << 20

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "reps": 2,
        "wrk_seconds": 3,
        "big": 64 * MiB,
        "huge": 256 * MiB,
        "iperf_seconds": 2,
        "udp_seconds": 2,
        "idle_tunnels": 100,
        "idle_streams": 1000,
        "profile_seconds": 0,
    },
    "full": {
        "reps": 5,
        "wrk_seconds": 10,
        "big": 256 * MiB,
        "huge": 1024 * MiB,
        "iperf_seconds": 5,
        "udp_seconds": 5,
        "idle_tunnels": 1000,
        "idle_streams": 10000,
        "profile_seconds": 10,
    },
}


def _size_label(n: int) -> str:
    return f"{n // (1 << 30)} GiB" if n >= 1 << 30 else f"{n // MiB} MiB"


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


def _git(root: str) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--", "src", "twisted"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return f"{head}{' + uncommitted changes' if dirty else ''}" if head else "?"


class Bench:
    """
    One benchmark run: its processes, paths, samples and results.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = "quick" if args.quick else "full"
        self.cfg = dict(MODES[self.mode])
        if args.reps:
            self.cfg["reps"] = args.reps
        self.tmp = tempfile.mkdtemp(prefix="txtunnel-bench-")
        shm = "/dev/shm"
        shm_ok = os.path.isdir(shm) and os.access(shm, os.W_OK)
        self.data = tempfile.mkdtemp(prefix="txtunnel-bench-data-", dir=shm if shm_ok else None)
        atexit.register(shutil.rmtree, self.data, True)
        self.procs = Procs(self.tmp)
        self.sampler = RSSSampler(0.2)
        self.tools: dict[str, str | None] = {}
        self.notes: list[str] = []
        self.paths: dict[str, dict[str, Any]] = {}
        self.unavailable: dict[str, str] = {}
        self.figures: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in report.FIGURES}
        self.memory: dict[str, Any] = {}
        self.profile: dict[str, Any] = {}
        self.started = time.monotonic()
        self.files: dict[str, str] = {}
        self.udp_runs = 0

    # -- logging

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[{elapsed:6.1f}s] {text}", flush=True)

    # -- setup

    def setup(self) -> None:
        a = self.args
        self.tools, messages = ensure_tools(install=not a.no_install)
        for m in messages:
            self.say(m)
            self.notes.append(m)
        limit = raise_nofile()
        self.say(f"open-file limit {limit}; temp dir {self.tmp}")
        src = a.src or os.path.join(os.path.dirname(HERE), "src")
        self.src = os.path.abspath(src) if os.path.isdir(src) else None
        self.env = tunnels.pythonpath(self.src)
        self.txtunnel = tunnels.which_txtunnel(self.env)
        self.say(f"txtunnel from {self.txtunnel}")

        t = self.tools
        cfg = self.cfg
        if not t["nginx"] or not t["curl"]:
            raise SystemExit("nginx and curl are needed for every figure; install them (see messages above)")
        _, nginx_port = origin.start_nginx(self.procs, t["nginx"], self.tmp, self.data, cfg["big"], cfg["huge"])
        _, sink_port = origin.start_sink(self.procs)
        iperf_port = None
        if t["iperf3"]:
            _, iperf_port = origin.start_iperf3(self.procs, t["iperf3"])
        self.say(f"origin: nginx on {nginx_port}, upload sink on {sink_port}, iperf3 on {iperf_port}")
        self.nginx_port = nginx_port
        self.files["big"] = origin.make_file(os.path.join(self.data, "upload-big.bin"), cfg["big"])
        self.files["huge"] = origin.make_file(os.path.join(self.data, "upload-huge.bin"), cfg["huge"])

        base = "http://127.0.0.1:{}"
        self.paths["direct"] = {
            "web": (base.format(nginx_port), None),
            "sink": (base.format(sink_port), None),
            "iperf": iperf_port,
        }

        # txtunnel: one relay, one agent with all the tunnels on its one link.
        ports = free_range(8)
        relay = tunnels.start_relay(self.procs, "relay", self.tmp, self.env, ports, https=True)
        specs = [
            tunnels.TunnelSpec("web", "http", nginx_port),
            tunnels.TunnelSpec("up", "http", sink_port),
            tunnels.TunnelSpec("tweb", "tcp", nginx_port, ports[0]),
            tunnels.TunnelSpec("tup", "tcp", sink_port, ports[0] + 1),
        ]
        if iperf_port:
            specs.append(tunnels.TunnelSpec("tiperf", "tcp", iperf_port, ports[0] + 2))
        self.udp = udp.Receiver()
        specs.append(tunnels.TunnelSpec("tudp", "udp", self.udp.port, ports[0] + 4))
        agent = tunnels.start_agent(self.procs, "agent", self.tmp, self.env, relay, specs)
        self.relay, self.agent = relay, agent
        self.say("txtunnel: " + "; ".join(f"{k} -> {v}" for k, v in agent.ready.items()))
        # A second agent on a wss:// link (TLS, verified against the relay's
        # development CA): visitors still speak plain HTTP to the relay, so
        # the column measures what encrypting the link costs.
        wss_specs = [tunnels.TunnelSpec("sweb", "http", nginx_port), tunnels.TunnelSpec("sup", "http", sink_port)]
        wss_agent = tunnels.start_agent(self.procs, "agent-wss", self.tmp, self.env, relay, wss_specs, wss=True)
        self.say("txtunnel over wss: " + "; ".join(f"{k} -> {v}" for k, v in wss_agent.ready.items()))
        relay_url = base.format(relay.port)
        self.paths["http"] = {
            "web": (relay_url, relay.host("web")),
            "sink": (relay_url, relay.host("up")),
            "iperf": None,
        }
        self.paths["wss"] = {
            "web": (relay_url, relay.host("sweb")),
            "sink": (relay_url, relay.host("sup")),
            "iperf": None,
        }
        self.paths["tcp"] = {
            "web": (base.format(ports[0]), None),
            "sink": (base.format(ports[0] + 1), None),
            "iperf": ports[0] + 2 if iperf_port else None,
            "udp": ports[0] + 4,
        }
        self.paths["direct"]["udp"] = self.udp.port
        self.sampler.watch("relay", relay.proc.pid)
        self.sampler.watch("agent", agent.proc.pid)

        # ssh -R, plain and interactive (TCP_NODELAY).
        if t["sshd"] and t["ssh"] and t["ssh-keygen"]:
            try:
                sshd = sshpath.start_sshd(self.procs, self.tmp, t["sshd"], t["ssh"], t["ssh-keygen"])
                self.sshd = sshd
                for key, nodelay in (("ssh", False), ("sshnd", True)):
                    remote = sshpath.ssh_ports(3 if iperf_port else 2)
                    forwards = {remote[0]: nginx_port, remote[1]: sink_port}
                    if iperf_port:
                        forwards[remote[2]] = iperf_port
                    sshpath.start_ssh_forward(
                        self.procs, sshd, f"ssh-{key}", forwards, nodelay=nodelay, probe=remote[:2]
                    )
                    self.paths[key] = {
                        "web": (base.format(remote[0]), None),
                        "sink": (base.format(remote[1]), None),
                        "iperf": remote[2] if iperf_port else None,
                    }
                self.say(f"ssh -R via sshd on {sshd.port}: plain and -tt")
            except Exception as e:
                self.say(f"ssh -R unavailable: {e}")
                self.notes.append(f"ssh -R paths unavailable: {str(e).splitlines()[0]}")
                self.unavailable.setdefault("ssh", f"setup failed: {str(e).splitlines()[0][:60]}")
                self.unavailable.setdefault("sshnd", "setup failed")
        else:
            self.unavailable["ssh"] = self.unavailable["sshnd"] = "openssh missing"
        if not t["wrk"]:
            self.notes.append("wrk missing: no req/s or latency figures")
        self.sampler.start()
        self.check_paths()

    def check_paths(self) -> None:
        """
        One GET of the small file on every path before anything is timed.
        """
        for key, p in list(self.paths.items()):
            url, host = p["web"]
            argv = [self.tools["curl"] or "curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}"]
            if host:
                argv += ["-H", f"Host: {host}"]
            try:
                out = subprocess.run(
                    argv + [url + "/small.bin", "--max-time", "10"], capture_output=True, text=True, timeout=20
                )
                got = out.stdout.strip() or out.stderr.strip()[:80]
            except (OSError, subprocess.TimeoutExpired) as e:
                got = str(e)
            if got != "200 100":
                reason = f"GET /small.bin gave {got!r}"
                self.say(f"path {key} does not work: {reason}")
                self.unavailable[key] = reason
                del self.paths[key]

    # -- measuring

    def path_order(self, rep: int) -> list[str]:
        keys = [k for k, _ in report.PATHS if k in self.paths]
        shift = rep % len(keys) if keys else 0
        return keys[shift:] + keys[:shift]

    def record(self, keys: list[str], path: str, fn: Callable[[], dict[str, float]], fields: list[str]) -> None:
        load = os.getloadavg()[0]
        try:
            result = fn()
        except measure.MeasureError as e:
            self.say(f"  {path}: {keys[0]}: {e}")
            for key in keys:
                cell = self.figures[key].setdefault(path, {"samples": [], "loads": [], "errors": []})
                cell["errors"].append(str(e))
            return
        for key, field in zip(keys, fields, strict=True):
            cell = self.figures[key].setdefault(path, {"samples": [], "loads": [], "errors": []})
            cell["samples"].append(round(result[field], 3))
            cell["loads"].append(round(load, 2))

    def measure_round(self, rep: int) -> None:
        t = self.tools
        cfg = self.cfg
        order = self.path_order(rep)
        d = cfg["wrk_seconds"]
        if t["wrk"]:
            for conns, threads in ((50, 2), (1, 1)):
                for path in order:
                    url, host = self.paths[path]["web"]
                    self.record(
                        [f"rps_c{conns}", f"p50_c{conns}", f"p99_c{conns}"],
                        path,
                        lambda url=url, host=host, c=conns, n=threads: measure.wrk(
                            t["wrk"], url + "/small.bin", host, c, n, d
                        ),
                        ["rps", "p50_ms", "p99_ms"],
                    )
        for path in order:
            url, host = self.paths[path]["web"]
            self.record(
                ["download"],
                path,
                lambda url=url, host=host: measure.curl_download(t["curl"], url + "/big.bin", host, cfg["big"], 300),
                ["mbps"],
            )
        for path in order:
            url, host = self.paths[path]["sink"]
            self.record(
                ["upload"],
                path,
                lambda url=url, host=host: measure.curl_upload(
                    t["curl"], url + "/upload", host, self.files["big"], cfg["big"], 300
                ),
                ["mbps"],
            )
        if t["iperf3"]:
            for reverse, key in ((False, "iperf_up"), (True, "iperf_down")):
                for path in order:
                    port = self.paths[path]["iperf"]
                    if port is None:
                        continue
                    self.record(
                        [key],
                        path,
                        lambda port=port, reverse=reverse: measure.iperf3(
                            t["iperf3"], port, cfg["iperf_seconds"], reverse
                        ),
                        ["mbps"],
                    )

        for path in order:
            port = self.paths[path].get("udp")
            if port is None:
                continue
            for key, field, rate in (("udp", "dgps", 0), ("udp_loss", "loss_pct", udp.PACED_RATE)):
                self.udp_runs += 1
                self.record(
                    [key],
                    path,
                    lambda port=port, run=self.udp_runs, rate=rate: udp.measure(
                        self.udp, port, cfg["udp_seconds"], run, HERE, rate
                    ),
                    [field],
                )

    def warm_up(self) -> None:
        if not self.tools["wrk"]:
            return
        for path in self.path_order(0):
            url, host = self.paths[path]["web"]
            try:
                measure.wrk(self.tools["wrk"], url + "/small.bin", host, 10, 1, 1)
            except measure.MeasureError as e:
                self.say(f"  warm-up {path}: {e}")

    def long_transfers(self) -> None:
        """
        The big transfer through the HTTP tunnel, each way, with the peak RSS
        of relay and agent while it runs; direct and ssh -R for reference.
        """
        t = self.tools
        size = self.cfg["huge"]
        label = _size_label(size)
        for kind in ("download", "upload"):
            entry: dict[str, Any] = {"label": label, "bytes": size, "reference": {}}
            for path in ["direct", "ssh", "http"]:
                if path not in self.paths:
                    continue
                which = "web" if kind == "download" else "sink"
                url, host = self.paths[path][which]
                start = time.monotonic()
                load = os.getloadavg()[0]
                try:
                    if kind == "download":
                        r = measure.curl_download(t["curl"], url + "/huge.bin", host, size, 900)
                    else:
                        r = measure.curl_upload(t["curl"], url + "/upload", host, self.files["huge"], size, 900)
                except measure.MeasureError as e:
                    self.say(f"  {label} {kind} via {path}: {e}")
                    if path == "http":
                        entry["error"] = str(e)
                    else:
                        entry["reference"][path] = {"error": str(e)}
                    continue
                end = time.monotonic()
                self.say(f"  {label} {kind} via {path}: {r['seconds']:.1f} s, {r['mbps']:.0f} MB/s")
                if path == "http":
                    entry.update(
                        seconds=round(r["seconds"], 2),
                        mbps=round(r["mbps"], 1),
                        load=round(load, 2),
                        relay_peak_mb=self.sampler.peak_mb("relay", start, end + 0.3),
                        agent_peak_mb=self.sampler.peak_mb("agent", start, end + 0.3),
                    )
                else:
                    entry["reference"][path] = {"seconds": round(r["seconds"], 2), "mbps": round(r["mbps"], 1)}
            self.memory[f"gib_{kind}"] = entry

    def run_profile(self) -> None:
        seconds = self.args.profile if self.args.profile is not None else self.cfg["profile_seconds"]
        if not seconds or not self.tools["wrk"] or "http" not in self.paths:
            return
        spy = pyspy.find_pyspy()
        if not spy:
            self.notes.append("py-spy not installed (pip install py-spy): no profile")
            return
        url, host = self.paths["http"]["web"]
        outs = {}
        spies = {}
        for name, proc in (("relay", self.relay.proc), ("agent", self.agent.proc)):
            outs[name] = os.path.join(self.tmp, f"pyspy-{name}.txt")
            spies[name] = pyspy.record(spy, proc.pid, seconds + 1, outs[name])
        time.sleep(0.5)
        try:
            measure.wrk(self.tools["wrk"], url + "/small.bin", host, 50, 2, seconds)
        except measure.MeasureError as e:
            self.say(f"  profile wrk: {e}")
        for name, p in spies.items():
            try:
                _, err = p.communicate(timeout=seconds + 30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                err = b"timeout"
            if p.returncode != 0 or not os.path.exists(outs[name]):
                msg = err.decode(errors="replace").strip()[-200:]
                self.notes.append(f"py-spy on the {name} failed: {msg}")
                continue
            self.profile[name] = pyspy.summarize(outs[name])
        if self.profile:
            self.say(
                "profile: " + "; ".join(f"{n}: top own {v['own'][0]}" for n, v in self.profile.items() if v["own"])
            )

    def peaks(self) -> None:
        peak = {
            "relay_mb": self.sampler.peak_mb("relay", 0, self.main_end),
            "agent_mb": self.sampler.peak_mb("agent", 0, self.main_end),
        }
        for name, proc in (("relay", self.relay.proc), ("agent", self.agent.proc)):
            hwm = rss_kb(proc.pid, "VmHWM")
            peak[f"{name}_hwm_mb"] = round(hwm / 1024, 1) if hwm else None
        self.memory["peak"] = peak

    def idle_tests(self) -> None:
        cfg = self.cfg
        # The main tunnels are done: free the CPU and memory they hold.
        for proc in list(self.procs.procs):
            if proc.name in ("relay", "agent") or proc.name.startswith("ssh"):
                self.procs.stop(proc)
        self.sampler.unwatch("relay")
        self.sampler.unwatch("agent")
        n = cfg["idle_tunnels"]
        self.say(f"{n} idle tunnels ...")
        try:
            self.memory["idle_tunnels"] = idle.idle_tunnels(
                self.procs, self.tmp, self.env, n, self.nginx_port, timeout=60 + n * 0.2
            )
            self.say(f"  {self.memory['idle_tunnels']}")
        except Exception as e:
            self.say(f"  idle tunnels failed: {e}")
            self.memory["idle_tunnels"] = {"error": str(e).splitlines()[0], "tunnels": n}
        n = cfg["idle_streams"]
        self.say(f"{n} idle streams ...")
        try:
            holder_proc, port, status = origin.start_holder(self.procs, "holder")
            try:
                self.memory["idle_streams"] = idle.idle_streams(
                    self.procs, self.tmp, self.env, n, (port, status), timeout=60 + n * 0.02
                )
            finally:
                self.procs.stop(holder_proc)
            self.say(f"  {self.memory['idle_streams']}")
        except Exception as e:
            self.say(f"  idle streams failed: {e}")
            self.memory["idle_streams"] = {"error": str(e).splitlines()[0], "wanted": n}

    # -- the whole run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.setup()
        self.say(f"warm-up; then {cfg['reps']} round(s) over {', '.join(self.path_order(0))}")
        self.warm_up()
        for rep in range(cfg["reps"]):
            self.say(f"round {rep + 1}/{cfg['reps']}")
            self.measure_round(rep)
        self.say(f"long transfers ({_size_label(cfg['huge'])})")
        self.long_transfers()
        self.run_profile()
        self.main_end = time.monotonic()
        self.peaks()
        self.idle_tests()
        return self.results()

    def results(self) -> dict[str, Any]:
        for key in self.figures:
            row = self.figures[key]
            for path, reason in self.unavailable.items():
                row[path] = {"na": reason}
        for key in ("udp", "udp_loss"):
            for path in ("http", "wss"):
                self.figures[key][path] = {"na": "not UDP"}
            for path in ("ssh", "sshnd"):
                self.figures[key].setdefault(path, {"na": "ssh -R has no UDP"})
        for key in ("iperf_up", "iperf_down"):
            for path in ("http", "wss"):
                self.figures[key][path] = {"na": "not HTTP"}
        report.summarize(self.figures)
        cpu = platform.processor() or platform.machine()
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": self.mode,
            "reps": self.cfg["reps"],
            "config": {k: v for k, v in self.cfg.items()},
            "big_label": _size_label(self.cfg["big"]),
            "machine": f"{os.cpu_count()} CPUs ({cpu}), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}",
            "txtunnel": f"{self.txtunnel} (git {_git(os.path.dirname(HERE))})",
            "tools": {
                "nginx": _version([self.tools["nginx"] or "nginx", "-v"]),
                "wrk": _version([self.tools["wrk"] or "wrk", "-v"]),
                "ssh": _version([self.tools["ssh"] or "ssh", "-V"]),
                "iperf3": _version([self.tools["iperf3"] or "iperf3", "-v"]),
                "curl": _version([self.tools["curl"] or "curl", "-V"]),
            },
            "load_at_end": os.getloadavg(),
            "seconds": round(time.monotonic() - self.started, 1),
        }
        results: dict[str, Any] = {
            "meta": meta,
            "paths": dict(report.PATHS),
            "figures": self.figures,
            "memory": self.memory,
            "profile": self.profile,
            "notes": list(self.notes),
        }
        results["targets"] = report.targets(results)
        return results


def write_results(results: dict[str, Any], outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    previous = None
    old = os.path.join(outdir, "latest.json")
    if os.path.exists(old):
        try:
            with open(old) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    results["notes"] += report.compare(results, previous)
    problem = report.chart(results, os.path.join(outdir, "latest.png"))
    if problem:
        results["notes"].append(problem)
    text = report.markdown(results)
    if results.get("profile"):
        text += "\n## Profile (py-spy, HTTP tunnel under wrk c=50)\n"
        for name, prof in results["profile"].items():
            text += f"\n{name}, {prof['samples']} samples; own time:\n\n"
            text += "\n".join(f"    {pct:5.1f}%  {fn}" for fn, pct in prof["own"][:12]) + "\n"
            text += f"\n{name}, inclusive time:\n\n"
            text += "\n".join(f"    {pct:5.1f}%  {fn}" for fn, pct in prof["inclusive"][:12]) + "\n"
    with open(os.path.join(outdir, "latest.md"), "w") as f:
        f.write(text)
    with open(os.path.join(outdir, "latest.rst"), "w") as f:
        f.write(report.rst(results))
    report.write_json(results, os.path.join(outdir, "latest.json"))
    print()
    print(text)
    print(f"written: {outdir}/latest.md, latest.rst, latest.json" + ("" if problem else ", latest.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 3 minutes: 2 short rounds, smaller files")
    parser.add_argument("--reps", type=int, default=0, help="rounds (each figure is the median over them)")
    parser.add_argument("--src", help="txtunnel source dir to measure [default: the checkout's src/]")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="where latest.* go")
    parser.add_argument("--no-install", action="store_true", help="never run apt-get")
    parser.add_argument(
        "--profile", type=int, default=None, help="seconds of py-spy on relay and agent (0: none) [quick: 0, full: 10]"
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the temp dir with every process's log")
    args = parser.parse_args(argv)

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGINT too, explicitly: a shell starts a background job with SIGINT
    # ignored, and Python then never raises KeyboardInterrupt.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    bench = Bench(args)
    ok = False
    try:
        results = bench.run()
        bench.say("stopping everything")
        bench.sampler.stop()
        bench.procs.stop_all()
        results["meta"]["seconds"] = round(time.monotonic() - bench.started, 1)
        write_results(results, args.out)
        ok = True
        print(f"total {results['meta']['seconds']:.0f} s")
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        for proc in bench.procs.procs:
            print(f"--- {proc.name} (pid {proc.pid}) log tail:\n{proc.tail(8)}", file=sys.stderr)
    finally:
        bench.sampler.stop()
        bench.procs.stop_all()
        shutil.rmtree(bench.data, ignore_errors=True)
        if args.keep_logs or not ok:
            print(f"logs kept in {bench.tmp}", file=sys.stderr)
        else:
            shutil.rmtree(bench.tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
