"""The paged KV cache: device block pool, host swap pool, block copies and swaps.

Layout. One tensor per layer, `kv[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim]`
(index 0 = keys, 1 = values). The per-layer tensors are views of one allocation
`pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`, so a block copy or a
swap moves a list of blocks across all layers with one `index_select` + `index_copy_`. The slot of
a token is `block * block_size + offset`; `kv[layer][i].view(-1, num_kv_heads, head_dim)[slot]` is
that token's key (i=0) or value (i=1). The host pool has the same layout with `num_swap_blocks`
blocks and is pinned when the device is CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Pairs = Sequence[tuple[int, int]]


class KVCache:
    """Paged KV storage for every layer, plus the host pool used by swapping."""

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
    ) -> None:
        self.device = torch.device(device)
        self.num_blocks, self.block_size, self.num_swap_blocks = num_blocks, block_size, num_swap_blocks
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.pool = torch.zeros(shape, dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.empty((num_layers, 2, num_swap_blocks, *shape[3:]), dtype=dtype, pin_memory=pin)
        self.layers: list[torch.Tensor] = list(self.pool.unbind(0))

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block over all layers (K and V)."""
        return self.pool[:, :, 0].numel() * self.pool.element_size()

    def _ids(self, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        return torch.tensor(list(ids), dtype=torch.long, device=device)

    def copy_blocks(self, pairs: Pairs) -> None:
        """Copy device blocks (src, dst) in every layer; all sources are read before any write."""
        if not pairs:
            return
        src, dst = zip(*pairs)
        rows = self.pool.index_select(2, self._ids(src, self.device))
        self.pool.index_copy_(2, self._ids(dst, self.device), rows)

    def swap_out(self, pairs: Pairs) -> None:
        """Copy (device block, host block) pairs to the host pool."""
        if not pairs:
            return
        dev, host = zip(*pairs)
        rows = self.pool.index_select(2, self._ids(dev, self.device)).to("cpu")
        self.host.index_copy_(2, self._ids(host, torch.device("cpu")), rows)

    def swap_in(self, pairs: Pairs) -> None:
        """Copy (host block, device block) pairs back to the device pool."""
        if not pairs:
            return
        host, dev = zip(*pairs)
        rows = self.host.index_select(2, self._ids(host, torch.device("cpu")))
        if self.device.type == "cuda":
            rows = rows.pin_memory()
        self.pool.index_copy_(2, self._ids(dev, self.device), rows.to(self.device, non_blocking=True))
