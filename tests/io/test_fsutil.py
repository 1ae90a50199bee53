"""io/fsutil: path helpers shared by every command that refuses to write inside another's folder."""

import os
from streamsvd.io.fsutil import within

def test_within_resolves_links_and_dots(tmp_path):
    a = tmp_path / "a"; (a / "b").mkdir(parents=True)
    os.symlink(a / "b", tmp_path / "link")
    assert within(a, a) and within(a / "b", a) and within(tmp_path / "link" / "new", a)
    assert within(a / "b" / ".." / "c", a) and not within(a / ".." / "c", a) and not within(tmp_path, a)
    assert not within(tmp_path / "ab", a)  # a prefix of the name is not a parent
