"""io/fsutil: path helpers shared by every command that refuses to write inside another's folder."""

import os
from streamsvd.io.fsutil import within

def test_within_resolves_links_and_dots(tmp_path):
    a = tmp_path / "a"; (a / "b").mkdir(parents=True)
    os.symlink(a / "b", tmp_path / "link")
    assert within(a, a) and within(a / "b", a) and within(tmp_path / "link" / "new", a)
    assert within(a / "b" / ".." / "c", a) and not within(a / ".." / "c", a) and not within(tmp_path, a)
    assert not within(tmp_path / "ab", a)  # a prefix of the name is not a parent


def test_flock_holders_names_another_process_holding_a_folder(tmp_path):
    import subprocess
    import sys

    import pytest

    from streamsvd.io.fsutil import describe_process, flock_holders

    if not os.path.exists("/proc/locks"):
        pytest.skip("no /proc/locks on this system: the readers go unnamed there")
    assert flock_holders(tmp_path) == []
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
                               "fcntl.flock(fd, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)", str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert flock_holders(tmp_path) == [holder.pid]
        assert flock_holders(tmp_path / ".." / tmp_path.name) == [holder.pid]
        said = describe_process(holder.pid)
        assert said.startswith(f"process {holder.pid} (") and "fcntl.flock" in said
    finally:
        holder.kill()
        holder.wait()
    assert flock_holders(tmp_path) == []
