#!/usr/bin/env python3
"""Servers on etcd (a 3-member cluster of Debian's etcd-server on loopback, data on this
machine's disk), in one run:

  failover  three servers; the leader is killed (kill -9) ROUNDS times: time until another
            server is reported leading (GET /api/v1/servers, polled every 10 ms), then the
            killed one is started again and follows.
  nodes     one server and NODES simulated nodes (`flotilla simulate-nodes`: each joins,
            registers and renews its lease every 2 s through the real node API) at rest:
            etcd writes/s (its revision's growth) over WINDOW seconds, against the one write
            per beat a store-kept heartbeat would cost.
  watchers  one server and WATCHERS open watch streams (GET /api/v1/watch/services); WRITES
            applies one after the other: latency from each apply's answer to its event at
            every watcher, from the apply's request (p50, p99, max over all deliveries), on etcd
            and on the embedded
            store, and the server's RSS with the watchers open.

Usage:
    FLOTILLA_BIN=target/release/flotilla python3 scripts/bench_ha.py [failover] [nodes] [watchers]
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_etcd import BIN, Etcd, Server, wait  # noqa: E402

ROUNDS = int(os.environ.get("ROUNDS", "10"))
NODES = int(os.environ.get("NODES", "1000"))
WINDOW = float(os.environ.get("WINDOW", "30"))
WATCHERS = int(os.environ.get("WATCHERS", "100"))
WRITES = int(os.environ.get("WRITES", "200"))


def leader_of(servers, live):
    """The index of the server that a live server reports leading, or None."""
    for i in live:
        try:
            status, body = servers[i].request("GET", "/api/v1/servers", timeout=2)
        except OSError:
            continue
        if status != 200:
            continue
        for item in json.loads(body)["items"]:
            if item.get("leader"):
                for k, s in enumerate(servers):
                    if item["api"].endswith("//" + s.api):
                        return k
        return None
    return None


def failover():
    root = tempfile.mkdtemp(prefix="flotilla-bench-ha-")
    etcd = Etcd(root)
    wait("the etcd cluster", etcd.healthy)
    servers = []
    try:
        for k in range(3):
            servers.append(Server(root, ["--etcd", etcd.endpoints()], name=f"server-{k + 1}"))
        took = []
        for r in range(ROUNDS):
            # (wait takes a falsy answer for "not yet", and server 0 is one)
            old = wait("a leader", lambda: (lambda k: k is not None and (k,))(leader_of(servers, range(3))),
                       timeout=30)[0]
            others = [k for k in range(3) if k != old]
            servers[old].kill()
            t0 = time.perf_counter()
            while True:
                new = leader_of(servers, others)
                if new is not None and new != old:
                    break
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError("no new leader within 30 s")
                time.sleep(0.01)
            took.append(time.perf_counter() - t0)
            print(f"round {r}: server-{old + 1} killed, server-{new + 1} leads after {took[-1] * 1000:.0f} ms", flush=True)
            servers[old].start()
        print(f"failover over {len(took)} kills: median {statistics.median(took) * 1000:.0f} ms, "
              f"max {max(took) * 1000:.0f} ms, min {min(took) * 1000:.0f} ms")
    finally:
        for s in servers:
            s.stop()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def nodes_at_rest():
    root = tempfile.mkdtemp(prefix="flotilla-bench-ha-")
    etcd = Etcd(root)
    wait("the etcd cluster", etcd.healthy)
    server = Server(root, ["--etcd", etcd.endpoints()], name="server")
    sim = None
    try:
        env = dict(os.environ, FLOTILLA_API=f"https://{server.api}", FLOTILLA_TOKEN=server.token,
                   FLOTILLA_CA=server.ca, FLOTILLA_CONFIG_DIR=os.path.join(root, "config"))
        join = subprocess.run([BIN, "token", "create", "--join", "--ttl", "1h"], env=env, check=True,
                              capture_output=True, text=True).stdout.strip()
        sim_log = open(os.path.join(root, "simulate.log"), "w")
        sim = subprocess.Popen([BIN, "simulate-nodes", "--api", f"https://{server.api}", "--nodes", str(NODES),
                                "--duration", "30m"], env=dict(env, FLOTILLA_TOKEN=join), stdout=sim_log,
                               stderr=sim_log, stdin=subprocess.DEVNULL)

        def nodes():
            status, body = server.request("GET", "/api/v1/nodes", timeout=30)
            return json.loads(body)

        def ready(n):
            return any(c.get("type") == "Ready" and c.get("status") is True
                       for c in n.get("status", {}).get("conditions", []))

        t0 = time.time()
        while sum(1 for n in nodes()["items"] if ready(n)) < NODES:
            if sim.poll() is not None:
                raise RuntimeError("simulate-nodes exited: " + open(os.path.join(root, "simulate.log")).read())
            if time.time() - t0 > 600:
                raise RuntimeError("the nodes did not all join within 10 min")
            time.sleep(0.5)
        print(f"{NODES} simulated nodes Ready after {time.time() - t0:.1f} s", flush=True)
        time.sleep(5)
        rev0, w0 = nodes()["resourceVersion"], time.time()
        time.sleep(WINDOW)
        listed = nodes()
        rev1, w1 = listed["resourceVersion"], time.time()
        still = sum(1 for n in listed["items"] if ready(n))
        rate = (rev1 - rev0) / (w1 - w0)
        beats = NODES / 2.0  # a renewal every 2 s (the lease's third)
        print(f"{NODES} nodes at rest, {still} Ready: {rev1 - rev0} etcd writes in {w1 - w0:.1f} s = "
              f"{rate:.2f} writes/s (a heartbeat written to the store: {beats:.0f} writes/s)")
    finally:
        if sim:
            sim.send_signal(signal.SIGTERM)
            try:
                sim.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sim.kill()
        server.stop()
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def watchers(backend):
    root = tempfile.mkdtemp(prefix="flotilla-bench-ha-")
    etcd = Etcd(root) if backend == "etcd" else None
    if etcd:
        wait("the etcd cluster", etcd.healthy)
    server = Server(root, ["--etcd", etcd.endpoints()] if etcd else [], name="server")
    try:
        rss_before = rss_mib(server.proc.pid)
        seen = {}  # generation marker -> list of receive times
        lock = threading.Lock()
        opened = threading.Barrier(WATCHERS + 1)
        done = threading.Event()

        def watcher():
            c = server.conn(timeout=60)
            c.request("GET", "/api/v1/watch/services", headers={"Authorization": f"Bearer {server.token}"})
            r = c.getresponse()
            opened.wait()
            mine = set()
            while not done.is_set():
                line = r.readline()
                if not line:
                    return
                t = time.perf_counter()
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                obj = event.get("object") or {}
                n = ((obj.get("spec") or {}).get("env") or {}).get("N")
                # The first event carrying apply N (the controller's status write follows).
                if event.get("type") in ("ADDED", "MODIFIED") and n is not None and n not in mine:
                    mine.add(n)
                    with lock:
                        seen.setdefault(n, []).append(t)

        threads = [threading.Thread(target=watcher, daemon=True) for _ in range(WATCHERS)]
        for t in threads:
            t.start()
        opened.wait()
        rss_open = rss_mib(server.proc.pid)
        sent, applied = {}, []
        for w in range(WRITES):
            body = json.dumps({"metadata": {"name": "fanout"},
                               "spec": {"command": "/bin/true", "replicas": 0, "env": {"N": str(w)}}})
            t0 = time.perf_counter()
            sent[str(w)] = t0
            status, _ = server.request("POST", "/api/v1/services", body=body)
            applied.append((time.perf_counter() - t0) * 1000)
            if status not in (200, 201):
                raise RuntimeError(f"apply answered {status}")
            time.sleep(0.01)
        deadline = time.time() + 30
        while time.time() < deadline:
            with lock:
                if all(len(seen.get(n, [])) >= WATCHERS for n in sent):
                    break
            time.sleep(0.05)
        done.set()
        with lock:
            lat = sorted((t - sent[n]) * 1000 for n in sent for t in seen.get(n, []))
            delivered = sum(len(seen.get(n, [])) for n in sent)
        if not lat:
            raise RuntimeError("no event reached any watcher")
        p = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
        print(f"{backend:8} {WATCHERS} watchers x {WRITES} applies: {delivered} of {WATCHERS * WRITES} events delivered; "
              f"from the apply's request p50 {p(0.5):.2f} ms, p99 {p(0.99):.2f} ms, max {lat[-1]:.2f} ms "
              f"(the apply itself: p50 {statistics.median(applied):.2f} ms); "
              f"server RSS {rss_before:.1f} MiB -> {rss_open:.1f} MiB with the watchers open", flush=True)
    finally:
        server.stop()
        if etcd:
            etcd.stop()
        shutil.rmtree(root, ignore_errors=True)


def main():
    parts = sys.argv[1:] or ["failover", "nodes", "watchers"]
    for part in parts:
        if part == "failover":
            failover()
        elif part == "nodes":
            nodes_at_rest()
        elif part == "watchers":
            watchers("etcd")
            watchers("embedded")
        else:
            raise SystemExit(f"unknown part {part!r}: expected failover, nodes or watchers")


if __name__ == "__main__":
    main()
