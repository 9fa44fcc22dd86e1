"""Admission: whether a generation request the gatekeeper let through is served, and as what.

Decide, then do: admission answers with plain values, the model a request's name means
(``ModelName``) and ``Admitted`` (the class, weight and priority the request is served with, its
model's tokenizer and cost factor, its prompt as token ids, its token limit, and the quota it
reserved), and the route acts on them: it queues a ``Generation`` and answers. A refusal is the
``ClientError`` raised, with its status and OpenAI's code. In the order the route takes them,
the cheap refusals first:

    check_servable(tenant, body)  404 model_not_found (naming the models the tenant may use),
                                  403 model_not_allowed, 503 no_worker (none of the model's pool
                                  for a while), in that order (``gateway.model_catalog``)
    slo_class(tenant, header, …)  400 an unknown class, 403 slo_class_not_allowed
    admit(tenant, body, class)    429 queue_full (the tenant's backlog, before any tokenizing);
                                  400 a prompt that does not encode, makes no token or does not
                                  fit the context with max_tokens (a long prompt tokenized off
                                  the loop, ``gateway.prompts``, with the model's tokenizer:
                                  503 when it cannot be loaded, ``gateway.tokenizers``); 429 /
                                  503 quotas, overall, the model's and the API key's
                                  (reserved, ``gateway.quotas``): the only step that holds
                                  anything

Three steps rather than one so that the route can record what each established: the request's
span is named after its model once that is one we serve, and a refusal is counted in the class
it asked for once that is known. ``Admitted.quota`` must be settled exactly once, when the
request ends (``QuotaManager.settle``). Torch-free.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from engine.tokenizer import Tokenizer
from gateway.config import Config
from gateway.dispatch import Dispatcher
from gateway.errors import (
    ClassNotAllowed,
    ClientError,
    ContextLengthExceeded,
    NoWorkerAvailable,
)
from gateway.gatekeeper import class_rank
from gateway.model_catalog import ModelCatalog, ModelName
from gateway.model_costs import CostBook
from gateway.openai_requests import GenerationRequest
from gateway.pools import ModelPool
from gateway.prompts import PromptEncoder, is_long_prompt
from gateway.quotas import Admission, QuotaManager
from gateway.tenants import ApiKey, Tenant
from gateway.tokenizers import TokenizerCache
from gateway.workers import WorkerRegistry
from transfer.messages import TokenizerSpec

__all__ = ["DEMOTED_WEIGHT_FACTOR", "AdmissionControl", "Admitted", "PromptWait"]

DEMOTED_WEIGHT_FACTOR = 0.01
NO_POOL_RETRY_AFTER_S = 5.0  # as the dispatcher's no_worker: about a worker's restart

# How the route awaits a long prompt's tokenizing (its tenant's turn, a thread): until its
# client leaves, say.
PromptWait = Callable[[Awaitable[list[int]]], Awaitable[list[int]]]


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request let in, and what it is served as. Demoted (over a quota under the ``demote``
    policy): the lowest class, and its tenant's weight times ``DEMOTED_WEIGHT_FACTOR``."""

    slo_class: str
    rank: int  # the class's
    model: ModelName  # the name the request used, and the model it means
    cost_factor: float  # what a token of that model costs (``gateway.model_costs``), from now on
    tokenizer: Tokenizer  # the model's: its output as text
    tpot_target_s: float | None  # the class's
    weight: float
    prompt_token_ids: list[int]
    max_tokens: int  # the request's, or what the context leaves after the prompt
    cache_salt: bytes  # the tenant's prefix-cache scope
    quota: Admission  # what it reserved: settle it exactly once, when the request ends
    key_id: str = ""  # the API key it came with: its usage is that key's too

    @property
    def is_demoted(self) -> bool:
        return self.quota.demoted


