# Reproduce the "ticks stop but echo works" symptom: a client connected to the serial
# unix socket that does NOT read (as a naive harness does), vs draining.
import sys, time, os, socket
from vm import *
drain = sys.argv[1] == "drain"
VM.serial_connect_orig = VM.serial_connect
def sc(self):
    if self.ser is None:
        if drain: return VM.serial_connect_orig(self)
        self.ser = socket.socket(socket.AF_UNIX); self.ser.connect(self.ser_path)
VM.serial_connect = sc
a = VM("bp", append="")
a.wait_for(r"tick 3 ", 60)
time.sleep(20)
tk = ticks(a.text()); print("fresh boot (no migration), drain=%s: ticks after 23s:" % drain, tk[-3:], "bytes logged", len(a.text()))
n1=len(a.text()); a.send("echo hel''lo\n"); print("echo:", bool(a.wait_for("hello", 5, n1)))
a.stop()
