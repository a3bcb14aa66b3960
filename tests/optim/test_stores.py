"""Page stores: LRU budget (measured in /proc/self/smaps), data survives eviction, setup failures are early and clear."""

from __future__ import annotations

import errno
import os
import resource
import signal

import pytest
import torch

from lightning_qlora.optim import (
    CudaManagedPageStore,
    HostPageStore,
    MmapPageStore,
    PagedAdamW,
    PagedOptimizerError,
    PageStoreSetupError,
    PageStoreUnavailableError,
    make_page_store,
)
from tests.optim._smaps import page_file_rss_bytes

PAGE = MmapPageStore.alignment


def test_evicted_pages_keep_their_data_and_resident_set_stays_in_budget(tmp_path):
    store = MmapPageStore(tmp_path, budget_bytes=2 * PAGE)
    extents = store.allocate([PAGE] * 6)
    for value, extent in enumerate(extents):
        view = store.fetch(extent)
        view.fill_(value + 1)
        store.release(extent, view, dirty=True)
        assert page_file_rss_bytes(tmp_path) <= store.budget_bytes
    assert store.peak_resident_bytes == 2 * PAGE
    assert page_file_rss_bytes(tmp_path) > 0  # the measurement sees the mapping at all
    for value, extent in enumerate(extents):
        assert torch.all(store.read(extent) == value + 1)


def test_a_pinned_page_is_never_evicted(tmp_path):
    store = MmapPageStore(tmp_path, budget_bytes=2 * PAGE)
    first, second, third = store.allocate([PAGE] * 3)
    view = store.fetch(first)
    store.fetch(second)
    with pytest.raises(PagedOptimizerError, match="cannot hold another page"):
        store.fetch(third)  # both resident pages are pinned
    store.release(first, view, dirty=False)
    store.fetch(third)


def test_50_mib_of_state_trains_identically_within_a_1_mib_resident_budget(tmp_path):
    shapes = [(1600, 1024)] * 4  # 6.55M parameters: AdamW state 2 x 4 B x 6.55M = 50 MiB
    generator = torch.Generator().manual_seed(0)
    reference_params = [torch.nn.Parameter(torch.randn(*s, generator=generator)) for s in shapes]
    paged_params = [torch.nn.Parameter(p.detach().clone()) for p in reference_params]
    reference = torch.optim.AdamW(reference_params, lr=1e-3)
    store = MmapPageStore(tmp_path, budget_bytes=1 << 20)
    paged = PagedAdamW(paged_params, lr=1e-3, store=store)
    assert store.reserved_bytes >= 50 << 20
    measured = []
    fetch = store.fetch

    def measured_fetch(extent):  # instrument every page the update brings in
        view = fetch(extent)
        measured.append(page_file_rss_bytes(tmp_path))
        return view

    store.fetch = measured_fetch
    for step in range(3):
        gradient = torch.Generator().manual_seed(step)
        for a, b in zip(reference_params, paged_params, strict=True):
            a.grad = torch.randn(a.shape, generator=gradient)
            b.grad = a.grad.clone()
        reference.step()
        paged.step()
    assert all(torch.equal(a, b) for a, b in zip(reference_params, paged_params, strict=True))
    assert len(measured) >= 3 * 100  # ~100 pages of 512 KiB per step
    assert max(measured) <= 1 << 20
    assert max(measured) > 0
    assert store.peak_resident_bytes <= 1 << 20


def test_unwritable_page_directory_fails_at_construction(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PageStoreSetupError, match="cannot create the page directory"):
        MmapPageStore(blocker / "pages", budget_bytes=1 << 20)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_page_directory_fails_at_construction(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(PageStoreSetupError, match="cannot create a page file"):
            PagedAdamW([torch.nn.Parameter(torch.zeros(10))], store=MmapPageStore(tmp_path))
    finally:
        tmp_path.chmod(0o700)


def test_full_disk_fails_at_construction_not_mid_step(tmp_path, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    param = torch.nn.Parameter(torch.zeros(100_000))
    with pytest.raises(PageStoreSetupError, match="No space left on device.*choose another page_dir"):
        PagedAdamW([param], store=MmapPageStore(tmp_path, budget_bytes=1 << 20))


def test_file_size_limit_is_hit_while_reserving_not_while_stepping(tmp_path):
    # a real failure of the reservation: the process may not write files past 1 MiB
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(PageStoreSetupError, match="cannot reserve"):
            PagedAdamW(
                [torch.nn.Parameter(torch.zeros(1_000_000))], store=MmapPageStore(tmp_path, budget_bytes=1 << 20)
            )
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_managed_store_without_cuda_is_a_clear_error():
    with pytest.raises(PageStoreUnavailableError, match="needs a CUDA device"):
        CudaManagedPageStore()
    with pytest.raises(PageStoreUnavailableError):
        make_page_store("cuda", "cpu")


def test_host_store_on_cpu_refuses_a_budget_it_cannot_honour():
    with pytest.raises(PagedOptimizerError, match="MmapPageStore"):
        HostPageStore("cpu", budget_bytes=1 << 20)


def test_make_page_store_choices(tmp_path):
    assert isinstance(make_page_store("auto", "cpu"), HostPageStore)
    assert isinstance(make_page_store("auto", "cpu", budget_bytes=1 << 20, directory=tmp_path), MmapPageStore)
    with pytest.raises(PagedOptimizerError, match="unknown page store 'disk'"):
        make_page_store("disk")
