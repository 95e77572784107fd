"""Token sampling: greedy, temperature, top-k, top-p, each request drawing from its own generator."""

from __future__ import annotations

import torch

from engine.request import Request, SamplingParams, make_generator
from engine.sampler import sample

CPU = torch.device("cpu")


def req(sp: SamplingParams, rid: str = "r") -> Request:
    return Request(rid, [1], 1, sp, generator=make_generator(sp, CPU))


def logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def test_greedy_takes_the_argmax_and_has_no_generator():
    sp = SamplingParams()
    r = req(sp)
    assert r.generator is None and sp.greedy
    assert sample(logits([0.1, 3.0, 2.9], [5.0, -1.0, 0.0]), [r, req(sp, "s")]) == [1, 0]
    assert SamplingParams(temperature=1.0, top_k=1).greedy


def test_seeded_sampling_is_reproducible_and_per_request():
    """Same seed, same draws, whatever else is in the batch; a different seed gives other draws."""
    row = [0.0] * 50

    def draws(seed: int, neighbours: int) -> list[int]:
        sp = SamplingParams(temperature=1.0, seed=seed)
        mine = req(sp, "mine")
        others = [req(SamplingParams(temperature=1.0, seed=99 + i), f"o{i}") for i in range(neighbours)]
        out = []
        for _ in range(30):
            out.append(sample(logits(*[row] * (1 + neighbours)), [*others, mine])[-1])
        return out

    assert draws(1234, 0) == draws(1234, 3)
    assert draws(1234, 0) != draws(4321, 0)


def test_generator_state_carries_the_stream():
    """Exporting and restoring a request's generator state continues its random stream exactly."""
    sp = SamplingParams(temperature=0.8, top_p=0.9, seed=1234)
    a = req(sp)
    row = logits([float(i % 7) for i in range(40)])
    first = [sample(row, [a])[0] for _ in range(5)]
    b = Request.from_state(a.export_state(), CPU)
    assert [sample(row, [a])[0] for _ in range(20)] == [sample(row, [b])[0] for _ in range(20)]
    assert len(first) == 5


def test_top_k_and_top_p_restrict_the_support():
    """top_k=2 only draws the two best; top_p=0.5 over (0.6, 0.3, 0.1) only the first; top_p=0.8 two."""
    l3 = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))

    def support(sp: SamplingParams, lg: torch.Tensor, n: int = 300) -> set[int]:
        r = req(sp)
        return {sample(lg, [r])[0] for _ in range(n)}

    assert support(SamplingParams(temperature=1.0, top_k=2, seed=1), logits([0.0, 1.0, 0.5, 0.9])) == {1, 3}
    assert support(SamplingParams(temperature=1.0, top_p=0.5, seed=2), l3) == {0}
    assert support(SamplingParams(temperature=1.0, top_p=0.8, seed=3), l3) == {0, 1}
    assert support(SamplingParams(temperature=1.0, seed=4), l3) == {0, 1, 2}


def test_temperature_follows_the_softmax():
    """Frequencies at temperature 1 approach softmax(logits); a low temperature concentrates on the best."""
    r = req(SamplingParams(temperature=1.0, seed=5))
    lg = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    counts = torch.bincount(torch.tensor([sample(lg, [r])[0] for _ in range(3000)]), minlength=3) / 3000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.2]), atol=0.04)
    cold = req(SamplingParams(temperature=0.05, seed=6))
    assert {sample(lg, [cold])[0] for _ in range(200)} == {0}
