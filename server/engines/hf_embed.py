"""`HFEmbedder`: the embedding engine on transformers, behind the `Embedder` protocol.

It does what sentence-transformers does for a Transformer -> Pooling -> Normalize model, reading
the model's config itself (modules.json, the Pooling folder's config.json, sentence_bert_config.json)
so the server does not depend on sentence-transformers. A folder without modules.json is a plain
transformers model: it gets mean pooling and L2 normalization, vLLM's default for embedding models.

Concurrent `embed` calls are batched: each call adds its inputs to a waiting list, and one worker
task on the serving loop takes everything waiting as a round, shortest inputs first, and runs it
in forwards of at most `info.max_num_seqs` inputs (in a worker thread), padding on the right.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.config import Settings
from server.engines.base import EngineInfo
from server.errors import EngineError, ServiceUnavailable
from server.tokenizer import Tokenizer

log = logging.getLogger(__name__)

MiB = 1 << 20
DEFAULT_MAX_NUM_SEQS = 32
# sentence-transformers' legacy Pooling keys, in the order it concatenates their vectors
POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
POOLING_MODES = frozenset(POOLING_KEYS.values())


@dataclass(frozen=True)
class Recipe:
    """What sentence-transformers would do with the model's output, from its config files."""

    folder: Path  # the Transformer module's folder
    modes: tuple[str, ...]  # pooling modes, their vectors concatenated in this order
    normalize: bool
    max_seq_length: int | None


def read_recipe(path: Path) -> Recipe:
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return Recipe(path, ("mean",), True, None)  # a plain transformers model: vLLM's default
    folder, modes, normalize = path, None, False
    for module in json.loads(modules_file.read_text()):
        kind = str(module["type"]).rsplit(".", 1)[-1]
        where = path / module.get("path", "")
        if kind == "Transformer":
            folder = where
        elif kind == "Pooling":
            modes = _pooling_modes(json.loads((where / "config.json").read_text()))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"the transformers embedding engine cannot apply the {module['type']} module "
                             "of this model (it applies Transformer, Pooling and Normalize); use --engine vllm")
    if modes is None:
        raise ValueError("this model's modules.json has no Pooling module: it makes no sentence vector")
    st_file = folder / "sentence_bert_config.json"
    length = json.loads(st_file.read_text()).get("max_seq_length") if st_file.exists() else None
    return Recipe(folder, modes, normalize, int(length) if length else None)


def _pooling_modes(config: dict[str, Any]) -> tuple[str, ...]:
    named = config.get("pooling_mode")  # sentence-transformers >= 6 writes one name or a list
    if named is not None:
        modes = (named,) if isinstance(named, str) else tuple(named)
    else:
        modes = tuple(mode for key, mode in POOLING_KEYS.items() if config.get(key)) or ("mean",)
    unknown = [m for m in modes if m not in POOLING_MODES]
    if unknown:
        raise ValueError(f"pooling mode(s) {unknown} are not supported (supported: {', '.join(sorted(POOLING_MODES))})")
    return modes


