import sys, time, os
from vm import *
machine = os.environ.get("MACHINE", "q35"); append = os.environ.get("APPEND", ""); cpu = os.environ.get("CPU", "max")
extra = os.environ.get("EXTRA", "").split()
nclones = int(os.environ.get("NCLONES", "3")); obs = float(os.environ.get("OBS", "6"))
delay = float(os.environ.get("DELAY", "0"))
memf = f"{D}/shm/memory"; st = f"{D}/shm/state"
for p in (memf, st):
    if os.path.exists(p): os.unlink(p)
t0 = time.time()
a = VM("tmpl", machine=machine, append=append, cpu=cpu, extra=extra, memfile=memf, share="on")
assert a.wait_for(r"tick 3 ", 120), a.text()
print(f"[{machine} '{append}' {cpu} {extra}] template boot->tick3 {time.time()-t0:.1f}s")
n0=len(a.text()); a.send("cat /sys/devices/system/clocksource/clocksource0/current_clocksource\n")
m=a.wait_for(r"\n(tsc|hpet|acpi_pm|jiffies|refined-jiffies|tsc-early)\s", 10, n0); print("template clocksource:", m and m.group(1))
a.qmp("stop")
a.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
t1 = time.time()
a.qmp("migrate", uri=f"exec:cat > {st}")
r = a.wait_migration(); print("template save:", r["status"], f"{time.time()-t1:.2f}s", "state bytes:", os.path.getsize(st))
a.stop()
time.sleep(delay)
allok = True
for i in range(nclones):
    t2 = time.time()
    b = VM(f"clone{i}", machine=machine, append=append, cpu=cpu, extra=extra, memfile=memf, share="off", incoming=True)
    b.qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    b.qmp("migrate-incoming", uri=f"exec:cat {st}")
    b.wait_status("paused", 60)
    tready = time.time() - t2
    pss_paused = b.pss_kb()
    n0 = len(b.text()); b.qmp("cont")
    time.sleep(obs)
    tk = ticks(b.text()[n0:]); n1 = len(b.text())
    b.send("\necho hel''lo; time sleep 0.2; echo SL''EPT\n")
    e = bool(b.wait_for("hello", 5, n1)); s = bool(b.wait_for(r"SLEPT", 6, n1))
    ok = len(tk) >= obs - 2 and e and s; allok &= ok
    print(f"clone{i}: launch->paused-ready {tready:.2f}s  PSS paused {pss_paused} kB, running {b.pss_kb()} kB; ticks in {obs}s: {len(tk)} {tk[:1]}..{tk[-1:]} echo={e} sleep0.2={s} -> {'OK' if ok else 'FAIL'}")
    if os.environ.get("V"): print(b.text()[n0:])
    b.stop()
print("ALL OK" if allok else "SOME FAILED")