@dataclass(frozen=True, slots=True)
class AdmissionControl:
    """The admission of generation requests (module docstring), over the parts it reads."""

    config: Config  # the SLO classes
    registry: WorkerRegistry  # the models' pools and their context lengths
    dispatcher: Dispatcher  # whether a model's pool can serve; the tenants' queues
    catalog: ModelCatalog  # what a request's model name means
    tokenizers: TokenizerCache
    costs: CostBook
    prompts: PromptEncoder
    quotas: QuotaManager
    # The tokenizer of a pool whose workers announce none (older workers): the gateway's own
    # model's, the one every model used before pools.
    own_tokenizer: Tokenizer

    def check_servable(self, tenant: Tenant, body: GenerationRequest) -> ModelName:
        """The model ``body`` names, if the tenant may use it and its pool can serve
        (module docstring)."""
        name = self.catalog.resolve(body.model, tenant.allowed_models)
        self.dispatcher.check_can_serve(name.model_id)
        return name

    def slo_class(self, tenant: Tenant, header: str | None, body: GenerationRequest) -> str:
        """The class the request asks for (the header, else the body, else the tenant's
        default), if it is configured and the tenant may use it."""
        name = header or body.slo_class or tenant.default_class
        if self.config.slo_class(name) is None:
            known = [c.name for c in self.config.slo_classes]
            raise ClientError(f"unknown SLO class {name!r}; known: {known}", param="fairgate_class")
        if name not in tenant.allowed_classes:
            raise ClassNotAllowed(
                f"this tenant may not use SLO class {name!r} (allowed: {tenant.allowed_classes})",
                param="fairgate_class",
            )
        return name

    async def admit(
        self,
        tenant: Tenant,
        body: GenerationRequest,
        slo_class: str,
        model: ModelName,
        *,
        wait_long: PromptWait,
        key: ApiKey | None = None,
    ) -> Admitted:
        """The rest of admission (module docstring), the quota reserved last."""
        # Cheap refusals first: a tenant whose queue is full, or standing for this model, is
        # told so before its prompt costs any tokenizing.
        model_id = model.model_id
        rank = class_rank(self.config, slo_class)
        self.dispatcher.check_backlog(tenant.tenant_id, rank, model_id)
        pool = self.registry.pools.get(model_id)
        if pool is None:  # an alias of a model no worker has announced yet
            raise NoWorkerAvailable(
                f"no worker of model {model_id!r} can serve this request now; try again shortly",
                retry_after_s=NO_POOL_RETRY_AFTER_S,
            )
        # The pool's ready workers' least; while none is ready (the dispatcher's grace), what
        # its first worker announced.
        max_model_len = self.registry.max_model_len(model_id) or pool.reference.max_model_len
        tokenizer = await self._tokenizer(pool)
        encoding = self.prompts.encode(tenant.tenant_id, body, max_model_len, tokenizer)
        prompt_token_ids = await (wait_long(encoding) if is_long_prompt(body) else encoding)
        num_prompt_tokens = len(prompt_token_ids)
        if num_prompt_tokens >= max_model_len:
            raise ContextLengthExceeded(
                f"the prompt has {num_prompt_tokens} tokens; this model's context length is "
                f"{max_model_len}",
                param="messages" if body.kind == "chat" else "prompt",
            )
        max_tokens = body.max_tokens or max_model_len - num_prompt_tokens
        if num_prompt_tokens + max_tokens > max_model_len:
            raise ContextLengthExceeded(
                f"this model's context length is {max_model_len} tokens; the prompt has "
                f"{num_prompt_tokens} and max_tokens asks for {max_tokens} more",
                param="max_tokens",
            )
        quota = await self.quotas.admit(
            tenant,
            estimated_tokens=num_prompt_tokens + max_tokens,
            model_id=model_id,
            model_quotas=tenant.model_quotas.get(model_id),
            key_id="" if key is None else key.key_id,
            key_quotas=None if key is None else key.own_quotas(),
            key_label="" if key is None else f"{key.prefix}…",
        )
        weight = tenant.weight
        if quota.demoted:
            slo_class = self.config.lowest_class.name
            weight *= DEMOTED_WEIGHT_FACTOR
        served_in = self.config.slo_class(slo_class) or self.config.lowest_class
        return Admitted(
            slo_class=slo_class,
            rank=class_rank(self.config, slo_class),
            model=model,
            cost_factor=self.costs.factor(model_id),
            tokenizer=tokenizer,
            tpot_target_s=served_in.tpot_target_s,
            weight=weight,
            prompt_token_ids=prompt_token_ids,
            max_tokens=max_tokens,
            cache_salt=_cache_salt(tenant),
            quota=quota,
            key_id="" if key is None else key.key_id,
        )

    async def _tokenizer(self, pool: ModelPool) -> Tokenizer:
        digest = pool.tokenizer_digest
        if not digest:
            return self.own_tokenizer
        loaded = self.tokenizers.loaded(digest)
        if loaded is not None:
            return loaded

        async def fetch() -> TokenizerSpec:
            ready = [
                handle
                for role in ("colocated", "prefill", "decode")
                for handle in self.registry.ready(role, pool.model_id)
                if handle.info is not None and handle.info.tokenizer_digest == digest
            ]
            if not ready:
                raise NoWorkerAvailable(
                    "no worker of the model is ready", retry_after_s=NO_POOL_RETRY_AFTER_S
                )
            # Any of them: after a failure (a worker serving another tokenizer than it
            # announces, say), the next try may reach another.
            worker = random.choice(ready)
            return await worker.client.tokenizer(timeout_s=self.tokenizers.timeout_s)

        return await self.tokenizers.get(digest, fetch, pool.model_id)


def _cache_salt(tenant: Tenant) -> bytes:
    """Scopes the workers' prefix cache to the tenant (chosen here, never by a client)."""
    return hashlib.sha256(b"fairgate-prefix-cache\0" + tenant.tenant_id.encode()).digest()[:16]
