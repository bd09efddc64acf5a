"""Hash lanes: SHA-256 streams fed block by block on helper threads."""

from __future__ import annotations

import hashlib
import os


def test_hash_lanes_hash_in_order_per_chunk() -> None:
    from funczero.checkpoint.hashing import HashLanes

    lanes = HashLanes(3)
    blobs = [os.urandom(n) for n in (0, 10, 1 << 20, 3 << 20)]
    streams = []
    for blob in blobs:
        s = lanes.start()
        for i in range(0, len(blob), 65536):
            s.update(memoryview(blob)[i : i + 65536])
        streams.append(s.digest())
    assert [f.result() for f in streams] == [hashlib.sha256(b).hexdigest() for b in blobs]


def test_a_new_stream_goes_to_the_lane_with_the_fewest_bytes_waiting() -> None:
    import threading

    from funczero.checkpoint.hashing import HashLanes

    lanes = HashLanes(2)
    gate = threading.Event()
    first = lanes.start()
    first._lanes._submit(first._lane, 1 << 30, gate.wait)  # lane busy with a "gigabyte"
    second = lanes.start()
    assert second._lane != first._lane
    gate.set()
    assert first.digest().result() == hashlib.sha256().hexdigest()
