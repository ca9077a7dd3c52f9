"""``POST /tasks`` and ``GET /usage``: a tenant's task, checked, recorded, queued.

Everything that can be known before the provider sees the task is checked here, so a mistake
is a 4xx now and not a failed task later: the action and its inputs, the parent (the tenant's,
submitted by this service, of the same provider, finished, with the button pressed), the
mode (an action keeps its parent's: the providers' account pools are separate), the price.
The record is written before anything is sent, so a callback that beats the provider's
answer finds its task; the dispatcher (`receiver.worker.dispatcher`) sends it when the account has
a free slot.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict
from typing import Any

import orjson
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from receiver.core.errors import BadRequest, Conflict
from receiver.core.models import TaskStatus, Update, new_job_id
from receiver.core.settings import ProviderAccount
from receiver.core.tokens import CallbackClaims
from receiver.providers import (
    ACTIONS,
    Aigc2dClient,
    CannotCancel,
    ModeMismatch,
    ProviderClient,
    SubmitRequest,
    UnknownParent,
    button_action,
    dialog_input,
    find_button,
)
from receiver.providers.fetch import FetchPolicy, image_data_url
from receiver.providers.pricing import usage_report
from receiver.services.auth import authenticate
from receiver.services.container import Services, services
from receiver.services.http import JSONResponse, json_model, task_or_404
from receiver.store.admission import Member
from receiver.tasks.schemas import BUTTON_ACTIONS, DIMENSIONS, NewTask

DEFAULT_MODE: dict[str, str] = {"ohmygpt": "FAST"}


class ParentNotReady(Conflict):
    code = "parent_not_ready"


class ParentNotSubmittedHere(Conflict):
    code = "parent_not_submitted_here"


class ParentAccountGone(Conflict):
    code = "parent_account_gone"


async def create_task(request: Request) -> Response:
    """``POST /tasks``: the task recorded and queued (202), within SUBMIT_RATE."""
    tenant = authenticate(request)
    svc = services(request)
    svc.submit_limiter.take(tenant, "submissions")
    new = await json_model(request, NewTask)
    return JSONResponse(await submit_task(svc, tenant, new), status_code=202)


async def list_providers(request: Request) -> Response:
    """What ``POST /tasks`` can send to: the configured providers, their modes, the default."""
    authenticate(request)
    svc = services(request)
    settings = svc.settings
    return JSONResponse({
        "default": settings.provider_for(None),
        "providers": [{"name": name, "modes": pool_modes(svc, accounts),
                       "flavor": accounts[0].flavor if name == "mjproxy" else None,
                       "default_mode": DEFAULT_MODE.get(name),
                       "queue_limit": sum(a.queue_limit for a in accounts),
                       "accounts": len(accounts)}
                      for name, accounts in settings.pools().items()],
    })


def pool_modes(svc: Services, accounts: list[ProviderAccount]) -> list[str]:
    """The modes some account of a pool serves (its own list, else its provider's)."""
    modes: dict[str, None] = {}
    for account in accounts:
        modes.update(dict.fromkeys(svc.modes_of(account)))
    return list(modes)


async def get_usage(request: Request) -> Response:
    """``GET /usage``: the tenant's cost ledger."""
    tenant = authenticate(request)
    svc = services(request)
    counters = await svc.redis.hgetall(svc.store.keys.usage(tenant))  # type: ignore[misc]
    report = usage_report(counters)
    own = svc.settings.budgets(tenant)
    committed = {name.decode().partition("|")[2]: int(value)
                 for name, value in counters.items() if name.startswith(b"@committed|")}
    report["budgets"] = {unit: {"limit": limit, "committed": committed.get(unit, 0),
                                "left": limit - committed.get(unit, 0)}
                         for unit, limit in own.items()}
    return JSONResponse({"tenant": tenant, **report})


async def submit_task(svc: Services, tenant: str, new: NewTask) -> bytes:
    """Record the task (NOT_START) and queue it; returns its snapshot JSON."""
    provider = svc.settings.provider_for(_clean(new.provider))
    pools = svc.settings.pools()
    if provider is None or provider not in pools:
        configured = sorted(pools) or "none"
        raise BadRequest(f"'provider' must be a configured provider (configured: {configured})")
    pool = pools[provider]
    client = svc.clients[pool[0].name]  # what the provider's API takes: one for the pool
    action = (_clean(new.action) or "").upper() or None
    mode = (_clean(new.mode) or "").upper() or None
    served = pool_modes(svc, pool)
    if mode is not None and mode not in served:
        offered = ", ".join(served) or "no modes"
        flavor = f" ({pool[0].flavor})" if provider == "mjproxy" else ""
        raise BadRequest(f"{provider}{flavor} has {offered}, not {mode!r}")
    affinity = None
    prompt, images, mask, index = _clean(new.prompt), new.images or [], _clean(new.mask), new.index
    dimensions = (_clean(new.dimensions) or "").upper() or None
    if dimensions is not None and dimensions not in DIMENSIONS:
        raise BadRequest(f"'dimensions' must be one of {', '.join(DIMENSIONS)}")
    parent_id = new.parent_id
    parent_ptid = custom_id = None
    if parent_id is None:
        action = action or "IMAGINE"
        if action in BUTTON_ACTIONS:
            raise BadRequest(f"{action} acts on a finished task: give its 'parent_id'")
        mode = mode or DEFAULT_MODE.get(provider)
        if mode is not None and mode not in served:
            raise BadRequest(f"no {provider} account here serves {mode} (the provider's "
                             f"default): name a mode, one of {', '.join(served)}")
    else:
        parent = orjson.loads(await task_or_404(svc, tenant, parent_id))
        sent_by = await svc.redis.hget(  # type: ignore[misc]
            svc.store.keys.task(tenant, parent_id), "a")
        if sent_by is None:
            # Its provider task id came from a callback URL's caller, who may have named
            # someone else's task: only an id the provider gave our key is acted on.
            raise ParentNotSubmittedHere(
                "actions go to tasks this service submitted (POST /tasks); this one was "
                "submitted elsewhere (POST /callback-urls): send its actions there")
        if parent["provider"] != provider:
            raise BadRequest(f"the parent is a {parent['provider']} task, not {provider}")
        if parent["status"] != TaskStatus.SUCCESS or not parent["provider_task_id"]:
            raise ParentNotReady(f"the parent is {parent['status']}; actions need SUCCESS")
        if mode is not None and mode != parent["mode"]:
            ran = parent["mode"] or "the default"
            raise ModeMismatch(
                f"the parent ran in {ran} mode; its actions must too (the provider's "
                f"{ran} and {mode} pools are separate)", provider)
        mode, parent_ptid = parent["mode"], parent["provider_task_id"]
        affinity = _parent_account(svc, sent_by.decode(), pool)
        action, custom_id = _button(parent, action, _clean(new.custom_id)
                                    or _clean(new.button), index, provider)
    if action not in ACTIONS:
        raise BadRequest(f"'action' must be one of {', '.join(ACTIONS)}")
    if action == "IMAGINE" and not prompt:
        raise BadRequest("IMAGINE needs a 'prompt'")
    if action == "DESCRIBE" and len(images) != 1:
        raise BadRequest("DESCRIBE takes one image in 'images'")
    if action == "BLEND" and not 2 <= len(images) <= client.max_blend():
        raise BadRequest(f"{provider}'s BLEND takes 2 to {client.max_blend()} images in "
                         "'images'")
    need = dialog_input(custom_id)
    if need == "prompt" and not prompt:
        raise BadRequest(f"button {custom_id!r} opens a dialog: give its text in 'prompt' "
                         "(Custom Zoom: the prompt with --zoom, e.g. 'a fox --zoom 1.5')")
    if need == "mask" and not mask:
        raise BadRequest(f"button {custom_id!r} (Vary Region) opens a dialog: give the area "
                         "to redraw in 'mask' (a PNG data URL or image URL)")
    if mask is not None and parent_id is None:
        raise BadRequest("'mask' goes with a Vary Region button on a parent")
    images, mask = await _as_sent(svc, client, images, mask)

    claims = CallbackClaims(new_job_id(), tenant, provider)
    request = SubmitRequest(action, prompt, images, parent_ptid, custom_id, index, mode,
                            dimensions, mask)
    # `a`: the pool until a dispatcher sends it, then the account that did
    control = {"a": provider.encode(), "q": orjson.dumps(asdict(request))}
    price = svc.prices.price(provider, mode, action)
    cost = budget = None
    if price is not None:
        cost = {"amount": price.amount, "unit": price.unit}
        control["b"] = b"%s\0%d\0%d" % (price.ledger_field(provider, mode, action).encode(),
                                        price.amount, price.refund_on_failure)
        budget = svc.settings.budget(tenant, price.unit)
    outcome = await svc.store.create(
        claims, control=control, action=action, mode=mode, prompt=prompt,
        parent_id=parent_id, cost=cost, budget=budget)
    assert outcome.data is not None  # a fresh job id cannot exist already
    try:
        await svc.admission.enqueue(provider, Member(tenant, claims.job_id), mode, affinity)
    except RedisError:
        # Answered 503 (the client submits again, as a new task): this record must not
        # wait at NOT_START forever, so it ends now if Redis lets it.
        with contextlib.suppress(RedisError):
            await svc.store.apply(claims, Update(
                TaskStatus.FAILURE, fail_reason="not queued (Redis failed); never sent"))
        raise
    return outcome.data


def _parent_account(svc: Services, name: str, pool: list[ProviderAccount]) -> str:
    """``name``, the account that ran the parent (the only one whose provider knows it), if
    it is still in the pool."""
    if name not in {a.name for a in pool}:
        state = "disabled" if name in svc.settings.accounts else "no longer configured"
        raise ParentAccountGone(
            f"the parent was made by account {name!r}, which is {state}: an action goes to "
            "the account that made its parent (no other knows it), so it cannot be sent")
    return name


def _button(parent: dict[str, Any], action: str | None, button: str | None,
            index: int | None, provider: str) -> tuple[str, str | None]:
    """The action on the parent and its button's custom id (AIGC2D takes an index instead)."""
    if button is not None and provider == "aigc2d":
        raise BadRequest("aigc2d has no buttons: give 'action' and 'index'")
    if button is not None:
        found = next((b["custom_id"] for b in parent["buttons"]
                      if button in (b["custom_id"], b.get("label"))), None)
        if found is None:
            raise UnknownParent(f"the parent has no button {button[:80]!r}", provider)
        pressed = button_action(found)
        if pressed is None:
            raise BadRequest(f"button {button[:80]!r} is not an action this service sends")
        if action is not None and action != pressed:
            raise BadRequest(f"button {button[:80]!r} is {pressed}, not {action}")
        return pressed, found
    if action not in BUTTON_ACTIONS:
        raise BadRequest(f"an action on a parent is one of {', '.join(BUTTON_ACTIONS)} (or "
                         "give its 'custom_id')")
    if provider == "aigc2d":
        if action not in Aigc2dClient.PATHS:
            raise BadRequest(f"aigc2d offers {', '.join(Aigc2dClient.PATHS)}, not {action}")
        if index is None:
            raise BadRequest(f"aigc2d's {action} needs an 'index' 1-4")
        return action, None
    found = find_button(parent["buttons"], action, index)
    if found is None:
        which = f"{action} {index}" if index else action
        raise UnknownParent(f"the parent has no {which} button", provider)
    return action, found


async def _as_sent(svc: Services, client: ProviderClient, images: list[str],
                   mask: str | None) -> tuple[list[str], str | None]:
    """The images as the provider takes them: data URLs, fetched here (safely: `fetch`) so
    that a refused image is a 400 now, not a failed task later."""
    if not client.needs_data_urls():
        return images, mask
    settings = svc.settings
    policy = FetchPolicy(allow_hosts=frozenset(settings.fetch_allow_hosts),
                         max_bytes=settings.image_max_bytes, timeout=settings.fetch_timeout)
    sent = [await image_data_url(url, policy) for url in images]
    return sent, None if mask is None else await image_data_url(mask, policy)


def _clean(value: str | None) -> str | None:
    """A text field as used: without surrounding blanks; None when blank."""
    return None if value is None else value.strip() or None


class TaskFinal(Conflict):
    code = "task_final"


class CancelInFlight(Conflict):
    code = "cancel_in_flight"

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}


