#!/usr/bin/env python3
"""Core platform benchmarks for flotilla (release build), printed as a Markdown table.

Measures, on loopback only, with bounded loops:
  - time from exec of `flotilla up` to the API answering /healthz
  - idle RSS of `flotilla up` with no services, and with 20 demo instances
  - apply -> first instance ready (demo service, readiness probe on /health)
  - crash (kill -9) -> the same instance ready again with a new process (first restart)
  - size of the stripped release binary
  - wall time of a rolling update of 10 demo replicas under load, and failed requests

Usage: scripts/bench-core.sh   (builds release, then runs this)
       FLOTILLA_BIN=/other/target/release/flotilla python3 scripts/bench_core.py
"""

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# FLOTILLA_BIN measures another build (an A/B: alternate runs of two builds); the demo
# service is taken from the same directory.
BIN = os.environ.get("FLOTILLA_BIN", os.path.join(ROOT, "target", "release", "flotilla"))
DEMO_DIR = os.path.dirname(os.path.abspath(BIN))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tail(values, unit):
    """The p99 when there are at least 100 samples; otherwise the max, named so."""
    if len(values) >= 100:
        return f"p99 {pctl(values, 99):.1f} {unit}"
    return f"max {max(values):.1f} {unit}" if values else "-"


def pctl(values, p):
    v = sorted(values)
    if not v:
        return float("nan")
    k = min(len(v) - 1, max(0, int(round(p / 100.0 * (len(v) - 1)))))
    return v[k]


