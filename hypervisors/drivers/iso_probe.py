"""Opens an ISO 9660 image with pycdlib: run as a script by qemu_img._check_iso, in a child process under CPU
and memory limits. Exit 0 if it opens; else exit 1 with the reason on stdout. Imports nothing of the portal."""

import sys

import pycdlib
from pycdlib.pycdlibexception import PyCdlibException


def main(path: str) -> int:
    iso = pycdlib.PyCdlib()
    try:
        iso.open(path)
    except (PyCdlibException, OSError) as e:
        print(str(e)[:300])
        return 1
    iso.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
