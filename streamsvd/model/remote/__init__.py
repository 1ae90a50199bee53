"""Files written into every OUT_DIR so that plain transformers loads it (trust_remote_code=True).

`modeling_streamsvd.py` is both a module of streamsvd (model/lowrank.py imports its layer classes,
so the two can never drift) and, byte for byte, the remote code an OUT_DIR ships.
"""

from pathlib import Path

MODELING_FILE = "modeling_streamsvd.py"


def modeling_source() -> bytes:
    """The bytes of the remote-code file, as `output.finish` writes them into OUT_DIR."""
    return (Path(__file__).parent / MODELING_FILE).read_bytes()
