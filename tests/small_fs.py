"""A small real filesystem for tests of a full disk: a tmpfs with `size=`, mounted on a
directory of its own and unmounted (by that path) and removed afterwards."""
import os
import shutil
import subprocess
import tempfile

import pytest


class SmallFilesystem:
    def __init__(self, size_bytes: int):
        self.path = tempfile.mkdtemp(prefix="owca-small-fs-")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755",
                                 "owca-test-tmpfs", self.path], capture_output=True, text=True)
        if result.returncode != 0:
            os.rmdir(self.path)
            pytest.skip(f"cannot mount a tmpfs (needs root): {result.stderr.strip()}")

    def free_bytes(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self, leave_free: int) -> None:
        """A ballast file that leaves about `leave_free` bytes free (to within a block)."""
        with open(os.path.join(self.path, "ballast"), "ab") as f:
            f.write(b"\0" * max(0, self.free_bytes() - leave_free))

    def close(self) -> None:
        if subprocess.run(["umount", self.path], capture_output=True).returncode != 0:
            # Still busy (a failed test left a file open in it): detach it now, the
            # kernel frees it when the last descriptor closes.
            subprocess.run(["umount", "--lazy", self.path], check=True)
        shutil.rmtree(self.path, ignore_errors=True)


@pytest.fixture
def small_fs():
    """small_fs(size_bytes): a mounted tmpfs of that size; several may be made."""
    made = []

    def make(size_bytes: int) -> SmallFilesystem:
        made.append(SmallFilesystem(size_bytes))
        return made[-1]

    yield make
    for fs in made:
        fs.close()
