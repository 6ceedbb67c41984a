#!/usr/bin/env python3
"""Completion messages in Redis Cluster: classic PUBLISH + PSUBSCRIBE against sharded
SPUBLISH + SSUBSCRIBE, measured on a 3-master cluster of the script's own.

    python3 scripts/pubsub-cluster.py [--keys 10000] [--instances 3,12,100] [--waiters 1,3]
                                      [--window 64] [--replicas 0] [--out DIR]

The first run makes a virtualenv under target/pubsub-venv and installs redis-py (with
hiredis) there with pip; later runs reuse it. The script starts its own redis-server nodes on
free loopback ports (never 6379), joins them with `redis-cli --cluster create`, and kills
them at the end. It writes the raw figures (results.json) and the tables (tables.md) to
--out (default target/pubsub-cluster/).

What one run does, for a mode, I subscriber "instances" and W waiting instances per key:

- K completions, each on the channel `rc:{<64 hex>}:done` of a random fingerprint (the hash
  tag puts the channel in the key's slot). Each completion is one EVALSHA on the node that
  owns the slot, declaring the key `rc:{<hex>}:res`, whose script publishes the message
  (the 32-hex fence and ` replay`, 39 bytes, as the store's completion script does).
- classic: each instance holds one connection, to node (i mod 3), subscribed to the pattern
  `rc:{*}:done` before the run; the script calls PUBLISH, which Redis Cluster forwards to
  every other node over the cluster bus.
- sharded: each instance holds one connection per node. For each key, each of its W waiting
  instances (drawn at random) sends SSUBSCRIBE for the key's channel to the slot's node and
  waits for the confirmation, then the script calls SPUBLISH, then each waiting instance,
  having received the message, sends SUNSUBSCRIBE (its last local waiter left).
- In both modes a key's W waiters must each receive its message; at most --window keys are
  in flight at once. The run ends when every expected delivery has arrived (classic: every
  instance receives every message).

Per node, the figures are differences of counters read before and after the run:
`INFO stats` (total_net_output_bytes, total_net_input_bytes), `INFO commandstats` (calls),
`INFO cpu` (used_cpu_user + used_cpu_sys, seconds), `CLUSTER INFO`
(cluster_stats_messages_*_sent), and /proc/<pid>/io wchar (every byte the process wrote to
any socket or file: client replies and the cluster bus; the nodes save nothing).
"""

import argparse
import asyncio
import json
import math
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / "target" / "pubsub-venv"
REQUIREMENTS = ["redis[hiredis]==8.1.0"]


def ensure_venv():
    """Re-runs this script inside target/pubsub-venv, creating it first if needed."""
    if Path(sys.prefix).resolve() == VENV.resolve():
        return
    python = VENV / "bin" / "python"
    installed = VENV / "installed.txt"
    if not installed.exists() or installed.read_text() != "\n".join(REQUIREMENTS):
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True
        )
        installed.write_text("\n".join(REQUIREMENTS))
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


ensure_venv()

import redis  # noqa: E402
from redis.asyncio.connection import Connection  # noqa: E402
from redis.crc import key_slot  # noqa: E402

SCRIPT_PUBLISH = "return redis.call('PUBLISH', ARGV[1], ARGV[2])"
SCRIPT_SPUBLISH = "return redis.call('SPUBLISH', ARGV[1], ARGV[2])"
PATTERN = "rc:{*}:done"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def binary(env, name, package):
    path = os.environ.get(env) or shutil.which(name)
    if not path:
        sys.exit(f"{name} not found: install it (apt-get install {package}) or set {env}")
    return path


