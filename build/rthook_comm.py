"""PyInstaller runtime hook: call the process "drainctl" again (ps, top, psutil).

The launcher starts the bundle through its own glibc loader, so the kernel names the process
after the loader's file ("ld-linux-x86-64"); comm(5) is ours to set (proc(5), /proc/pid/comm).
"""

try:
    with open("/proc/self/comm", "w") as comm:
        comm.write("drainctl")
except OSError:
    pass  # no /proc: only the name is wrong
