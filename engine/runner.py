"""The model runner: owns the model and the paged KV cache, turns scheduled runs into one forward.

The cache is a single tensor::

    kv_cache[2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]
             ^ 0 = keys, 1 = values

Token ``p`` of a sequence lives in block ``block_table[p // block_size]`` at offset
``p % block_size``; its flat slot is ``block_id * block_size + offset``.

Swapped-out KV lives in ``host_kv_cache``, the same shape with ``num_host_blocks`` blocks, in
host memory (pinned when the cache is on CUDA, so copies run at the link's speed). A run of
consecutive blocks moves as one slice copy across every layer, keys and values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.model import (
    AttentionBatch,
    DecodeGroup,
    Linear,
    LlamaModel,
    SequenceSlice,
    rope_inv_freq,
)
from engine.precision import (
    USES,
    PrecisionPlan,
    choose_plan,
    dtype_name,
    host_kv_dtype,
    measure,
)
from engine.sampler import sample
from engine.sequence import ScheduledRun
from engine.single_decode import SingleDecoder
from engine.swap import BlockRun

__all__ = ["ModelRunner", "kv_bytes_per_token", "measure_plan"]

logger = logging.getLogger(__name__)

SCRUB_BLOCKS = 16  # blocks ``scrub`` copies and checks at once
# Decodes attended in one padded call: the longest context at most this many times the shortest.
DECODE_GROUP_SPREAD = 2


def measure_plan(
    model: LlamaModel, low_dtype: torch.dtype, *, cache_dir: Path | None = None
) -> PrecisionPlan:
    """Time ``model``'s products in its dtype and in ``low_dtype`` and plan by the result
    (``engine.precision``; attention, the KV cache's dtype, by the CPU's kind:
    ``host_kv_dtype``); logged once, with what the probe cost.

    ``cache_dir``: plans measured on this host, one file per (CPU, torch, threads, model shape,
    dtypes). The first process measures and writes it under a lock while the others wait, and
    every later one (a prefill and a decode worker starting together, a restarted worker)
    reads it: workers of one model on one host run the same arithmetic, so a disaggregated
    answer is the colocated one, and a worker started on a busy machine does not keep a plan
    picked by the noise. Delete the directory to measure again."""
    if cache_dir is None:
        return _measured_plan(model, low_dtype)
    dtype = model.embed_tokens.weight.dtype
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{_plan_key(model, low_dtype)}.json"
    with open(cache_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        try:
            known = json.loads(path.read_text())
            plan = PrecisionPlan(dtype, *(getattr(torch, known[use]) for use in _PLAN_FIELDS))
            if {plan.single_row, plan.decode, plan.prefill} - {dtype, low_dtype}:
                raise ValueError(f"{path} names another dtype")
            # The KV dtype is the host's rule's, whatever an older file says.
            plan = dataclasses.replace(plan, attention=host_kv_dtype(dtype, low_dtype))
            logger.info(
                "precision from %s (measured earlier on this host): %s", path, plan.describe()
            )
            return plan
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            pass  # none yet, or unreadable: measure
        plan = _measured_plan(model, low_dtype)
        fields = {use: dtype_name(getattr(plan, use)) for use in _PLAN_FIELDS}
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(fields))
        partial.replace(path)
        return plan


_PLAN_FIELDS = ("single_row", "decode", "prefill", "attention")


def _plan_key(model: LlamaModel, low_dtype: torch.dtype) -> str:
    """What a measured plan depends on: the CPU (its model name and torch's view of its
    capabilities), torch, the threads, the model's shape and the two dtypes."""
    cpu_name = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_name = line.split(":", 1)[1].strip()
                break
    capability = sorted(torch._C._cpu._get_cpu_capability().items())
    config = model.config
    shape = (
        config.hidden_size,
        config.intermediate_size,
        config.num_layers,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.vocab_size,
    )
    parts = (
        cpu_name,
        repr(capability),
        torch.__version__,
        torch.get_num_threads(),
        shape,
        str(model.embed_tokens.weight.dtype),
        str(low_dtype),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _measured_plan(model: LlamaModel, low_dtype: torch.dtype) -> PrecisionPlan:
    start = time.perf_counter()
    dtype = model.embed_tokens.weight.dtype
    model.attach_low_weights(low_dtype)
    products, in_features = model.probe_products()
    timings = measure(products, in_features, dtype, low_dtype)
    plan = choose_plan(dtype, low_dtype, timings, host_kv_dtype(dtype, low_dtype))
    ratios = ", ".join(
        f"{use} {timings.high_s[use] / timings.low_s[use]:.2f}x" for use in timings.high_s
    )
    untimed = set(USES) - set(timings.high_s)
    if untimed:
        ratios += f"; out of time before {', '.join(sorted(untimed))}"
    logger.info(
        "precision by measurement (%s over %s: %s; probe %.2f s): %s",
        dtype_name(low_dtype),
        dtype_name(dtype),
        ratios,
        time.perf_counter() - start,
        plan.describe(),
    )
    return plan


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size


class ModelRunner:
    """Runs the model over the paged cache. Not thread-safe: one engine thread owns it."""

    def __init__(
        self,
        config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        *,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        precision: PrecisionPlan | torch.dtype | None = None,
        num_host_blocks: int = 0,
        plan_cache_dir: Path | None = None,
    ) -> None:
        """``dtype`` is the weights' and activations'. ``precision``: the dtype of each use's
        products and of attention and the KV cache (``engine.precision``): a plan; a low dtype
        to time against ``dtype`` here and plan by (``measure_plan``); or None, everything in
        ``dtype`` (the reference path). ``num_host_blocks``: the host pool swapped-out KV goes to
        (0: none). ``plan_cache_dir``: where plans measured on this host are kept
        (``measure_plan``; None: measure every time)."""
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        with torch.device("meta"):
            model = LlamaModel(config)
        model = model.to_empty(device=self.device)
        model.load_hf_state_dict(state_dict)
        self.model = model.to(dtype=dtype).eval()
        if self.device.type == "cpu":
            self.model.store_weights_column_major()
        if isinstance(precision, torch.dtype) and precision != dtype:
            if self.device.type != "cpu":
                raise ValueError("a precision measured at load is for CPU; pass a plan")
            with torch.inference_mode():
                precision = measure_plan(self.model, precision, cache_dir=plan_cache_dir)
        elif isinstance(precision, torch.dtype):
            precision = None
        self.plan = precision or PrecisionPlan.uniform(dtype)
        self.model.apply_plan(self.plan)
        # Keys and values are read by attention only, which runs in the plan's dtype for it.
        self.kv_dtype = self.plan.attention
        self.model.inv_freq = rope_inv_freq(config).to(self.device)  # angles stay fp32, as in HF
        self.num_swap_copies = 0  # slice copies made by swap_out and swap_in, for tests
        self.allocate_kv_cache(num_blocks, num_host_blocks)

    def allocate_kv_cache(self, num_blocks: int, num_host_blocks: int) -> None:
        """(Re)make the cache and the host pool, empty, in the plan's KV dtype: the loader sizes
        them once the plan (measured at construction) says how many bytes a block takes."""
        config = self.config
        self.num_blocks = num_blocks
        self.kv_cache = torch.zeros(
            2,
            config.num_layers,
            num_blocks,
            self.block_size,
            config.num_kv_heads,
            config.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.host_kv_cache = torch.zeros(
            (2, config.num_layers, num_host_blocks, *self.kv_cache.shape[3:]),
            dtype=self.kv_dtype,
            pin_memory=self.device.type == "cuda" and num_host_blocks > 0,
        )
        # Batch-1 decode on CPU skips the general path's overhead (see engine.single_decode).
        self.single_decoder = (
            SingleDecoder(self.model, self.kv_cache) if self.device.type == "cpu" else None
        )

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.config.max_position_embeddings

    @property
    def precision(self) -> str:
        return f"{dtype_name(self.dtype)} weights; {self.plan.describe()}"

    @property
    def num_host_blocks(self) -> int:
        return self.host_kv_cache.shape[2]

    @torch.inference_mode()
    def swap_out(self, runs: list[BlockRun]) -> None:
        """Device blocks to host blocks: ``(device, host, count)`` runs."""
        self._copy_runs(self.kv_cache, self.host_kv_cache, runs)

    @torch.inference_mode()
    def swap_in(self, runs: list[BlockRun]) -> None:
        """Host blocks to device blocks: ``(host, device, count)`` runs."""
        self._copy_runs(self.host_kv_cache, self.kv_cache, runs)

    @torch.inference_mode()
    def scrub(self, block_ids: list[int]) -> list[int]:
        """Zero those of ``block_ids`` whose KV is not all finite; return them (see
        ``engine.engine.Runner.scrub``). For a failed request's blocks, before they go back."""
        zeroed: list[int] = []
        # A few blocks at a time: a long request's whole KV copied at once could itself fail
        # for want of memory on a device whose cache fills it.
        for start in range(0, len(block_ids), SCRUB_BLOCKS):
            ids = torch.tensor(
                block_ids[start : start + SCRUB_BLOCKS], dtype=torch.int64, device=self.device
            )
            # [2, num_layers, len(ids), block_size, num_kv_heads, head_dim] -> per block
            blocks = self.kv_cache.index_select(2, ids)
            is_finite = torch.isfinite(blocks).transpose(0, 2).flatten(1).all(dim=1)
            bad = ids[~is_finite]
            if len(bad):
                self.kv_cache.index_fill_(2, bad, 0)
                zeroed += [int(b) for b in bad.tolist()]
        return zeroed

    def _copy_runs(self, src: torch.Tensor, dst: torch.Tensor, runs: list[BlockRun]) -> None:
        for src_start, dst_start, count in runs:
            # [2, num_layers, count, block_size, num_kv_heads, head_dim]: one copy per run.
            dst[:, :, dst_start : dst_start + count].copy_(
                src[:, :, src_start : src_start + count], non_blocking=True
            )
        self.num_swap_copies += len(runs)
        if self.device.type == "cuda":
            # The engine frees the source blocks as soon as this returns, and the KV receiver
            # writes into freed device blocks from its own stream: the copies must be done.
            torch.cuda.current_stream(self.device).synchronize()

    def step(self, runs: list[ScheduledRun]) -> list[int | None]:
        """Run the batch and sample: one token per run whose ``samples_next_token`` is true,
        None where its logits are not finite. Computing a run again writes the same KV slots
        with the same values, as the engine's retries after a failed step need."""
        logits = self.execute(runs)
        sampling = [run.seq for run in runs if run.samples_next_token]
        return sample(
            logits,
            [seq.params for seq in sampling],
            [seq.seed for seq in sampling],
            [len(seq.output_token_ids) for seq in sampling],
        )

    @property
    def weights_bytes(self) -> int:
        """Bytes of weights one batch-1 decode step reads: each projection's weight in the
        dtype the plan gives batch 1 (its low copy, or its own), the norms, never the embedding
        table, whose rows are gathered (it is read whole when it doubles as the output
        projection, as that projection)."""
        total = 0
        for module in self.model.modules():
            if isinstance(module, Linear):
                is_low = "single_row" in module.low_uses and module.low_weight is not None
                weight = module.low_weight if is_low else module.weight
                assert weight is not None
                total += module.weight.numel() * weight.element_size()
                if module.bias is not None:
                    total += module.bias.numel() * weight.element_size()
        norms = [p for name, p in self.model.named_parameters() if "norm" in name]
        return total + sum(p.numel() * p.element_size() for p in norms)

    @torch.inference_mode()
    def execute(self, runs: list[ScheduledRun]) -> torch.Tensor:
        """Compute the runs' KV into the cache; returns fp32 logits [num_sampling_runs,
        vocab_size] for the runs whose ``samples_next_token`` is true, in order."""
        if len(runs) == 1 and runs[0].num_tokens == 1 and self.single_decoder is not None:
            return self._execute_single_decode(runs[0])
        batch, input_ids, positions, logits_indices = self._prepare(runs)
        hidden = self.model(input_ids, positions, self.kv_cache, batch)
        return self.model.compute_logits(hidden[logits_indices])

    def _execute_single_decode(self, run: ScheduledRun) -> torch.Tensor:
        assert self.single_decoder is not None
        seq, position = run.seq, run.start
        table = self._block_table(run)
        block_ids = torch.tensor(table, dtype=torch.int64, device=self.device)
        hidden = self.single_decoder(seq.token_ids[position], position, block_ids, position + 1)
        if not run.samples_next_token:  # the last token of a prompt chunk that is not the end
            return hidden.new_empty((0, self.config.vocab_size), dtype=torch.float32)
        return self.model.compute_logits(hidden)

    def _block_table(self, run: ScheduledRun) -> list[int]:
        """The blocks holding tokens [0, run end) of the run's sequence."""
        seq, end = run.seq, run.start + run.num_tokens
        needed_blocks = -(-end // self.block_size)
        if len(seq.block_table) < needed_blocks:
            raise RuntimeError(
                f"request {seq.request_id}: {len(seq.block_table)} blocks reserved, "
                f"{needed_blocks} needed for {end} tokens"
            )
        return seq.block_table[:needed_blocks]

    def _decode_groups(self, tables: list[list[int]], context_lens: list[int]) -> list[DecodeGroup]:
        """The decodes in groups whose longest block table is at most ``DECODE_GROUP_SPREAD``
        times their shortest. One padded call makes every sequence pay for the longest context:
        one 1,600-token request among twenty of 160 made a CPU decode step 20 times slower
        (2.4 s against 118 ms) while the tokens held grew 42%; grouped, a step costs about what
        the batch holds, which is what the gateway predicts TPOT from
        (``engine.engine_thread.DecodeSpeed``)."""
        order = sorted(range(len(tables)), key=lambda i: len(tables[i]))
        spans: list[list[int]] = []
        for index in order:
            if spans and len(tables[index]) <= DECODE_GROUP_SPREAD * len(tables[spans[-1][0]]):
                spans[-1].append(index)
            else:
                spans.append([index])
        device = self.device
        groups = []
        for members in spans:
            max_blocks = max(len(tables[i]) for i in members)
            padded = [tables[i] + [0] * (max_blocks - len(tables[i])) for i in members]
            lens = [context_lens[i] for i in members]
            mask = None
            if len(members) > 1:  # a lone decode is cut to its context instead of masked
                lens_tensor = torch.tensor(lens, dtype=torch.int64, device=device)
                key_positions = torch.arange(max_blocks * self.block_size, device=device)
                mask = (key_positions.unsqueeze(0) < lens_tensor.unsqueeze(1))[:, None, None, :]
            groups.append(
                DecodeGroup(
                    rows=None
                    if len(spans) == 1 and members == list(range(len(tables)))
                    else torch.tensor(members, dtype=torch.int64, device=device),
                    block_tables=torch.tensor(padded, dtype=torch.int64, device=device),
                    mask=mask,
                    max_context_len=max(lens),
                )
            )
        return groups

    def _prepare(
        self, runs: list[ScheduledRun]
    ) -> tuple[AttentionBatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        block_size = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        prefills: list[SequenceSlice] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_context_lens: list[int] = []
        logits_indices: list[int] = []
        for run in runs:
            seq, start, count = run.seq, run.start, run.num_tokens
            end = start + count
            table = self._block_table(run)
            token_start = len(token_ids)
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(
                table[p // block_size] * block_size + p % block_size for p in range(start, end)
            )
            if count == 1:
                decode_rows.append(token_start)
                decode_tables.append(table)
                decode_context_lens.append(end)
            else:
                prefills.append(
                    SequenceSlice(
                        token_start=token_start,
                        num_query_tokens=count,
                        context_len=end,
                        block_table=torch.tensor(table, dtype=torch.int64, device=self.device),
                    )
                )
            if run.samples_next_token:
                logits_indices.append(token_start + count - 1)

        device = self.device
        batch = AttentionBatch(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            prefills=prefills,
            decode_token_indices=None,
            decode_groups=[],
        )
        if decode_rows:
            batch.decode_token_indices = torch.tensor(decode_rows, dtype=torch.int64, device=device)
            batch.decode_groups = self._decode_groups(decode_tables, decode_context_lens)
        return (
            batch,
            torch.tensor(token_ids, dtype=torch.int64, device=device),
            torch.tensor(positions, dtype=torch.int64, device=device),
            torch.tensor(logits_indices, dtype=torch.int64, device=device),
        )
