"""bench.copy_learning's tasks: the copyable mask marks exactly the targets that a copier can predict."""
import torch

from bench.copy_learning import ReferenceGPT, batch


def _repeats_earlier(ids: torch.Tensor, t: int, back: int) -> bool:
    return t + 1 - back >= 0 and bool(ids[t + 1] == ids[t + 1 - back])


def test_fixed_task_masks_the_second_half_at_one_distance():
    ids, mask = batch("fixed", torch.Generator().manual_seed(0), 3, 128, 4000)
    assert ids.shape == (3, 129) and mask.shape == (3, 128)
    for row, m in zip(ids, mask):
        assert m.sum() == 63 and not m[:65].any()
        assert all(_repeats_earlier(row, t, 65) for t in range(128) if m[t])


def test_periodic_task_masks_targets_after_the_first_period_at_varying_distances():
    ids, mask = batch("periodic", torch.Generator().manual_seed(1), 16, 128, 4000)
    periods = set()
    for row, m in zip(ids, mask):
        start = int(m.nonzero()[0])  # first copyable target: prefix + one period
        assert m[start:].all()
        p = next(p for p in range(8, 49) if all(_repeats_earlier(row, t, p) for t in range(start, 128)))
        # its input is the first id seen before (the run's first id again); the input before it was new
        assert row[start] == row[start - p] and row[start - 1] != row[start - 1 - p]
        periods.add(p)
    assert len(periods) > 4  # no fixed distance to attend to


def test_reference_gpt_is_causal():
    torch.manual_seed(0)
    model = ReferenceGPT(50, 2, 32, 4, 16)
    a = torch.randint(0, 50, (1, 16))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % 50
    la, lb = model(a), model(b)
    assert torch.allclose(la[0, :10], lb[0, :10], atol=1e-6) and not torch.allclose(la[0, 10], lb[0, 10])
