"""The kernel layer: the only code in hijack that talks to the kernel.

Only modules in this package import ctypes or python-ptrace. Every OSError the
kernel gives is converted here, by `hijack.sys.errors`, into a HijackError.
"""
