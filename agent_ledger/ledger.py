"""``EffectLedger``: the status flow, waiting, fencing and handler execution, on any store.

The ledger holds the rules; the store holds the rows (``stores.base``). A call's life:
``begin`` asks the store to insert-or-count the key; the one caller that inserted (or later
claims a ready or stale effect) runs the handler and commits with its fence; everybody else
waits, woken by the store or by backoff, until the effect is terminal.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime, timezone
from typing import Any, ParamSpec, TypeVar

from asgiref.sync import async_to_sync, sync_to_async

from . import keys, tracing
from .errors import (
    ApprovalPendingError,
    EffectDeniedError,
    EffectFailedError,
    EffectLedgerError,
    EffectLedgerValidationError,
    EffectStoreError,
    EffectTimeoutError,
    SyncCallInEventLoopError,
)
from .hooks import LedgerHooks, call_hook
from .operator import require_outcome, require_reason
from .redaction import Redactor
from .requester import current_requester
from .stores.base import EffectStore, NewEffect
from .types import (
    DEFAULT_MAX_ARGS_SIZE_BYTES,
    MAX_NAME_LENGTH,
    SYSTEM,
    Actor,
    BeginResult,
    CommitFailed,
    CommitOutcome,
    CommitSucceeded,
    ConcurrencyOptions,
    Effect,
    EffectError,
    EffectStatus,
    Handler,
    RunOptions,
    StaleOptions,
    ToolCall,
    Transition,
    fields_set,
    require_instance,
    require_number,
    strict,
)

_P = ParamSpec("_P")
_T = TypeVar("_T")

PROCESSING = EffectStatus.PROCESSING
REQUIRES_APPROVAL = EffectStatus.REQUIRES_APPROVAL

#: How many handed-out fences a ledger remembers for ``commit(effect_id, ...)`` without ``fence=``.
_FENCE_MEMORY = 10_000
MAX_REASON_LENGTH = 2_000


@strict
@dataclasses.dataclass(frozen=True)
class EffectLedgerOptions:
    store: EffectStore
    max_args_size_bytes: int = DEFAULT_MAX_ARGS_SIZE_BYTES
    #: Defaults for every ``run``; the fields a call's own ``RunOptions`` set win, field by
    #: field (also inside ``concurrency`` and ``stale``).
    defaults: RunOptions | None = None
    #: Callbacks for approval requests, decisions and finished calls, on any store.
    hooks: LedgerHooks | None = None
    #: ``policy(call) -> bool``: whether a call needs approval when its own ``RunOptions`` do
    #: not say. Wins over ``defaults.requires_approval``; a call's explicit value wins over it.
    approval_policy: Callable[[ToolCall], bool | None] | None = None
    #: ``expires_after(call) -> seconds | None``: how long a new pending approval of the call
    #: may wait before it is denied as ``expired`` (on stores that keep ``expires_at``).
    expires_after: Callable[[ToolCall], float | None] | None = None
    #: What to redact before storage (``agent_ledger.redaction``); None: the store's default
    #: (``DjangoStore``: ``AGENT_LEDGER["REDACT"]``), else nothing.
    redact: Redactor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store, EffectStore):
            raise EffectLedgerValidationError(
                f"must implement the EffectStore protocol, got {type(self.store).__name__}",
                field="store",
            )
        if isinstance(self.max_args_size_bytes, bool) or not isinstance(
            self.max_args_size_bytes, int
        ):
            raise EffectLedgerValidationError("must be an int", field="max_args_size_bytes")
        require_number(self.max_args_size_bytes, "max_args_size_bytes", minimum=1)
        require_instance(self.defaults, RunOptions, "defaults")
        require_instance(self.hooks, LedgerHooks, "hooks")
        if self.approval_policy is not None and not callable(self.approval_policy):
            raise EffectLedgerValidationError("must be callable", field="approval_policy")
        if self.expires_after is not None and not callable(self.expires_after):
            raise EffectLedgerValidationError("must be callable", field="expires_after")
        require_instance(self.redact, Redactor, "redact")


class EffectLedger:
    def __init__(self, options: EffectLedgerOptions) -> None:
        if not isinstance(options, EffectLedgerOptions):
            raise EffectLedgerValidationError(
                f"must be EffectLedgerOptions, got {type(options).__name__}", field="options"
            )
        self.store = options.store
        self._options = options
        self._hooks = options.hooks or LedgerHooks()
        # A run without options (the common case) shares these instead of rebuilding and
        # re-validating three option objects on every call.
        self._defaults = _resolve(options.defaults or RunOptions(), RunOptions())
        # Fences this ledger handed out, so the spec's ``commit(effect_id, outcome)`` is fenced
        # too: an owner that stalled past a takeover is refused without passing anything extra.
        self._fences: OrderedDict[str, int] = OrderedDict()

    # -- keys ----------------------------------------------------------------------------------

    def idem_key(self, call: ToolCall) -> str:
        return self._prepare(call).idem_key

    def requires_approval(self, call: ToolCall, run_options: RunOptions | None = None) -> bool:
        """Whether ``run(call, ..., run_options)`` would wait for a human: the call's own say,
        else the ledger's policy, else its defaults. For adapters that must ask before they
        run (to turn a pending approval into their framework's own interrupt)."""
        return self._requires_approval(call, self._run_options(run_options))

    # -- the spec's API ------------------------------------------------------------------------

    async def run(
        self, call: ToolCall, handler: Handler, run_options: RunOptions | None = None
    ) -> Any:
        """Run ``handler`` at most once per idempotency key and return its (stored) result."""
        if not callable(handler):
            raise EffectLedgerValidationError("must be callable", field="handler")
        options = self._run_options(run_options)
        gated = self._requires_approval(call, options)
        new, raw_args = self._prepare_call(call, REQUIRES_APPROVAL if gated else PROCESSING)
        with tracing.span("agent_ledger.run", tool=call.tool, workflow=call.workflow_id) as span:
            since = time.monotonic()
            record = await self.store.begin(new)
            effect = record.effect
            tracing.annotate(span, idem_key=effect.idem_key, replay=not record.created)
            if record.created and effect.status is PROCESSING:
                result = await self._execute(effect, handler, options, raw_args=raw_args)
            else:
                if record.created:
                    await call_hook(self._hooks.approval_requested, effect)
                result = await self._settle(effect, handler, options, since, raw_args=raw_args)
        codec = options.codec
        return codec.decode(result) if codec is not None else result

    async def propose(
        self, call: ToolCall, *, requires_approval: bool = True, continuation: Any = None
    ) -> Effect:
        """Create (or find) the effect of ``call`` without running anything or waiting.

        With approval it waits for a human; without, it is ``ready`` and the next ``run`` of the
        call claims it. Either way the real handler runs later, in ``run``, so an approval that
        lands between proposing and running can only start the real tool. ``continuation``
        (``{"resumer": name, ...}``) names what resumes the agent when a human decides.
        """
        if not isinstance(requires_approval, bool):
            raise EffectLedgerValidationError("must be a bool", field="requires_approval")
        status = REQUIRES_APPROVAL if requires_approval else EffectStatus.READY
        record = await self.store.begin(self._prepare(call, status, continuation))
        if record.created and requires_approval:
            await call_hook(self._hooks.approval_requested, record.effect)
        return record.effect

    async def begin(self, call: ToolCall) -> BeginResult:
        """Start an effect by hand; ``claimed`` says whether you must now run the tool and commit.

        A ready (approved) effect is claimed here, so the manual flow can run approved calls too.
        """
        record = await self.store.begin(self._prepare(call, EffectStatus.PROCESSING))
        effect = record.effect
        if record.created:
            self._remember(effect)
            return BeginResult(effect, cached=False, idempotency_status="fresh", claimed=True)
        if effect.status is EffectStatus.READY:
            claimed = await self.store.claim(effect.id, stale_after_ms=0, actor=SYSTEM)
            if claimed is not None:
                self._remember(claimed)
                return BeginResult(
                    claimed, cached=False, idempotency_status="replayed", claimed=True
                )
            effect = await self.store.get(effect.id) or effect
        return BeginResult(
            effect,
            cached=effect.is_terminal,
            cached_result=effect.result if effect.status is EffectStatus.SUCCEEDED else None,
            idempotency_status="replayed",
        )

    async def commit(
        self,
        effect_id: str,
        outcome: CommitOutcome,
        *,
        fence: int | None = None,
        actor: Actor | str | None = None,
    ) -> bool:
        """Finish a processing effect; False (and nothing changed) when it is not yours to finish.

        Without ``fence`` the fence this ledger handed out for the effect is used, so an owner
        that lost its effect to a stale takeover cannot overwrite the new owner's outcome.
        """
        _require_id(effect_id, "effect_id")
        if not isinstance(outcome, (CommitSucceeded, CommitFailed)):
            raise EffectLedgerValidationError(
                f"must be CommitSucceeded or CommitFailed, got {type(outcome).__name__}",
                field="outcome",
            )
        if fence is not None and (isinstance(fence, bool) or not isinstance(fence, int)):
            raise EffectLedgerValidationError("must be an int", field="fence")
        if fence is None:
            fence = self._fences.get(effect_id)
        who = Actor.coerce(actor)
        outcome = await self._redact_committed(effect_id, outcome)
        if isinstance(outcome, CommitSucceeded):
            try:
                outcome = CommitSucceeded(result=_json_copy(outcome.result, "result"))
            except EffectLedgerValidationError as exc:
                # Never leave the effect stuck in processing because of a bad result.
                await self.store.commit(
                    effect_id, CommitFailed(_not_json_error(exc)), fence=fence, actor=who
                )
                self._fences.pop(effect_id, None)
                raise
        committed = await self.store.commit(effect_id, outcome, fence=fence, actor=who)
        if committed is not None:
            self._fences.pop(effect_id, None)
        return committed is not None

    async def get_effect(self, effect_id: str) -> Effect | None:
        _require_id(effect_id, "effect_id")
        return await self.store.get(effect_id)

    async def find_by_idem_key(self, idem_key: str) -> Effect | None:
        _require_id(idem_key, "idem_key")
        return await self.store.get_by_idem_key(idem_key)

    async def history(self, effect_id: str) -> list[Transition]:
        _require_id(effect_id, "effect_id")
        return await self.store.history(effect_id)

    async def request_approval(
        self, idem_key: str, *, actor: Actor | str | None = None, reason: str | None = None
    ) -> bool:
        """``processing -> requires_approval``: park a begun effect until a human decides."""
        return await self._decide("request_approval", idem_key, actor, reason)

    async def approve(
        self, idem_key: str, *, actor: Actor | str | None = None, reason: str | None = None
    ) -> bool:
        """``requires_approval -> ready``; the waiting (or next) run of that key runs the tool."""
        return await self._decide("approve", idem_key, actor, reason)

    async def deny(
        self, idem_key: str, reason: str | None = None, *, actor: Actor | str | None = None
    ) -> bool:
        """``requires_approval -> denied``; every run of that key raises ``EffectDeniedError``."""
        return await self._decide("deny", idem_key, actor, reason)

    async def cancel(
        self, idem_key: str, reason: str | None = None, *, actor: Actor | str | None = None
    ) -> bool:
        """Stop an effect that has not finished; a handler still running cannot commit after it."""
        return await self._decide("cancel", idem_key, actor, reason)

    async def retry(self, idem_key: str, *, actor: Actor | str, reason: str) -> bool:
        """An operator reopens a failed effect (``failed -> ready``, see ``agent_ledger.operator``):
        the next run of the key runs the handler again. False when it was not failed."""
        _require_id(idem_key, "idem_key")
        reason = require_reason(reason)
        record = await self._operator_store().reopen(
            idem_key, actor=Actor.coerce(actor), reason=reason
        )
        return bool(record.changed)

    async def resolve(
        self, idem_key: str, outcome: CommitOutcome, *, actor: Actor | str, reason: str
    ) -> bool:
        """An operator records the outcome of a processing effect whose owner is gone
        (``processing -> succeeded|failed``); waiting callers receive it. False when it was
        not processing."""
        _require_id(idem_key, "idem_key")
        reason = require_reason(reason)
        outcome = require_outcome(outcome)
        if isinstance(outcome, CommitSucceeded):
            outcome = CommitSucceeded(result=_json_copy(outcome.result, "result"))
        store = self._operator_store()
        effect = await self.store.get_by_idem_key(idem_key)
        if effect is not None:
            outcome = self._redact_outcome(effect, outcome)
        record = await store.resolve(idem_key, outcome, actor=Actor.coerce(actor), reason=reason)
        return bool(record.changed)

    def _operator_store(self) -> Any:
        if not (hasattr(self.store, "reopen") and hasattr(self.store, "resolve")):
            raise EffectLedgerError(
                f"{type(self.store).__name__} has no operator actions; retry and resolve "
                "through Django (agent_ledger.services), which shares its tables"
            )
        return self.store

    async def _decide(
        self, name: str, idem_key: str, actor: Actor | str | None, reason: str | None
    ) -> bool:
        request = decision_request(name, idem_key, actor=actor, reason=reason)
        record = await self.store.transition(idem_key, **request)
        if record.changed:
            if name == "request_approval":
                await call_hook(self._hooks.approval_requested, record.effect)
            else:
                await call_hook(self._hooks.decided, record.effect, name, request["actor"])
        return record.changed

    # -- the same, for sync code (WSGI views, Celery tasks, management commands) -----------

    def run_sync(
        self, call: ToolCall, handler: Handler, run_options: RunOptions | None = None
    ) -> Any:
        """``run`` for sync code. A sync handler runs in the caller's thread, so its
        thread-locals (a Celery task's ``self.request``), its database connection and the
        caller's ``atomic()`` block are the caller's; the ledger's own waiting and storing
        happen meanwhile on an event loop of asgiref's (what Django's ``async_to_sync`` uses)."""
        if not callable(handler):
            raise EffectLedgerValidationError("must be callable", field="handler")
        check = getattr(self.store, "check_sync_caller", None)
        if check is not None:
            check()  # a store may know the caller's thread cannot work with it (SQLite)
        if not inspect.iscoroutinefunction(handler):
            handler = sync_to_async(handler, thread_sensitive=True)
        return _blocking("run_sync", self.run, call, handler, run_options)

    def propose_sync(
        self, call: ToolCall, *, requires_approval: bool = True, continuation: Any = None
    ) -> Effect:
        return _blocking(
            "propose_sync",
            self.propose,
            call,
            requires_approval=requires_approval,
            continuation=continuation,
        )

    def begin_sync(self, call: ToolCall) -> BeginResult:
        return _blocking("begin_sync", self.begin, call)

    def commit_sync(
        self,
        effect_id: str,
        outcome: CommitOutcome,
        *,
        fence: int | None = None,
        actor: Actor | str | None = None,
    ) -> bool:
        return _blocking("commit_sync", self.commit, effect_id, outcome, fence=fence, actor=actor)

    def get_effect_sync(self, effect_id: str) -> Effect | None:
        return _blocking("get_effect_sync", self.get_effect, effect_id)

    def find_by_idem_key_sync(self, idem_key: str) -> Effect | None:
        return _blocking("find_by_idem_key_sync", self.find_by_idem_key, idem_key)

    def history_sync(self, effect_id: str) -> list[Transition]:
        return _blocking("history_sync", self.history, effect_id)

    def request_approval_sync(
        self, idem_key: str, *, actor: Actor | str | None = None, reason: str | None = None
    ) -> bool:
        return _blocking(
            "request_approval_sync", self.request_approval, idem_key, actor=actor, reason=reason
        )

    def approve_sync(
        self, idem_key: str, *, actor: Actor | str | None = None, reason: str | None = None
    ) -> bool:
        return _blocking("approve_sync", self.approve, idem_key, actor=actor, reason=reason)

    def deny_sync(
        self, idem_key: str, reason: str | None = None, *, actor: Actor | str | None = None
    ) -> bool:
        return _blocking("deny_sync", self.deny, idem_key, reason, actor=actor)

    def cancel_sync(
        self, idem_key: str, reason: str | None = None, *, actor: Actor | str | None = None
    ) -> bool:
        return _blocking("cancel_sync", self.cancel, idem_key, reason, actor=actor)

    # -- internals -----------------------------------------------------------------------------

    def _prepare(
        self,
        call: ToolCall,
        status: EffectStatus = EffectStatus.PROCESSING,
        continuation: Any = None,
    ) -> NewEffect:
        return self._prepare_call(call, status, continuation)[0]

    def _prepare_call(
        self,
        call: ToolCall,
        status: EffectStatus = EffectStatus.PROCESSING,
        continuation: Any = None,
    ) -> tuple[NewEffect, str | None]:
        """The effect to insert (its arguments redacted) and, when redaction changed them,
        the raw arguments' canonical JSON, which only the handler sees."""
        if not isinstance(call, ToolCall):
            raise EffectLedgerValidationError(
                f"must be a ToolCall, got {type(call).__name__}", field="call"
            )
        args_canonical = keys.canonical_json(call.args, "args")
        size = len(args_canonical.encode())
        limit = self._options.max_args_size_bytes
        if size > limit:
            raise EffectLedgerValidationError(
                f"canonical JSON is {size} bytes, over max_args_size_bytes ({limit})", field="args"
            )
        resource = keys.resource_canonical(call.resource) if call.resource is not None else None
        if continuation is not None:
            continuation = self._continuation(continuation)
        expires_after_s = None
        if status is REQUIRES_APPROVAL and self._options.expires_after is not None:
            expires_after_s = self._options.expires_after(call)
        # The key comes from the raw arguments, so replays dedupe whatever is redacted.
        idem_key = keys.idem_key(call, args_canonical)
        stored, raw = args_canonical, None
        redactor = self._redactor()
        if redactor:
            stored = redactor.args_canonical(call.tool, call.args)
            raw = args_canonical if stored != args_canonical else None
        new = NewEffect(
            id=str(uuid.uuid4()),
            idem_key=idem_key,
            workflow_id=call.workflow_id,
            call_id=call.call_id or str(uuid.uuid4()),
            tool=call.tool,
            status=status,
            args_canonical=stored,
            resource_id_canonical=resource,
            # The first history row's actor is the effect's requester (four eyes).
            actor=current_requester() or SYSTEM,
            continuation=continuation,
            expires_after_s=expires_after_s,
        )
        return new, raw

    def _continuation(self, value: Any) -> Any:
        if not isinstance(value, Mapping) or not isinstance(value.get("resumer"), str):
            raise EffectLedgerValidationError(
                'must be a dict with a "resumer" name', field="continuation"
            )
        if not value["resumer"].strip():
            raise EffectLedgerValidationError("must name a resumer", field="continuation.resumer")
        if len(value["resumer"]) > MAX_NAME_LENGTH:
            # The resumption row's column: a decision must never fail on a name it cannot store.
            raise EffectLedgerValidationError(
                f"must be at most {MAX_NAME_LENGTH} characters", field="continuation.resumer"
            )
        copy = _json_copy(value, "continuation")
        size = len(keys.canonical_json(copy, "continuation").encode())
        if size > self._options.max_args_size_bytes:
            raise EffectLedgerValidationError(
                f"is {size} bytes, over max_args_size_bytes", field="continuation"
            )
        return copy

    def _requires_approval(self, call: ToolCall, options: _Resolved) -> bool:
        """The call's own say, else the ledger's policy (None: no say), else its defaults."""
        policy = self._options.approval_policy
        if options.explicit_approval or policy is None:
            return options.requires_approval
        decided = policy(call)
        if decided is None:
            return options.requires_approval
        if not isinstance(decided, bool):
            raise EffectLedgerValidationError(
                f"must return a bool, returned {type(decided).__name__}", field="approval_policy"
            )
        return decided

    def _run_options(self, given: RunOptions | None) -> _Resolved:
        if given is not None and not isinstance(given, RunOptions):
            raise EffectLedgerValidationError(
                f"must be RunOptions, got {type(given).__name__}", field="run_options"
            )
        if given is None:
            return self._defaults
        return _resolve(self._options.defaults or RunOptions(), given)

    def _remember(self, effect: Effect) -> None:
        self._fences[effect.id] = effect.fence
        while len(self._fences) > _FENCE_MEMORY:
            self._fences.popitem(last=False)

    async def _execute(
        self, effect: Effect, handler: Handler, options: _Resolved, *, raw_args: str | None = None
    ) -> Any:
        """Run the handler as the effect's owner (``effect.fence``) and commit the outcome.

        If the commit is refused (the effect was taken over or canceled while the handler ran),
        every caller of the key must see the one recorded outcome, so we report that instead of
        our own, whether our handler returned or raised. ``raw_args``: the arguments before
        redaction, which the handler is given (the store holds the redacted ones).
        """
        if raw_args is not None:
            effect = dataclasses.replace(effect, args_canonical=raw_args)
        try:
            value = await _call(handler, effect)
        except BaseException as exc:
            if isinstance(exc, options.passthrough):
                # Raised on purpose before the tool acted: hand the effect straight back.
                await self._release(effect, options, f"passed through: {type(exc).__name__}")
                raise
            if isinstance(exc, options.retry_on):
                error = _error_of(exc)
                await self._release(effect, options, f"retryable: {error.message}", error)
                raise
            if not isinstance(exc, Exception):
                # Cancelled, interrupted, exiting: the tool may have acted, so the effect stays
                # held for a fenced takeover after the stale window, never released at once.
                raise
            if await self._commit_owned(effect, CommitFailed(_error_of(exc)), options) is None:
                return await self._follow(effect, options)
            raise
        try:
            if options.codec is not None:
                value = options.codec.encode(value)
            result = _json_copy(value, "result")
        except Exception as exc:
            error = _not_json_error(exc)
            if await self._commit_owned(effect, CommitFailed(error), options) is None:
                return await self._follow(effect, options)
            raise EffectFailedError(effect.idem_key, error) from exc
        committed = await self._commit_owned(effect, CommitSucceeded(result), options)
        if committed is None:
            return await self._follow(effect, options)
        if committed.status is EffectStatus.FAILED and committed.error is not None:
            raise EffectFailedError(effect.idem_key, committed.error)  # redaction failed
        return committed.result

    async def _release(
        self, effect: Effect, options: _Resolved, reason: str, error: EffectError | None = None
    ) -> None:
        """Hand the effect back as ``ready`` (the attempt stays in its history)."""
        redactor = self._redactor()
        if redactor is not None:
            # The reason and error quote the exception: cut out the redacted arguments.
            secrets = redactor.redact(effect.args, tool=effect.tool, part="args")[1]
            reason = redactor.error(EffectError(reason), secrets).message
            error = None if error is None else redactor.error(error, secrets)
        reason = reason[:MAX_REASON_LENGTH]
        await self._owner_writes(
            lambda: self.store.release(
                effect.id, fence=effect.fence, actor=SYSTEM, reason=reason, error=error
            ),
            options,
        )

    async def _commit_owned(
        self, effect: Effect, outcome: CommitOutcome, options: _Resolved
    ) -> Effect | None:
        outcome = self._redact_outcome(effect, outcome)
        committed = await self._owner_writes(
            lambda: self.store.commit(effect.id, outcome, fence=effect.fence, actor=SYSTEM),
            options,
        )
        if committed is not None:
            await call_hook(self._hooks.finished, committed)
        return committed

    async def _owner_writes(
        self, write: Callable[[], Awaitable[Effect | None]], options: _Resolved
    ) -> Effect | None:
        """The owner's fenced commit or release, retried while the store fails transiently.

        The tool has acted: giving up on one failed commit would leave the effect processing
        until a stale takeover runs the tool again. A retry is always safe, since the fence
        refuses it if someone took over (and a commit that did land but whose answer was lost
        is refused as no longer processing; the caller then reads the recorded outcome). We
        retry for the stale window (the wait timeout when takeover is off), then give up.
        """
        window_ms = options.stale.after_ms or options.concurrency.wait_timeout_ms
        deadline = time.monotonic() + window_ms / 1000
        backoff = _Backoff(options.concurrency)
        while True:
            try:
                return await write()
            except EffectStoreError:
                if not await backoff.sleep(deadline):
                    raise

    async def _follow(self, effect: Effect, options: _Resolved) -> Any:
        """We lost the effect (stale takeover or cancel) while the handler ran: report the
        outcome the ledger holds, so every caller of the key sees the same answer."""
        return await self._settle(effect, None, options, since=float("-inf"), reread=True)

    async def _settle(
        self,
        effect: Effect,
        handler: Handler | None,
        options: _Resolved,
        since: float,
        *,
        reread: bool = False,
        raw_args: str | None = None,
    ) -> Any:
        """Wait (woken by the store, or with backoff and jitter) until the effect is terminal,
        claiming it if it becomes ready or stale, then return or raise its outcome.

        A failing store (a restart, a failover) does not end the wait: reads and claims are
        retried with the caller's backoff until its deadline, since the outcome it waits for
        may well be committed meanwhile. Only then is the last store error raised.
        """
        concurrency = options.concurrency
        deadline = time.monotonic() + concurrency.wait_timeout_ms / 1000
        backoff = _Backoff(concurrency)
        failure: EffectStoreError | None = None
        while True:
            if reread:
                try:
                    since = time.monotonic()
                    current = await self.store.get(effect.id)
                except EffectStoreError as exc:
                    failure = exc
                    if not await backoff.sleep(deadline):
                        raise
                    continue
                if current is None:
                    raise EffectLedgerError(f"effect {effect.id} disappeared while waiting")
                effect, failure, reread = current, None, False
            status = effect.status
            if status is EffectStatus.SUCCEEDED:
                return effect.result
            if status is EffectStatus.FAILED:
                raise EffectFailedError(
                    effect.idem_key, effect.error or EffectError("failed", code=None)
                )
            if (
                status is EffectStatus.CANCELED
                and effect.error
                and effect.error.code == "superseded"
            ):
                # An approver edited the arguments: the edited call's outcome is this call's.
                target = effect.superseded_by
                if target is None:  # a single-statement read (PostgreSQL's) leaves it out
                    current = await self.store.get(effect.id)
                    target = current.superseded_by if current is not None else None
                edited = await self.store.get(target) if target is not None else None
                if edited is not None:
                    effect = edited
                    continue
            if status in (EffectStatus.DENIED, EffectStatus.CANCELED):
                reason = effect.error.message if effect.error else None
                code = effect.error.code if effect.error else None
                raise EffectDeniedError(effect.idem_key, reason, status=status, code=code)
            if _expired(effect):
                # Fails closed before any sweep ran: the store denies it by its own clock.
                expire = getattr(self.store, "expire", None)
                expired = await expire(effect.id) if expire is not None else None
                if expired is not None:
                    effect = expired
                    continue
            if handler is not None and (
                status is EffectStatus.READY or _looks_stale(effect, options.stale.after_ms)
            ):
                try:
                    with tracing.span("agent_ledger.claim", idem_key=effect.idem_key) as span:
                        claimed = await self.store.claim(
                            effect.id, stale_after_ms=options.stale.after_ms, actor=SYSTEM
                        )
                        tracing.annotate(span, claimed=claimed is not None)
                except EffectStoreError as exc:
                    failure, claimed = exc, None
                if claimed is not None:
                    return await self._execute(claimed, handler, options, raw_args=raw_args)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if failure is not None:
                    raise failure
                if status is EffectStatus.REQUIRES_APPROVAL:
                    raise ApprovalPendingError(
                        effect.idem_key, concurrency.wait_timeout_ms, effect_id=effect.id
                    )
                raise EffectTimeoutError(effect.idem_key, concurrency.wait_timeout_ms)
            try:
                with tracing.span("agent_ledger.wait", idem_key=effect.idem_key, status=status):
                    changed = await self.store.wait_for_change(
                        effect.id, min(remaining, backoff.next_interval()), since
                    )
            except EffectStoreError as exc:
                failure, changed = exc, None
                await backoff.sleep(deadline)
            if changed is not None and changed.id == effect.id and changed.is_terminal:
                # Terminal states never change again, so the state the store handed over is
                # the truth: no re-read. Anything else is re-read (it may be outdated).
                effect = changed
                continue
            reread = True

    # -- redaction (agent_ledger.redaction) -----------------------------------------------------

    def _redactor(self) -> Redactor | None:
        """The ledger's redactor, else the store's default (read per call: settings change)."""
        given = self._options.redact
        if given is None:
            given = getattr(self.store, "redactor", None)
        return given if isinstance(given, Redactor) and given else None

    def _redact_outcome(self, effect: Effect, outcome: CommitOutcome) -> CommitOutcome:
        """What the store keeps of an outcome: the result with its rules applied; an error
        message without the strings redacted from ``effect``'s arguments (raw ones, here)."""
        redactor = self._redactor()
        return outcome if redactor is None else redactor.outcome(effect, outcome)

    async def _redact_committed(self, effect_id: str, outcome: CommitOutcome) -> CommitOutcome:
        """``commit``'s outcome redacted by the effect's tool (read, when there are rules)."""
        if self._redactor() is None:
            return outcome
        effect = await self.store.get(effect_id)
        return outcome if effect is None else self._redact_outcome(effect, outcome)


class _Backoff:
    """The caller's ``ConcurrencyOptions`` as a sequence of jittered, growing intervals."""

    __slots__ = ("_interval", "_options")

    def __init__(self, options: ConcurrencyOptions) -> None:
        self._options = options
        self._interval = options.initial_interval_ms / 1000

    def next_interval(self) -> float:
        options = self._options
        jitter = 1 + options.jitter_factor * (2 * random.random() - 1)
        interval = self._interval * jitter
        self._interval = min(
            self._interval * options.backoff_multiplier, options.max_interval_ms / 1000
        )
        return interval

    async def sleep(self, deadline: float) -> bool:
        """Sleep the next interval; False (without sleeping) once ``deadline`` has passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, self.next_interval()))
        return True


@dataclasses.dataclass(frozen=True)
class Decision:
    """A human (or operator) decision: which statuses it applies to and where it leads."""

    from_statuses: frozenset[EffectStatus]
    to_status: EffectStatus
    #: Stored as the effect's error (with the reason as message) when the decision ends it.
    error_code: str | None = None


DECISIONS: dict[str, Decision] = {
    "request_approval": Decision(
        frozenset({EffectStatus.PROCESSING}), EffectStatus.REQUIRES_APPROVAL
    ),
    "approve": Decision(frozenset({EffectStatus.REQUIRES_APPROVAL}), EffectStatus.READY),
    "deny": Decision(frozenset({EffectStatus.REQUIRES_APPROVAL}), EffectStatus.DENIED, "denied"),
    "cancel": Decision(
        frozenset({EffectStatus.PROCESSING, EffectStatus.REQUIRES_APPROVAL, EffectStatus.READY}),
        EffectStatus.CANCELED,
        "canceled",
    ),
}


def decision_request(
    name: str, idem_key: str, *, actor: Actor | str | None, reason: str | None
) -> dict[str, Any]:
    """Validate a decision's inputs and return the keyword arguments for ``store.transition``.

    Shared by the async ledger and the sync service (admin, API) so both enforce the same rules.
    """
    decision = DECISIONS[name]
    _require_id(idem_key, "idem_key")
    if reason is not None:
        if not isinstance(reason, str):
            raise EffectLedgerValidationError(
                f"must be a string, got {type(reason).__name__}", field="reason"
            )
        if len(reason) > MAX_REASON_LENGTH:
            raise EffectLedgerValidationError(
                f"must be at most {MAX_REASON_LENGTH} characters", field="reason"
            )
    error = None
    if decision.error_code is not None:
        error = EffectError(message=reason or decision.error_code, code=decision.error_code)
    return {
        "from_statuses": decision.from_statuses,
        "to_status": decision.to_status,
        "actor": Actor.coerce(actor),
        "reason": reason,
        "error": error,
    }


class _Resolved:
    """Run options with the ledger's defaults filled in."""

    __slots__ = (
        "codec",
        "concurrency",
        "explicit_approval",
        "passthrough",
        "requires_approval",
        "retry_on",
        "stale",
    )

    def __init__(self, merged: RunOptions, given: RunOptions) -> None:
        self.requires_approval = merged.requires_approval
        #: The call itself said whether it needs approval (the ledger's policy must not).
        self.explicit_approval = "requires_approval" in fields_set(given)
        self.concurrency: ConcurrencyOptions = merged.concurrency or ConcurrencyOptions()
        self.stale: StaleOptions = merged.stale or StaleOptions()
        self.passthrough = merged.passthrough
        self.retry_on = merged.retry_on
        self.codec = merged.codec


def _resolve(defaults: RunOptions, given: RunOptions) -> _Resolved:
    """Merge field by field: what the call set wins, then what the ledger's defaults set, then
    the spec's defaults. Nested options merge the same way, so ``initial_interval_ms=10`` on a
    call keeps the ledger's ``wait_timeout_ms``."""
    merged = _merged(defaults, given)
    concurrency = _merged(defaults.concurrency, given.concurrency, ConcurrencyOptions)
    stale = _merged(defaults.stale, given.stale, StaleOptions)
    return _Resolved(dataclasses.replace(merged, concurrency=concurrency, stale=stale), given)


def _merged(base: Any, override: Any, kind: type | None = None) -> Any:
    """``override``'s explicitly set fields over ``base``'s (either may be None)."""
    if override is None and base is None:
        return kind() if kind is not None else None
    if override is None or base is None:
        return override if base is None else base
    given = fields_set(override)
    if not given:
        return base
    values = {name: getattr(base, name) for name in fields_set(base)}
    values.update({name: getattr(override, name) for name in given})
    # Rebuilt, so the merged whole is validated (initial_interval_ms <= max_interval_ms).
    return type(override)(**values)


async def _call(handler: Handler, effect: Effect) -> Any:
    """Await async handlers; run sync ones in a worker thread so they cannot block the loop."""
    if inspect.iscoroutinefunction(handler):
        return await handler(effect)
    value = await asyncio.to_thread(handler, effect)
    if inspect.isawaitable(value):
        return await _await(value)
    return value


async def _await(value: Awaitable[Any]) -> Any:
    return await value


def _blocking(
    method: str,
    function: Callable[_P, Awaitable[_T]],
    *args: _P.args,
    **kwargs: _P.kwargs,
) -> _T:
    """Call an async ledger method from sync code; refuse where it would block a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return async_to_sync(function)(*args, **kwargs)
    raise SyncCallInEventLoopError(method)


def _json_copy(value: Any, field: str) -> Any:
    """A plain-JSON copy, so a fresh run returns exactly what a replay will."""
    keys.check_json(value, field, hashed=False)
    # check_json accepts any Mapping; json.dumps only knows dict, so convert the others.
    return json.loads(json.dumps(value, default=dict))


def _not_json_error(exc: Exception) -> EffectError:
    return EffectError(
        message=f"handler result is not JSON-serialisable: {exc}", code="result_not_json"
    )


def _error_of(exc: BaseException) -> EffectError:
    return EffectError(message=str(exc) or type(exc).__name__, code=_code_of(exc))


def _code_of(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return code if isinstance(code, str) and code else type(exc).__name__


def _expired(effect: Effect) -> bool:
    """A local guess that a pending approval has expired; the store decides by its clock."""
    expires_at = effect.expires_at
    return (
        effect.status is REQUIRES_APPROVAL
        and expires_at is not None
        and datetime.now(timezone.utc) >= expires_at
    )


def _looks_stale(effect: Effect, after_ms: float) -> bool:
    """A cheap local guess before asking the store, which decides by its own clock."""
    if effect.status is not EffectStatus.PROCESSING or after_ms <= 0:
        return False
    idle = datetime.now(timezone.utc) - effect.updated_at
    return idle.total_seconds() * 1000 >= after_ms


def _require_id(value: object, field: str) -> None:
    if not isinstance(value, str):
        raise EffectLedgerValidationError(
            f"must be a string, got {type(value).__name__}", field=field
        )
    if not value.strip():
        raise EffectLedgerValidationError("must not be empty", field=field)
