"""services.launcher's port picking: concurrent test runners (pytest-xdist workers) get disjoint ranges."""

from __future__ import annotations

import pytest

from services.launcher import free_port_block, free_ports, port_slice


@pytest.mark.parametrize("raw, want", [("", (0, 1)), ("1/2", (1, 2)), ("0/3", (0, 3)), ("2/2", (0, 1)),
                                       ("x/2", (0, 1)), ("-1/2", (0, 1)), ("1", (0, 1))])
def test_port_slice_reads_the_environment(monkeypatch, raw, want):
    monkeypatch.setenv("KVFERRY_PORT_SLICE", raw)
    assert port_slice() == want


def test_two_slices_never_pick_the_same_ports(monkeypatch):
    picked: dict[int, set[int]] = {}
    for i in (0, 1):
        monkeypatch.setenv("KVFERRY_PORT_SLICE", f"{i}/2")
        ports: set[int] = set()
        for _ in range(20):
            http, base = free_ports(2)
            ports |= {base, base + 1, base + 2, http, *range(base + 100, base + 106)}
            first = free_port_block(3)
            ports |= {first, first + 1, first + 2}
        picked[i] = ports
    assert not picked[0] & picked[1]
