#!/usr/bin/env python3
"""Drive a vfio-live live migration with an existing QMP client library (qemu.qmp).

Usage: qmp_migration_test.py VFIO_LIVE_BINARY WORKDIR PORT
Starts two device servers and two VMs (one waiting with --incoming), then over QMP:
negotiates, checks query-status, sets migration parameters and capabilities, migrates,
waits for the MIGRATION events up to 'completed', and checks the destination runs and
passes the integrity verifier. Exit 0 on success.
"""
import asyncio
import subprocess
import sys
import time

from qemu.qmp import QMPClient


async def wait_socket(client: QMPClient, path: str, proc: subprocess.Popen) -> None:
    deadline = time.time() + 30
    while True:
        try:
            await client.connect(path)
            return
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"VM behind {path} did not come up")
            await asyncio.sleep(0.1)


async def main(binary: str, work: str) -> int:
    procs = []

    def start(*args):
        p = subprocess.Popen([binary, *args, "--quiet"], stdout=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        start("device", "serve", "--socket", f"{work}/a.sock", "--state-size", "1M")
        start("device", "serve", "--socket", f"{work}/b.sock", "--state-size", "1M")
        time.sleep(0.5)
        common = ["--memory", "64M", "--workload", "working-set=16M,dirty-rate=50000,dma-every=8"]
        src = start("vm", "run", "--device", f"vfio-user,socket={work}/a.sock", "--qmp", f"{work}/a.qmp", *common)
        dst = start("vm", "run", "--device", f"vfio-user,socket={work}/b.sock", "--qmp", f"{work}/b.qmp",
                    "--incoming", f"tcp:127.0.0.1:{sys.argv[3]}", *common)
        a, b = QMPClient("source"), QMPClient("destination")
        await wait_socket(a, f"{work}/a.qmp", src)
        await wait_socket(b, f"{work}/b.qmp", dst)
        assert (await a.execute("query-status"))["status"] == "running"
        assert (await b.execute("query-status"))["status"] == "inmigrate"
        await a.execute("migrate-set-parameters", {"downtime-limit": 300, "max-bandwidth": 0})
        await a.execute("migrate-set-capabilities", {"capabilities": [{"capability": "auto-converge", "state": True}]})
        caps = await a.execute("query-migrate-capabilities")
        assert {"capability": "auto-converge", "state": True} in caps, caps
        try:
            await a.execute("no-such-command")
            raise AssertionError("an unknown command must fail")
        except Exception as e:
            assert "has not been found" in str(e), e
        port = int(sys.argv[3])
        events = []

        async def collect():
            async for ev in a.events:
                events.append(ev["data"]["status"] if ev["event"] == "MIGRATION" else ev["event"])
                if ev["event"] == "MIGRATION" and ev["data"]["status"] in ("completed", "failed", "cancelled"):
                    return

        watcher = asyncio.create_task(collect())
        await a.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await asyncio.wait_for(watcher, 60)
        info = await a.execute("query-migrate")
        print("events:", events)
        print("query-migrate:", info)
        assert events[-1] == "completed", events
        assert "active" in events and "setup" in events, events
        assert info["status"] == "completed" and info["ram"]["total"] == 64 << 20, info
        assert info["downtime"] >= 0 and info["ram"]["dirty-sync-count"] >= 1, info
        assert (await a.execute("query-status"))["status"] == "postmigrate"
        time.sleep(0.5)
        assert (await b.execute("query-status"))["status"] == "running"
        v = await b.execute("x-vfio-live-verify")
        print("destination verify:", v)
        assert v["ok"] and v["pages"] == 4096, v
        await a.disconnect()
        await b.disconnect()
        print("qemu.qmp drove the migration: OK")
        return 0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