async def cancel_task(request: Request) -> Response:
    """``POST /tasks/{job_id}/cancel``."""
    tenant = authenticate(request)
    svc = services(request)
    task = orjson.loads(await task_or_404(svc, tenant, request.path_params["job_id"]))
    return JSONResponse(await cancel(svc, tenant, task))


async def cancel(svc: Services, tenant: str, task: dict[str, Any]) -> bytes:
    """Cancel a task; its snapshot afterwards. A task still in our queue is taken out of it
    first, atomically, so no dispatcher can pop it afterwards: it is never sent."""
    status, job_id = TaskStatus(task["status"]), task["id"]
    if status.terminal:
        raise TaskFinal(f"the task has ended ({status.value}): nothing to cancel")
    claims = CallbackClaims(job_id, tenant, task["provider"])
    account = await svc.redis.hget(svc.store.keys.task(tenant, job_id), "a")  # type: ignore[misc]
    ptid = task["provider_task_id"]
    if status is TaskStatus.NOT_START and ptid is None:
        if account is None or not await svc.admission.withdraw(task["provider"],
                                                                Member(tenant, job_id)):
            if account is None:  # minted for a task submitted elsewhere: not ours to send
                raise CannotCancel("this task was submitted elsewhere: cancel it there",
                                   task["provider"])
            raise CancelInFlight("the task is being sent to the provider right now; try "
                                 "again in a moment")
        await svc.store.apply(claims, Update(
            TaskStatus.CANCEL, fail_reason="canceled before it was sent to the provider"))
        return await task_or_404(svc, tenant, job_id)
    # the account that sent it (its key is the one the provider knows the task by)
    client = svc.clients.get(account.decode()) if account is not None else None
    if client is None or account is None or ptid is None:
        raise CannotCancel("this task was submitted elsewhere: cancel it there",
                           task["provider"])
    update = await client.cancel(ptid)  # CannotCancel where the provider has no way
    if update is not None:
        await svc.store.apply(claims, update)
    return await task_or_404(svc, tenant, job_id)
