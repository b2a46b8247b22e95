"""ddpm.data.loader: the data order (IndexStream) and the Prefetcher (same batches as a direct fetch,
fetched ahead, workers stopped)."""

import threading

import pytest
import torch

from ddpm.data.loader import Prefetcher
from ddpm.data.loader import IndexStream

DATA = torch.arange(50 * 3, dtype=torch.float32).view(50, 3)


def _stream():
    stream = IndexStream(len(DATA), micro_batch=8, seed=3)
    return stream.batch, lambda idx: DATA[idx]


def test_index_stream_is_a_sequence_of_epoch_permutations():
    stream = IndexStream(n=10, micro_batch=4, seed=3)
    order = torch.cat([stream.batch(j) for j in range(5)])  # 20 positions = 2 epochs
    assert sorted(order[:10].tolist()) == list(range(10)) and sorted(order[10:].tolist()) == list(range(10))
    assert not torch.equal(order[:10], order[10:])
    # the state is only j: a fresh stream reproduces any batch (resume needs no iterator state)
    assert torch.equal(IndexStream(10, 4, 3).batch(3), stream.batch(3))
    assert not torch.equal(IndexStream(10, 4, 4).batch(0), stream.batch(0))


@pytest.mark.parametrize("workers,depth", [(0, 1), (0, 2), (1, 2), (3, 4)])
def test_batches_equal_direct_fetch_in_order(workers, depth):
    indices_of, fetch = _stream()
    expect = [fetch(IndexStream(len(DATA), 8, 3).batch(j)) for j in range(20)]  # crosses epochs
    with Prefetcher(indices_of, fetch, workers=workers, depth=depth) as loader:
        got = [loader.get(j) for j in range(20)]
    for e, g in zip(expect, got):
        assert torch.equal(e, g)


def test_restart_at_an_earlier_step_gives_that_step():
    # A resumed run asks for j again from a fresh position: stale prefetches must not leak in.
    indices_of, fetch = _stream()
    with Prefetcher(indices_of, fetch, workers=2, depth=3) as loader:
        first = [loader.get(j) for j in range(6)]
        again = loader.get(2)
        later = loader.get(3)
    assert torch.equal(again, first[2]) and torch.equal(later, first[3])


def test_next_batches_are_fetched_before_they_are_asked_for():
    asked, started = [], threading.Event()
    release = threading.Event()

    def fetch(idx):
        asked.append(int(idx[0]))
        if int(idx[0]) == 2:
            started.set()
            release.wait(10)
        return DATA[idx]

    with Prefetcher(lambda j: torch.tensor([j]), fetch, workers=2, depth=3) as loader:
        assert torch.equal(loader.get(0), DATA[[0]])
        # Batch 2 is being fetched in the background while the caller still holds batch 0.
        assert started.wait(10), "batch j + depth - 1 was not started ahead"
        release.set()
        assert torch.equal(loader.get(1), DATA[[1]])
        assert torch.equal(loader.get(2), DATA[[2]])
    assert sorted(asked[:3]) == [0, 1, 2]


def test_workers_stop_on_close():
    indices_of, fetch = _stream()
    loader = Prefetcher(indices_of, fetch, workers=2, depth=2)
    loader.get(0)
    loader.close()
    assert not any(t.name.startswith("ddpm-data") and t.is_alive() for t in threading.enumerate())


def test_bad_arguments_are_refused():
    indices_of, fetch = _stream()
    with pytest.raises(ValueError, match="workers"):
        Prefetcher(indices_of, fetch, workers=-1)
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(indices_of, fetch, depth=0)


def test_training_with_worker_threads_matches_training_without(tmp_path):
    import ddpm
    from ddpm.io.checkpoint import read_weights

    base = ddpm.get_preset("tiny").override(**{"train.steps": 6, "train.sample_every": 0, "train.progress": False})
    runs = {}
    for workers in (0, 2):
        out = ddpm.train(base.override(**{"train.num_workers": workers}), out=tmp_path / f"w{workers}")
        ckpt = sorted(out.glob("ckpt-*"))[-1]
        runs[workers], _ = read_weights(ckpt / "model.safetensors")
    for key, value in runs[0].items():
        assert torch.equal(value, runs[2][key]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned asynchronous copies need CUDA")
def test_cuda_batches_come_from_reused_pinned_buffers():
    indices_of, fetch = _stream()
    with Prefetcher(indices_of, fetch, "cuda", workers=1, depth=2) as loader:
        got = [loader.get(j) for j in range(10)]
        buffers = [b.data_ptr() for b in loader._buffers]
        assert all(b.is_pinned() for b in loader._buffers)
        more = loader.get(10)
        assert [b.data_ptr() for b in loader._buffers] == buffers  # reused, not re-pinned
    torch.cuda.synchronize()
    expect = IndexStream(len(DATA), 8, 3)
    for j, g in enumerate(got + [more]):
        assert g.is_cuda and torch.equal(g.cpu(), DATA[expect.batch(j)])