def pool(hidden: torch.Tensor, mask: torch.Tensor, modes: tuple[str, ...]) -> torch.Tensor:
    """Sentence vectors from right-padded token vectors [B, T, H]; pad positions never count."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    counts = m.sum(1).clamp(min=1e-9)
    out: list[torch.Tensor] = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[:, 0])
        elif mode == "max":
            out.append(hidden.masked_fill(m == 0, float("-inf")).max(1).values)
        elif mode == "mean":
            out.append((hidden * m).sum(1) / counts)
        elif mode == "mean_sqrt_len_tokens":
            out.append((hidden * m).sum(1) / counts.sqrt())
        elif mode == "weightedmean":
            w = m * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
            out.append((hidden * w).sum(1) / w.sum(1).clamp(min=1e-9))
        else:  # lasttoken
            last = mask.sum(1).long() - 1
            out.append(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])
    return torch.cat(out, dim=-1)


@dataclass
class _Call:
    future: asyncio.Future[list[list[float]]]
    vectors: list[list[float]]  # filled in as its inputs' batches finish
    left: int


@dataclass(frozen=True)
class _Input:
    call: _Call
    index: int
    ids: list[int]


class HFEmbedder:
    def __init__(self, model: Any, recipe: Recipe, info: EngineInfo, dimensions: int, pad_id: int) -> None:
        self.model = model
        self.recipe = recipe
        self.info = info
        self.dimensions = dimensions
        self.pad_id = pad_id
        self.device: torch.device = next(model.parameters()).device
        self.vocab = int(model.get_input_embeddings().num_embeddings)
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters
        self.batches_run = 0  # forwards run (tests use it to prove batching)
        self._waiting: list[_Input] = []
        self._round: list[_Input] = []  # this round's inputs not yet in a forward
        self._batch: list[_Input] = []  # the inputs of the forward running now
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def footprint(weights: int, settings: Settings, device: str, total: int) -> int:
        """Weights, plus activations of a full batch (attention scores grow with the batch, not the
        weights: at least 256 MiB), plus 128 MiB of allocator slack."""
        return weights + max(weights // 2, 256 * MiB) + 128 * MiB

    @classmethod
    def start(cls, model_path: Path, settings: Settings, tokenizer: Tokenizer) -> HFEmbedder:
        """Load the model (blocking); the worker starts in `attach_to_loop`."""
        from transformers import AutoConfig, AutoModel

        recipe = read_recipe(model_path)
        config = AutoConfig.from_pretrained(str(recipe.folder), trust_remote_code=settings.trust_remote_code)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        configured = getattr(config, "dtype", None)
        dtype = getattr(torch, settings.dtype) if settings.dtype != "auto" else (
            configured if device == "cuda" and configured in (torch.bfloat16, torch.float16) else torch.float32)
        model = AutoModel.from_pretrained(str(recipe.folder), dtype=dtype, trust_remote_code=settings.trust_remote_code)
        model = model.to(device).eval()
        limit = recipe.max_seq_length or int(getattr(config, "max_position_embeddings", 0) or 512)
        max_model_len = settings.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(f"--max-model-len {max_model_len} is longer than this embedding model's {limit} tokens")
        pad = getattr(config, "pad_token_id", None)
        pad = pad if pad is not None else tokenizer.hf.pad_token_id
        info = EngineInfo(name="transformers", max_model_len=max_model_len,
                          max_num_seqs=settings.max_num_seqs or DEFAULT_MAX_NUM_SEQS)
        log.info("transformers embedder: %s %s on %s, pooling %s%s, up to %d tokens, %d inputs a batch",
                 type(model).__name__, str(dtype).removeprefix("torch."), device, "+".join(recipe.modes),
                 " + normalize" if recipe.normalize else "", max_model_len, info.max_num_seqs)
        return cls(model, recipe, info, int(config.hidden_size) * len(recipe.modes), int(pad or 0))

    def attach_to_loop(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._work(), name="embedder")
        self._task.add_done_callback(self._stopped)

    async def embed(self, inputs: list[list[int]], request_id: str) -> list[list[float]]:
        if self._task is None or self._task.done():
            raise ServiceUnavailable("The embedding engine is not running.")
        for n, ids in enumerate(inputs):
            if not 0 < len(ids) <= self.info.max_model_len:
                raise ValueError(f"input {n} has {len(ids)} tokens; this model embeds 1 to {self.info.max_model_len}")
            if min(ids) < 0 or max(ids) >= self.vocab:
                raise ValueError(f"input {n} has token ids outside the vocabulary of {self.vocab}")
        if not inputs:
            return []
        call = _Call(asyncio.get_running_loop().create_future(), [[] for _ in inputs], len(inputs))
        self._waiting.extend(_Input(call, i, ids) for i, ids in enumerate(inputs))
        self._wake.set()
        return await call.future  # cancelling the caller cancels the future: its inputs are dropped

    async def _work(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            # a round: everything waiting now, shortest first, so each forward pads little
            self._round, self._waiting = sorted(self._waiting, key=lambda i: len(i.ids)), []
            while self._round:
                live = [i for i in self._round if not i.call.future.done()]  # drop cancelled callers
                size = self.info.max_num_seqs
                self._batch, self._round = live[:size], live[size:]
                if self._batch:
                    await self._run(self._batch)
                self._batch = []

    async def _run(self, batch: list[_Input]) -> None:
        try:
            vectors = await asyncio.to_thread(self._forward, [i.ids for i in batch])
        except Exception as e:  # fails this batch's callers only; the worker goes on
            log.exception("embedding batch of %d inputs failed", len(batch))
            for item in batch:
                if not item.call.future.done():
                    item.call.future.set_exception(e)
            return
        finally:
            self.batches_run += 1
        for item, vector in zip(batch, vectors, strict=True):
            call = item.call
            if call.future.done():
                continue
            call.vectors[item.index] = vector
            call.left -= 1
            if call.left == 0:
                call.future.set_result(call.vectors)

    def _forward(self, batch: list[list[int]]) -> list[list[float]]:
        """Pad on the right, run the model, pool, normalize (in a worker thread)."""
        width = max(len(ids) for ids in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, tokens in enumerate(batch):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        kwargs = {"token_type_ids": torch.zeros_like(ids)} if self.token_types else {}
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask, **kwargs).last_hidden_state.float()
            pooled = pool(hidden, mask, self.recipe.modes)
            if self.recipe.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        out: list[list[float]] = pooled.cpu().tolist()
        return out

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The worker ended (shutdown, or a bug): nobody will answer the callers still waiting."""
        error = ServiceUnavailable("The embedding engine has stopped.")
        for item in (*self._waiting, *self._round, *self._batch):
            if not item.call.future.done():
                item.call.future.set_exception(error)
        self._waiting, self._round, self._batch = [], [], []

    async def check_health(self) -> None:
        task = self._task
        if task is not None and task.done():
            why = "it was shut down" if task.cancelled() else repr(task.exception())
            raise EngineError(f"the transformers embedding worker stopped: {why}")

    async def num_active_requests(self) -> int:
        return len(self._batch) + sum(not i.call.future.done() for i in (*self._waiting, *self._round))

    async def shutdown(self) -> None:
        """Stop the worker (waiting callers get ServiceUnavailable) and free the model; a forward
        already running in its thread finishes there, holding its own reference."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
