#!/usr/bin/env python3
"""API write latency of `flotilla server`, on its embedded store and on a 3-member etcd cluster
(Debian's etcd-server, members on loopback with their data on this machine's disk), in one run.

Each write is an apply (POST /api/v1/services) of a service with 0 replicas, a new spec each
time (a new revision: the service, its revision and an event are written). C clients, each on
its own keep-alive connection, send W writes one after the other. Before the server starts,
the same clients put keys straight into etcd (its JSON gateway): the floor under any apply
through it on this machine. Usage:
    FLOTILLA_BIN=target/release/flotilla ROUNDS=2 python3 scripts/bench_etcd.py
"""

import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("FLOTILLA_BIN", os.path.join(ROOT, "target", "release", "flotilla"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
WRITES = int(os.environ.get("WRITES", "200"))  # per client
CLIENTS = [int(c) for c in os.environ.get("CLIENTS", "1,10,100").split(",")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(what, cond, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Etcd:
    def __init__(self, root):
        names = ["m1", "m2", "m3"]
        self.client = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        peer = {n: f"http://127.0.0.1:{free_port()}" for n in names}
        initial = ",".join(f"{n}={peer[n]}" for n in names)
        self.procs = []
        for n in names:
            log = open(os.path.join(root, f"etcd-{n}.log"), "w")
            self.procs.append(subprocess.Popen([
                "etcd", "--name", n, "--data-dir", os.path.join(root, f"etcd-{n}"),
                "--listen-client-urls", self.client[n], "--advertise-client-urls", self.client[n],
                "--listen-peer-urls", peer[n], "--initial-advertise-peer-urls", peer[n],
                "--initial-cluster", initial, "--logger", "zap", "--log-level", "warn"],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL))

    def healthy(self):
        import urllib.request
        try:
            return all(json.loads(urllib.request.urlopen(u + "/health", timeout=1).read()).get("health") == "true"
                       for u in self.client.values())
        except (OSError, ValueError):
            return False

    def endpoints(self):
        return ",".join(self.client.values())

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


class Server:
    def __init__(self, root, extra):
        self.dir = os.path.join(root, "server-" + str(len(os.listdir(root))))
        self.api = f"127.0.0.1:{free_port()}"
        env = dict(os.environ, FLOTILLA_LOG="warn", FLOTILLA_CONFIG_DIR=os.path.join(root, "config"))
        log = open(self.dir + ".log", "w")
        self.proc = subprocess.Popen([BIN, "--data-dir", self.dir, "server", "--listen", self.api] + extra,
                                     env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        token = os.path.join(self.dir, "admin.token")
        wait("the admin token", lambda: os.path.exists(token) and open(token).read().strip())
        self.token = open(token).read().strip()
        self.tls = ssl.create_default_context(cafile=os.path.join(self.dir, "ca.crt"))
        wait("the API", self.healthy)

    def conn(self):
        host, port = self.api.split(":")
        return http.client.HTTPSConnection(host, int(port), context=self.tls, timeout=30)

    def healthy(self):
        try:
            c = self.conn()
            c.request("GET", "/healthz")
            return c.getresponse().status == 200
        except OSError:
            return False

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)


def load(server, clients, writes, tag):
    latencies = []
    failures = []
    lock = threading.Lock()

    def client(i):
        c = server.conn()
        mine = []
        for w in range(writes):
            body = json.dumps({"metadata": {"name": f"{tag}-{i}"},
                               "spec": {"command": "/bin/true", "replicas": 0,
                                        "env": {"N": str(w)}}})
            t0 = time.perf_counter()
            c.request("POST", "/api/v1/services", body=body,
                      headers={"Authorization": f"Bearer {server.token}",
                               "Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            mine.append(time.perf_counter() - t0)
            if r.status not in (200, 201):
                with lock:
                    failures.append(r.status)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"p50": p(0.50), "p99": p(0.99), "rate": len(latencies) / elapsed, "failed": len(failures)}


def raw_etcd(etcd, clients, writes, tag):
    """etcd's own put latency at `clients` (its JSON gateway, one member, keep-alive): the
    floor under any apply through it on this machine."""
    import base64
    latencies = []
    lock = threading.Lock()
    host, port = list(etcd.client.values())[0].replace("http://", "").split(":")

    def client(i):
        c = http.client.HTTPConnection(host, int(port), timeout=30)
        mine = []
        for w in range(writes):
            body = json.dumps({"key": base64.b64encode(f"/raw/{tag}-{i}".encode()).decode(),
                               "value": base64.b64encode(b"x" * 300).decode()})
            t0 = time.perf_counter()
            c.request("POST", "/v3/kv/put", body=body)
            c.getresponse().read()
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"p50": p(0.50), "p99": p(0.99), "rate": len(latencies) / elapsed, "failed": 0}


def main():
    results = {}
    for r in range(ROUNDS):
        for backend in ("embedded", "etcd"):
            root = tempfile.mkdtemp(prefix="flotilla-bench-etcd-")
            etcd = Etcd(root) if backend == "etcd" else None
            if etcd:
                wait("the etcd cluster", etcd.healthy)
            try:
                if etcd:
                    for c in CLIENTS:
                        writes = max(10, WRITES // max(1, c // 10))
                        res = raw_etcd(etcd, c, writes, f"r{r}c{c}")
                        results.setdefault(("raw-etcd", c), []).append(res)
                        print(f"round {r} raw-etcd {c:3} clients: p50 {res['p50']:.2f} ms, p99 {res['p99']:.2f} ms, "
                              f"{res['rate']:.0f} puts/s", flush=True)
                server = Server(root, ["--etcd", etcd.endpoints()] if etcd else [])
                try:
                    for c in CLIENTS:
                        writes = max(10, WRITES // max(1, c // 10))
                        res = load(server, c, writes, f"r{r}c{c}")
                        results.setdefault((backend, c), []).append(res)
                        print(f"round {r} {backend:8} {c:3} clients: p50 {res['p50']:.2f} ms, p99 {res['p99']:.2f} ms, "
                              f"{res['rate']:.0f} writes/s, {res['failed']} failed", flush=True)
                finally:
                    server.stop()
            finally:
                if etcd:
                    etcd.stop()
    print("medians over the rounds:")
    for (backend, c), rs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"  {backend:8} {c:3} clients: p50 {statistics.median(x['p50'] for x in rs):.2f} ms, "
              f"p99 {statistics.median(x['p99'] for x in rs):.2f} ms, "
              f"{statistics.median(x['rate'] for x in rs):.0f} writes/s")


if __name__ == "__main__":
    main()