class Cluster:
    """redis-server --cluster-enabled yes nodes on 127.0.0.1, killed by stop()."""

    def __init__(self, masters, replicas):
        self.server = binary("REDIS_SERVER_BIN", "redis-server", "redis-server")
        self.cli = binary("REDIS_CLI_BIN", "redis-cli", "redis-tools")
        self.dir = Path(tempfile.mkdtemp(prefix="rc-pubsub-cluster-"))
        self.nodes = []  # (port, Popen)
        count = masters * (1 + replicas)
        try:
            for n in range(count):
                port, bus = free_port(), free_port()
                node_dir = self.dir / str(n)
                node_dir.mkdir()
                args = [
                    self.server, "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000", "--cluster-port", str(bus),
                    "--repl-diskless-sync-delay", "0",
                    "--save", "", "--appendonly", "no", "--daemonize", "no",
                    "--dir", str(node_dir), "--logfile", str(node_dir / "redis.log"),
                ]
                self.nodes.append((port, subprocess.Popen(args, stdin=subprocess.DEVNULL)))
            for port, _ in self.nodes:
                self.wait(lambda: redis.Redis(port=port).ping(), f"node {port} answers PING")
            create = [self.cli, "--cluster", "create"]
            create += [f"127.0.0.1:{port}" for port, _ in self.nodes]
            create += ["--cluster-replicas", str(replicas), "--cluster-yes"]
            done = subprocess.run(create, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(create)} failed:\n{done.stdout}{done.stderr}")
            self.replicas = replicas
            self.wait(
                self.settled,
                "every node reports cluster_state:ok, the same slots and replicas, links up",
            )
        except BaseException:
            self.stop()
            raise

    def wait(self, probe, what, timeout=30.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if probe():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                logs = "\n".join(
                    f"--- {p} ---\n" + (self.dir / str(n) / "redis.log").read_text()[-2000:]
                    for n, (p, _) in enumerate(self.nodes)
                )
                raise RuntimeError(f"not within {timeout} s: {what}\n{logs}")
            time.sleep(0.05)

    def settled(self):
        views = []
        for port, _ in self.nodes:
            r = redis.Redis(port=port)
            if r.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                return False
            if r.info("replication").get("master_link_status", "up") != "up":
                return False
            slots = r.execute_command("CLUSTER SLOTS")
            # (first, last, master port, replica ports)
            views.append(sorted((s[0], s[1], s[2][1], tuple(x[1] for x in s[3:])) for s in slots))
        first = views[0]
        return (
            all(v == first for v in views)
            and sum(e - s + 1 for s, e, _, _ in first) == 16384
            and all(len(replicas) == self.replicas for *_, replicas in first)
        )

    def slot_owners(self):
        """A list of 16384 ports: the master of each slot."""
        owners = [0] * 16384
        for start, end, master, *_ in redis.Redis(port=self.nodes[0][0]).execute_command(
            "CLUSTER SLOTS"
        ):
            for slot in range(start, end + 1):
                owners[slot] = master[1]
        return owners

    def masters(self):
        return sorted(set(self.slot_owners()))

    def pid(self, port):
        return next(p.pid for q, p in self.nodes if q == port)

    def stop(self):
        for _, process in self.nodes:
            process.kill()
            process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def snapshot(cluster, port):
    """The counters of one node that a run is measured by."""
    r = redis.Redis(port=port, decode_responses=True)
    stats = r.info("stats")
    cpu = r.info("cpu")
    commands = {
        name.removeprefix("cmdstat_"): value["calls"]
        for name, value in r.info("commandstats").items()
    }
    bus = cluster_bus(r)
    io = dict(
        line.split(": ")
        for line in Path(f"/proc/{cluster.pid(port)}/io").read_text().splitlines()
    )
    return {
        "net_output_bytes": stats["total_net_output_bytes"],
        "net_input_bytes": stats["total_net_input_bytes"],
        "cpu_s": cpu["used_cpu_user"] + cpu["used_cpu_sys"],
        "commands": commands,
        "bus_sent": bus,
        "wchar": int(io["wchar"]),
    }


def cluster_bus(r):
    info = r.execute_command("CLUSTER INFO")
    if isinstance(info, dict):
        items = info.items()
    else:
        items = (line.split(":", 1) for line in info.splitlines() if ":" in line)
    sent = {}
    for name, value in items:
        # cluster_stats_messages_<type>_sent by message type (not the total, ..._sent).
        if name.startswith("cluster_stats_messages_") and name.endswith("_sent"):
            kind = name.removeprefix("cluster_stats_messages_").removesuffix("_sent")
            if kind != "sent":
                sent[kind] = int(value)
    return sent


def difference(before, after):
    def sub(a, b):
        if isinstance(b, dict):
            return {k: sub(a.get(k, 0), v) for k, v in b.items() if sub(a.get(k, 0), v)}
        return b - a

    return {key: sub(before[key], after[key]) for key in after}


class Subscriber:
    """One pub/sub connection of an instance, with a reader task that dispatches pushes."""

    def __init__(self, instance, port):
        self.instance = instance
        self.port = port
        # RESP2: pushes come back from read_response (RESP3 would route them to a handler).
        self.conn = Connection(host="127.0.0.1", port=port, protocol=2)
        self.acks = {}  # (kind, channel) -> Future
        self.reader = None

    async def start(self):
        await self.conn.connect()
        self.reader = asyncio.create_task(self.read())

    async def read(self):
        while True:
            try:
                push = await self.conn.read_response(timeout=math.inf)
            except Exception as error:
                self.instance.fail(error)
                for future in self.acks.values():
                    future.set_exception(error)
                raise
            kind = push[0].decode()
            if kind == "pmessage":
                self.instance.delivered(push[2].decode())
            elif kind == "smessage":
                self.instance.delivered(push[1].decode())
            else:  # psubscribe, ssubscribe, sunsubscribe confirmations
                future = self.acks.pop((kind, push[1].decode()), None)
                if future is not None:
                    future.set_result(None)

    async def command(self, kind, channel):
        future = asyncio.get_running_loop().create_future()
        self.acks[(kind.lower(), channel)] = future
        await self.conn.send_command(kind, channel)
        await future

    async def stop(self):
        self.reader.cancel()
        await self.conn.disconnect()


class Instance:
    """A subscriber "instance": its connections, its deliveries, its local waiters."""

    def __init__(self):
        self.deliveries = 0
        self.waiting = {}  # channel -> Future
        self.subscribers = {}  # port -> Subscriber

    def fail(self, error):
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(error)

    def delivered(self, channel):
        self.deliveries += 1
        future = self.waiting.pop(channel, None)
        if future is not None:
            future.set_result(None)

    def wait_for(self, channel):
        future = asyncio.get_running_loop().create_future()
        self.waiting[channel] = future
        return future


async def run(cluster, mode, instances, waiters, keys, window, seed):
    rng = random.Random(seed)
    owners = cluster.slot_owners()
    masters = cluster.masters()
    flights = []
    for _ in range(keys):
        fp = rng.randbytes(32).hex()
        fence = rng.randbytes(16).hex()
        flights.append(
            (
                f"rc:{{{fp}}}:res",
                f"rc:{{{fp}}}:done",
                f"{fence} replay",
                owners[key_slot(fp.encode())],
                rng.sample(range(instances), waiters),
            )
        )
    script = SCRIPT_PUBLISH if mode == "classic" else SCRIPT_SPUBLISH
    publishers = {}
    for port in masters:
        publishers[port] = redis.asyncio.Redis(port=port, max_connections=window)
        sha = await publishers[port].script_load(script)

    group = [Instance() for _ in range(instances)]
    for i, instance in enumerate(group):
        ports = [masters[i % len(masters)]] if mode == "classic" else masters
        for port in ports:
            instance.subscribers[port] = Subscriber(instance, port)
            await instance.subscribers[port].start()
    # Every connection is open: count from here (subscriptions included).
    # Every node is measured, replicas included (they receive the cluster bus's messages).
    measured = [port for port, _ in cluster.nodes]
    before = {port: snapshot(cluster, port) for port in measured}
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if mode == "classic":
        for instance in group:
            (subscriber,) = instance.subscribers.values()
            await subscriber.command("PSUBSCRIBE", PATTERN)

    gate = asyncio.Semaphore(window)

    async def flight(res, channel, message, port, waiting):
        async with gate:
            arrived = [group[i].wait_for(channel) for i in waiting]
            if mode == "sharded":
                await asyncio.gather(
                    *(group[i].subscribers[port].command("SSUBSCRIBE", channel) for i in waiting)
                )
            await publishers[port].evalsha(sha, 1, res, channel, message)
            await asyncio.gather(*arrived)
            if mode == "sharded":
                await asyncio.gather(
                    *(group[i].subscribers[port].command("SUNSUBSCRIBE", channel) for i in waiting)
                )

    await asyncio.gather(*(flight(*f) for f in flights))
    if mode == "classic":
        # Every instance receives every completion; wait for the stragglers (bounded).
        deadline = time.monotonic() + 60
        while any(i.deliveries < keys for i in group) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    after = {port: snapshot(cluster, port) for port in measured}

    for instance in group:
        for subscriber in instance.subscribers.values():
            await subscriber.stop()
    for publisher in publishers.values():
        await publisher.aclose()

    deliveries = [i.deliveries for i in group]
    return {
        "mode": mode,
        "instances": instances,
        "waiters": waiters,
        "keys": keys,
        "window": window,
        "wall_s": wall,
        "client_cpu_s": (cpu_after.ru_utime - cpu_before.ru_utime)
        + (cpu_after.ru_stime - cpu_before.ru_stime),
        "deliveries": {
            "total": sum(deliveries),
            "min": min(deliveries),
            "max": max(deliveries),
            "mean": sum(deliveries) / len(deliveries),
            "expected_by_waiters": keys * waiters,
        },
        "nodes": [
            {
                "node": n,
                "port": port,
                "role": "master" if port in masters else "replica",
                **difference(before[port], after[port]),
            }
            for n, port in enumerate(measured)
        ],
    }


def table(results, mode):
    rows = [r for r in results if r["mode"] == mode]
    head = (
        "| I | W | node | EVALSHA | PUBLISH | SPUBLISH | PSUBSCRIBE | SSUBSCRIBE | SUNSUBSCRIBE "
        "| net out (bytes) | wchar (bytes) | bus publish sent | bus publishshard sent "
        "| bus ping+pong sent | bus other sent | CPU (s) |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in rows:
        for node in r["nodes"]:
            c = node.get("commands", {})
            bus = node.get("bus_sent", {})
            ping = bus.get("ping", 0) + bus.get("pong", 0)
            other = sum(
                v for k, v in bus.items() if k not in ("publish", "publishshard", "ping", "pong")
            )
            lines.append(
                f"| {r['instances']} | {r['waiters']} | {node['node']} ({node['role']}) "
                f"| {c.get('evalsha', 0):,} "
                f"| {c.get('publish', 0):,} | {c.get('spublish', 0):,} "
                f"| {c.get('psubscribe', 0):,} | {c.get('ssubscribe', 0):,} "
                f"| {c.get('sunsubscribe', 0):,} | {node.get('net_output_bytes', 0):,} "
                f"| {node.get('wchar', 0):,} | {bus.get('publish', 0):,} "
                f"| {bus.get('publishshard', 0):,} | {ping:,} | {other:,} "
                f"| {node.get('cpu_s', 0):.2f} |"
            )
    lines.append("")
    lines.append(
        "| I | W | wall (s) | client CPU (s) | deliveries total | per instance min / mean / max "
        "| needed (K × W) | Σ net out (bytes) | Σ wchar (bytes) | Σ Redis CPU (s) |"
    )
    lines.append("|" + "---|" * 10)
    for r in rows:
        d = r["deliveries"]
        nodes = r["nodes"]
        lines.append(
            f"| {r['instances']} | {r['waiters']} | {r['wall_s']:.2f} | {r['client_cpu_s']:.2f} "
            f"| {d['total']:,} | {d['min']:,} / {d['mean']:,.0f} / {d['max']:,} "
            f"| {d['expected_by_waiters']:,} "
            f"| {sum(n.get('net_output_bytes', 0) for n in nodes):,} "
            f"| {sum(n.get('wchar', 0) for n in nodes):,} "
            f"| {sum(n.get('cpu_s', 0) for n in nodes):.2f} |"
        )
    return "\n".join(lines)


def main():
    # A SIGTERM (timeout, kill) unwinds like Ctrl-C, so that the nodes are killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--instances", default="3,12,100")
    parser.add_argument("--waiters", default="1,3")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--replicas", type=int, default=0)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "target" / "pubsub-cluster"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    cluster = Cluster(3, args.replicas)
    results = []
    try:
        for mode in ("classic", "sharded"):
            for instances in map(int, args.instances.split(",")):
                for waiters in map(int, args.waiters.split(",")):
                    if waiters > instances:
                        continue
                    result = asyncio.run(
                        run(cluster, mode, instances, waiters, args.keys, args.window, args.seed)
                    )
                    results.append(result)
                    d = result["deliveries"]
                    print(
                        f"{mode:8} I={instances:<4} W={waiters} wall {result['wall_s']:.2f} s, "
                        f"deliveries {d['total']:,} (needed {d['expected_by_waiters']:,})",
                        flush=True,
                    )
    finally:
        cluster.stop()

    meta = {
        "command": " ".join(["python3", "scripts/pubsub-cluster.py", *sys.argv[1:]]),
        "redis_server": subprocess.run(
            [binary("REDIS_SERVER_BIN", "redis-server", "redis-server"), "--version"],
            capture_output=True, text=True,
        ).stdout.strip(),
        "redis_py": redis.__version__,
        "cpus": os.cpu_count(),
        "replicas_per_master": args.replicas,
        # The machine's 1-, 5- and 15-minute load averages before and after: wall and CPU
        # figures depend on what else ran.
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=2))
    tables = "\n\n".join(f"### {mode}\n\n{table(results, mode)}" for mode in ("classic", "sharded"))
    (out / "tables.md").write_text(tables + "\n")
    print(f"\n{json.dumps(meta)}\n\n{tables}")


if __name__ == "__main__":
    main()