class Up:
    def __init__(self, services=""):
        self.dir = tempfile.mkdtemp(prefix="flotilla-bench-")
        self.api = f"127.0.0.1:{free_port()}"
        self.gw = f"127.0.0.1:{free_port()}"
        self.metrics = f"127.0.0.1:{free_port()}"
        with open(os.path.join(self.dir, "flotilla.toml"), "w") as f:
            f.write(f'[up]\napi = "{self.api}"\ngateway = "{self.gw}"\nmetrics = "{self.metrics}"\ndata_dir = "data"\n\n{services}')
        env = dict(os.environ)
        env["FLOTILLA_CONFIG_DIR"] = os.path.join(self.dir, "config")
        env["PATH"] = DEMO_DIR + ":" + env.get("PATH", "")
        env["FLOTILLA_LOG"] = "warn"
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [BIN, "up", "-f", os.path.join(self.dir, "flotilla.toml"), "--node", "bench" + str(os.getpid())],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, "up.log"), "w"),
        )
        self.ready_after = self._wait_api()
        self.token = open(os.path.join(self.dir, "data", "admin.token")).read().strip()

    def _wait_api(self):
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            try:
                s = socket.create_connection(self.api.split(":"), timeout=0.5)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = s.recv(64)
                s.close()
                if data.startswith(b"HTTP/1.1 200"):
                    return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.0005)
        raise RuntimeError("API did not come up")

    def call(self, method, path, body=None):
        req = urllib.request.Request(f"http://{self.api}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read() or b"null")

    def instances(self, service):
        return self.call("GET", f"/api/v1/instances?service={service}")["items"]

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return -1

    def stop(self):
        # SIGINT stops the workloads too (SIGTERM would leave them running for the next up).
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def demo(name, replicas=1):
    return {
        "metadata": {"name": name},
        "spec": {
            "command": "flotilla-demo", "args": ["--port", "${PORT}"], "replicas": replicas,
            "ports": ["http"], "stop": {"grace_period": "2s"},
            "probes": {"readiness": {"http": {"path": "/health"}, "period": "1s"}},
        },
    }


def wait(cond, timeout=20.0, step=0.002):
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise RuntimeError("timed out")


def bench_rollout(runs):
    """Rolling update of 10 demo replicas under load: apply -> Complete, and failed requests."""
    import threading
    web = lambda version: {
        "metadata": {"name": "roll"},
        "spec": {
            "command": "flotilla-demo", "args": ["--port", "${PORT}"], "replicas": 10,
            "ports": ["http"], "env": {"GREETING": version}, "stop": {"grace_period": "5s"},
            "probes": {"readiness": {"http": {"path": "/health"}, "period": "1s"}},
            "routes": [{"host": "roll.bench", "path": "/"}],
        },
    }
    up = Up()
    times, sent, failed = [], [0], [0]
    try:
        up.call("POST", "/api/v1/services", web("v0"))
        wait(lambda: len([x for x in up.instances("roll") if x["status"].get("ready")]) == 10, timeout=60)
        stop = threading.Event()
        lock = threading.Lock()

        def load():
            host, port = up.gw.split(":")
            deadline = time.perf_counter() + 600
            while not stop.is_set() and time.perf_counter() < deadline:
                ok = False
                try:
                    s = socket.create_connection((host, int(port)), timeout=5)
                    s.sendall(b"GET / HTTP/1.1\r\nHost: roll.bench\r\nConnection: close\r\n\r\n")
                    data = s.recv(64)
                    s.close()
                    ok = data.startswith(b"HTTP/1.1 200")
                except OSError:
                    pass
                with lock:
                    sent[0] += 1
                    if not ok:
                        failed[0] += 1

        threads = [threading.Thread(target=load) for _ in range(4)]
        for t in threads:
            t.start()
        for i in range(max(runs // 2, 5)):
            gen_before = up.call("GET", "/api/v1/services/roll")["metadata"]["generation"]
            t0 = time.perf_counter()
            up.call("POST", "/api/v1/services", web(f"v{i + 1}"))

            def complete():
                s = up.call("GET", "/api/v1/services/roll")["status"]
                return s.get("observedGeneration", 0) > gen_before and (s.get("rollout") or {}).get("phase") == "Complete"
            wait(complete, timeout=120, step=0.01)
            times.append((time.perf_counter() - t0) * 1000)
        stop.set()
        for t in threads:
            t.join()
    finally:
        up.stop()
    return [
        ("rolling update, 10 replicas, under load", f"{statistics.median(times) / 1000:.2f} s", f"max {max(times) / 1000:.2f} s", "≤ 5 s", len(times)),
        ("failed requests during those rollouts", f"{failed[0]} of {sent[0]}", "", "0", 1),
    ]


def main():
    runs = int(os.environ.get("RUNS", "10"))
    rows = []

    # Start-up to API ready, interleaved with idle RSS of an empty up.
    starts, idle = [], []
    for _ in range(runs):
        up = Up()
        starts.append(up.ready_after * 1000)
        time.sleep(1.0)
        idle.append(up.rss_kib() / 1024)
        up.stop()
    rows.append(("start → API ready", f"{statistics.median(starts):.1f} ms", tail(starts, "ms"), "median ≤ 15 ms", len(starts)))
    rows.append(("idle RSS, no services", f"{statistics.median(idle):.1f} MiB", tail(idle, "MiB"), "≤ 10 MiB", len(idle)))

    up = Up()
    try:
        # Apply → first instance ready.
        lat = []
        for i in range(max(runs * 3, 20)):
            name = f"b{i}"
            t0 = time.perf_counter()
            up.call("POST", "/api/v1/services", demo(name))
            wait(lambda: any(x["status"].get("ready") for x in up.instances(name)))
            lat.append((time.perf_counter() - t0) * 1000)
            up.call("DELETE", f"/api/v1/services/{name}")
            wait(lambda: not up.instances(name))
        rows.append(("apply → first instance ready", f"{statistics.median(lat):.1f} ms", tail(lat, "ms"), "median ≤ 30 ms", len(lat)))

        # Crash → replacement ready (first restart of a fresh instance).
        crash = []
        for i in range(max(runs * 2, 10)):
            name = f"c{i}"
            up.call("POST", "/api/v1/services", demo(name))
            inst = wait(lambda: [x for x in up.instances(name) if x["status"].get("ready")])[0]
            pid = inst["status"]["pid"]
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            wait(lambda: [x for x in up.instances(name) if x["status"].get("ready") and x["status"].get("pid") != pid])
            crash.append((time.perf_counter() - t0) * 1000)
            up.call("DELETE", f"/api/v1/services/{name}")
            wait(lambda: not up.instances(name))
        rows.append(("crash → replacement ready", f"{statistics.median(crash):.1f} ms", tail(crash, "ms"), "≤ 200 ms", len(crash)))

        # RSS with 20 instances.
        up.call("POST", "/api/v1/services", demo("twenty", 20))
        wait(lambda: len([x for x in up.instances("twenty") if x["status"].get("ready")]) == 20, timeout=60)
        samples = []
        for _ in range(5):
            time.sleep(1.0)
            samples.append(up.rss_kib() / 1024)
        rows.append(("RSS with 20 instances", f"{statistics.median(samples):.1f} MiB", tail(samples, "MiB"), "≤ 25 MB", len(samples)))
    finally:
        up.stop()

    rows.extend(bench_rollout(runs))

    size = os.path.getsize(BIN) / (1024 * 1024)
    rows.append(("stripped release binary", f"{size:.1f} MiB", "", "≤ 20 MB", 1))

    print("| measure | median | p99 (n ≥ 100) or max | goal | n |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")


if __name__ == "__main__":
    sys.exit(main())
