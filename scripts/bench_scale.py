#!/usr/bin/env python3
"""The server at scale: a real `flotilla server` and N simulated nodes (`flotilla
simulate-nodes`: each joins, registers, renews its lease every 2 s and reports its instances
Running through the real node API; no processes). Then 10 instances per node are applied and
placed. Measured:

- time to place and report all instances;
- server RSS and CPU while idle with every node beating (a 20 s window);
- store writes per second in that window (heartbeats are meant to write nothing);
- API latency: p50/p99 of GET /api/v1/nodes/<node> under the heartbeat load, and the
  simulated nodes' heartbeat latency.

Usage: FLOTILLA_BIN=target/release/flotilla NODES=1000 python3 scripts/bench_scale.py
"""

import json
import ssl
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLOTILLA_BIN", os.path.join(ROOT, "target", "release", "flotilla"))
NODES = int(os.environ.get("NODES", "1000"))
PER_NODE = int(os.environ.get("PER_NODE", "10"))
CLK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK


def main():
    d = tempfile.mkdtemp(prefix="flotilla-bench-scale-")
    api = f"127.0.0.1:{free_port()}"
    env = dict(os.environ, FLOTILLA_LOG="warn", FLOTILLA_CONFIG_DIR=os.path.join(d, "config"))
    env.pop("FLOTILLA_TOKEN", None)
    log = open(os.path.join(d, "server.log"), "w")
    server = subprocess.Popen([BIN, "--data-dir", os.path.join(d, "server"), "server", "--listen", api],
                              env=env, stdout=log, stderr=log)
    token_file = os.path.join(d, "server", "admin.token")
    deadline = time.time() + 20
    while not (os.path.exists(token_file) and open(token_file).read().strip()):
        if time.time() > deadline:
            raise RuntimeError("no admin token")
        time.sleep(0.05)
    token = open(token_file).read().strip()
    ca = os.path.join(d, "server", "ca.crt")
    while not (os.path.exists(ca) and os.path.getsize(ca) > 0):
        if time.time() > deadline:
            raise RuntimeError("no cluster CA")
        time.sleep(0.05)
    tls = ssl.create_default_context(cafile=ca)
    time.sleep(0.3)
    cli_env = dict(env, FLOTILLA_API=api, FLOTILLA_TOKEN=token, FLOTILLA_CA=ca)

    def cli(*args):
        return subprocess.run([BIN] + list(args), env=cli_env, check=True, capture_output=True, text=True).stdout

    def get(path):
        req = urllib.request.Request(f"https://{api}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30, context=tls) as r:
            return json.loads(r.read())

    join = cli("token", "create", "--join", "--ttl", "1h").strip()
    sim_log = open(os.path.join(d, "simulate.log"), "w")
    sim = subprocess.Popen([BIN, "simulate-nodes", "--api", f"https://{api}", "--nodes", str(NODES),
                            "--duration", "30m"], env=dict(env, FLOTILLA_TOKEN=join), stdout=sim_log, stderr=sim_log)
    try:
        t0 = time.time()
        def ready(node):
            return any(c.get("type") == "Ready" and c.get("status") is True
                       for c in node.get("status", {}).get("conditions", []))

        # Joined: registered and found Ready (the Ready condition is one write per node).
        while sum(1 for n in get("/api/v1/nodes")["items"] if ready(n)) < NODES:
            if sim.poll() is not None:
                raise RuntimeError("simulate-nodes exited: " + open(os.path.join(d, "simulate.log")).read())
            time.sleep(0.5)
        joined = time.time() - t0

        # Idle with every node beating: RSS, CPU, store writes, API latency.
        time.sleep(3)
        rev0 = get("/api/v1/nodes")["resourceVersion"]
        cpu0, w0 = cpu_seconds(server.pid), time.time()
        lat = []
        for k in range(200):
            t = time.perf_counter()
            get(f"/api/v1/nodes/sim-{k * 7 % NODES:05}")
            lat.append((time.perf_counter() - t) * 1000)
            time.sleep(0.1)
        window = time.time() - w0
        cpu = (cpu_seconds(server.pid) - cpu0) / window
        writes = (get("/api/v1/nodes")["resourceVersion"] - rev0) / window
        idle_rss = rss_mib(server.pid)
        lat.sort()

        # Ten instances per node, in services of 1000 replicas.
        total = NODES * PER_NODE
        services = []
        for s in range(0, total, 1000):
            name = f"svc{s // 1000}"
            services.append(name)
            with open(os.path.join(d, name + ".toml"), "w") as f:
                f.write(f'[service.{name}]\ncommand = "sleep"\nargs = ["1000"]\nreplicas = {min(1000, total - s)}\n')
        t0 = time.time()
        for name in services:
            cli("apply", "-f", os.path.join(d, name + ".toml"))
        while True:
            items = get("/api/v1/services")["items"]
            ready = sum(i["status"].get("readyReplicas", 0) for i in items)
            if ready >= total:
                break
            if time.time() - t0 > 1800:
                raise RuntimeError(f"only {ready} of {total} ready after 30 min")
            time.sleep(1)
        placed = time.time() - t0
        busy_rss = rss_mib(server.pid)
        # Steady state: every node still beating, nothing changing.
        time.sleep(20)
        settled_rss = rss_mib(server.pid)
        cpu1, w1 = cpu_seconds(server.pid), time.time()
        time.sleep(10)
        settled_cpu = (cpu_seconds(server.pid) - cpu1) / (time.time() - w1)
        per_node = {}
        for i in get("/api/v1/instances")["items"]:
            per_node[i["spec"]["node"]] = per_node.get(i["spec"]["node"], 0) + 1
        print(f"{NODES} simulated nodes joined in {joined:.1f} s")
        print(f"idle with every node beating every 2 s: server RSS {idle_rss:.1f} MiB, CPU {cpu * 100:.1f} % of a core, "
              f"store writes {writes:.2f}/s; GET /api/v1/nodes/NAME p50 {lat[len(lat) // 2]:.2f} ms, "
              f"p99 {lat[int(len(lat) * 0.99) - 1]:.2f} ms")
        print(f"{total} instances placed and reported Running in {placed:.1f} s ({total / placed:.0f}/s end to end); "
              f"server RSS then {busy_rss:.1f} MiB, 20 s later {settled_rss:.1f} MiB (CPU {settled_cpu * 100:.1f} % of a core); instances per node min {min(per_node.values())}, max {max(per_node.values())}")
    finally:
        sim.send_signal(signal.SIGINT)
        try:
            sim.wait(timeout=60)
        except subprocess.TimeoutExpired:
            sim.kill()
        tail = [l for l in open(os.path.join(d, "simulate.log")).read().splitlines() if l.startswith("after")]
        if tail:
            print("simulated nodes:", tail[-1])
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
