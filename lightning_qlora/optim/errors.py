"""Typed errors of the paged optimizers and their page stores.

Each message names the offending value and says how to fix it. Input errors derive from
:class:`PagedOptimizerError` (a ``ValueError``); failures of the backing memory or disk are
:class:`PageStoreError` (an ``OSError``-like ``RuntimeError``) and are raised while the store is
set up -- never in the middle of an optimizer step, where state could be half written.
"""

from __future__ import annotations

from lightning_qlora.errors import ConfigError, ResourceError


class PagedOptimizerError(ConfigError):
    """Base class for bad input to a paged optimizer or to the conversion into one."""


class UnsupportedOptimizerError(PagedOptimizerError, TypeError):
    """An optimizer class (or one of its options) has no paged counterpart."""


class PageBudgetError(PagedOptimizerError):
    """A resident-memory budget cannot hold the pages one update needs (current + prefetched)."""


class PageStoreError(ResourceError):
    """The memory or disk behind a page store could not be set up."""


class PageStoreSetupError(PageStoreError):
    """A page file could not be created or its space reserved (unwritable directory, full disk)."""


class PageStoreUnavailableError(PageStoreError):
    """The chosen page store needs hardware or a build that is not present (e.g. CUDA)."""
