"""The paged KV cache: device block pool, host swap pool, block copies and swaps.

Layout. One tensor per layer, `kv[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 = keys, 1 = values). The per-layer tensors are views of one allocation
`pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, so a block copy or a
swap moves a list of blocks across all layers with one `index_select` + `index_copy_`. The slot of
a token is `block * block_size + offset`; `kv[layer][i].view(-1, num_kv_heads, head_dim)[slot]` is
that token's key (i=0) or value (i=1). The host pool has the same layout with `num_swap_blocks`
blocks and is pinned when the device is CUDA.

Staged copies (`staged`, the default on CUDA). Block copies and swaps go through one device staging
buffer of `staging_bytes(block_bytes)` (at most SWAP_CHUNK_BYTES, or one block; counted in the KV
budget by `pagedlab.executors.torch_executor.reserved_bytes`), in chunks, so no transient device tensor
as large as the swap is allocated; swaps cross the bus through a pinned host staging buffer that is
reused (grown as needed, never reallocated per swap). A swap-out is copied to pinned memory with
``non_blocking=True`` and scattered into the host pool only when the host pool is next needed (the next
swap, or `host`), by which time the copy has long finished: no swap waits on the device inside a step.
Block ids go up in one pinned, non-blocking copy (`metadata.to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pagedlab.kernels.metadata import to_device

Pairs = Sequence[tuple[int, int]]
SWAP_CHUNK_BYTES = 64 << 20  # device staging of staged block copies and swaps


def staging_bytes(block_bytes: int) -> int:
    """Device staging a staged KVCache allocates (on the first copy or swap), for blocks of `block_bytes`
    (all layers, K and V): whole blocks up to SWAP_CHUNK_BYTES, at least one."""
    return max(1, SWAP_CHUNK_BYTES // block_bytes) * block_bytes


class KVCache:
    """Paged KV storage for every layer, plus the host pool used by swapping. `staged` (default: on
    CUDA) moves blocks through reused staging buffers, see the module docstring."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_swap_blocks: int = 0,
        staged: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.num_blocks, self.block_size, self.num_swap_blocks = num_blocks, block_size, num_swap_blocks
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=self.device)
        self._pin = self.device.type == "cuda"
        self._host = torch.empty((num_layers, 2, num_swap_blocks, *shape[3:]), dtype=dtype, pin_memory=self._pin)
        self.layers: list[torch.Tensor] = list(self.pool.unbind(0))
        self.staged = self.device.type == "cuda" if staged is None else staged
        self._block_shape = (num_layers, 2, 1, *shape[3:])
        self._block_numel = self.pool[:, :, 0].numel()
        self.chunk_blocks = staging_bytes(self.block_bytes) // self.block_bytes
        self._stage: torch.Tensor | None = None  # device staging, chunk_blocks blocks (made on first use)
        self._pinned: torch.Tensor | None = None  # host staging (pinned on CUDA), grown as needed
        self._event: torch.cuda.Event | None = None  # the last copy that reads or writes `_pinned`
        self._pending: tuple[list[int], list[torch.Tensor]] | None = None  # a swap-out not yet in `_host`
        self.pinned_allocations = 0  # how often the host staging was (re)allocated (tests)

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def host(self) -> torch.Tensor:
        """The host pool `[num_layers, 2, num_swap_blocks, ...]`, with every swap-out so far in it."""
        self._finish_swap_out()
        return self._host

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (K and V)."""
        return self.pool[:, :, 0].numel() * self.pool.element_size()

    def _ids(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        return to_device(list(ids), torch.long, device)

    # -- staging ------------------------------------------------------------------------------------
    def _blocks(self, buf: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Blocks start..start+n of a flat staging buffer, as a contiguous [L, 2, n, ...] tensor."""
        shape = list(self._block_shape)
        shape[2] = n
        return buf[start * self._block_numel : (start + n) * self._block_numel].view(shape)

    def _device_stage(self, n: int) -> torch.Tensor:
        if self._stage is None:  # a normal tensor (not an inference one): usable in and out of inference mode
            with torch.inference_mode(False):
                self._stage = torch.empty(self.chunk_blocks * self._block_numel, dtype=self.pool.dtype,
                                          device=self.device)
        return self._blocks(self._stage, 0, n)

    def _host_stage(self, n: int) -> torch.Tensor:
        """The pinned staging buffer, room for `n` blocks, once the copies that used it have finished."""
        if self._event is not None:
            self._event.synchronize()  # long done by now: the step that issued it has been sampled
            self._event = None
        need = n * self._block_numel
        if self._pinned is None or self._pinned.numel() < need:
            have = 0 if self._pinned is None else self._pinned.numel()
            size = min(max(need, 2 * have), max(need, self.num_swap_blocks * self._block_numel))
            with torch.inference_mode(False):
                self._pinned = torch.empty(size, dtype=self.pool.dtype, pin_memory=self._pin)
            self.pinned_allocations += 1
        return self._pinned

    def _record(self) -> None:
        if self.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def _finish_swap_out(self) -> None:
        """Scatter a pending swap-out from the pinned staging into the host pool."""
        if self._pending is None:
            return
        host_ids, regions = self._pending
        self._pending = None
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        at = 0
        for region in regions:
            n = region.shape[2]
            self._host.index_copy_(2, torch.tensor(host_ids[at : at + n], dtype=torch.long), region)
            at += n

    # -- copies and swaps ---------------------------------------------------------------------------
    def copy_blocks(self, pairs: Pairs) -> None:
        """Copy device blocks (src, dst) in every layer; all sources are read before any write."""
        if not pairs:
            return
        src, dst = zip(*pairs)
        n = len(src)
        ids = self._ids(src + dst, self.device)
        s_ids, d_ids = ids[:n], ids[n:]
        if not self.staged or (n > self.chunk_blocks and not set(src).isdisjoint(dst)):
            # unstaged, or chunks that would read a block an earlier chunk wrote: one read of all
            self.pool.index_copy_(2, d_ids, self.pool.index_select(2, s_ids))
            return
        for a in range(0, n, self.chunk_blocks):
            b = min(n, a + self.chunk_blocks)
            stage = self._device_stage(b - a)
            torch.index_select(self.pool, 2, s_ids[a:b], out=stage)
            self.pool.index_copy_(2, d_ids[a:b], stage)

    def swap_out(self, pairs: Pairs) -> None:
        """Copy (device block, host block) pairs to the host pool."""
        if not pairs:
            return
        dev, host = zip(*pairs)
        self._finish_swap_out()
        if not self.staged:
            rows = self.pool.index_select(2, self._ids(dev, self.device)).to("cpu")
            self._host.index_copy_(2, torch.tensor(host, dtype=torch.long), rows)
            return
        n = len(dev)
        d_ids = self._ids(dev, self.device)
        pinned = self._host_stage(n)
        regions = []
        for a in range(0, n, self.chunk_blocks):
            b = min(n, a + self.chunk_blocks)
            stage = self._device_stage(b - a)
            torch.index_select(self.pool, 2, d_ids[a:b], out=stage)
            region = self._blocks(pinned, a, b - a)
            region.copy_(stage, non_blocking=True)
            regions.append(region)
        self._record()
        self._pending = (list(host), regions)

    def swap_in(self, pairs: Pairs) -> None:
        """Copy (host block, device block) pairs back to the device pool."""
        if not pairs:
            return
        host, dev = zip(*pairs)
        self._finish_swap_out()
        h_ids = torch.tensor(host, dtype=torch.long)
        if not self.staged:
            rows = self._host.index_select(2, h_ids)
            self.pool.index_copy_(2, self._ids(dev, self.device), rows.to(self.device, non_blocking=True))
            return
        n = len(dev)
        d_ids = self._ids(dev, self.device)
        pinned = self._host_stage(n)
        for a in range(0, n, self.chunk_blocks):
            b = min(n, a + self.chunk_blocks)
            region = self._blocks(pinned, a, b - a)
            torch.index_select(self._host, 2, h_ids[a:b], out=region)
            stage = self._device_stage(b - a)
            stage.copy_(region, non_blocking=True)
            self.pool.index_copy_(2, d_ids[a:b], stage)
        self._record()
