"""The admin API's request handlers: each reads its parameters (requests.py), talks to the
enforcer and its store, and answers a document (responses.py). Errors are raised, and rendered by
the app's exception handlers (errors.py). A change is applied by this process at once and by
other replicas within the enforcer's policy cache time (1 s)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from budgets.admin.bodies import read_json
from budgets.admin.errors import AdminError, json_response
from budgets.admin.openapi import openapi_document
from budgets.admin.requests import (
    LEDGER_MAX,
    LedgerQuery,
    SummaryQuery,
    owner_of,
    parse_block_range,
    parse_policy,
    parse_policy_filter,
    parse_suspension,
    parse_usage_query,
    path_param,
    policy_target,
)
from budgets.admin.responses import ResponseBodies
from budgets.enforcer import BudgetEnforcer
from budgets.models import Policy, Refusal
from budgets.reconcile import ReconcileError, Reconciler

log = logging.getLogger("budgets.admin")
SUMMARY_MAX = 10 * LEDGER_MAX  # entries a summary reads at most (more: "truncated")


@dataclass
class AdminApi:
    enforcer: BudgetEnforcer
    bodies: ResponseBodies
    reconciler: Reconciler | None = None

    async def healthz(self, request: Request) -> Response:
        return json_response({"status": "ok"})

    async def openapi(self, request: Request) -> Response:
        return json_response(openapi_document(request.scope.get("root_path") or "/"))

    async def assets_list(self, request: Request) -> Response:
        return json_response(self.bodies.assets_list())

    # -- policies ------------------------------------------------------------------------------

    async def list_policies(self, request: Request) -> Response:
        wanted = parse_policy_filter(request.query_params)
        return json_response({"policies": [
            self.bodies.policy_item(kind, owner, policy) for kind, owner, policy
            in await self.enforcer.store.list_policies() if wanted in (None, (kind, owner))]})

    async def get_policy(self, request: Request) -> Response:
        kind, owner, network, asset = policy_target(request)
        policy = await self.enforcer.store.get_policy(kind, owner, network, asset)
        if policy is None:
            raise AdminError(404, "not_found", f"no policy for {kind} {owner} on {network} {asset}")
        return json_response(self.bodies.policy_item(kind, owner, policy))

    async def put_policy(self, request: Request) -> Response:
        kind, owner, network, asset = policy_target(request)
        body = await read_json(request, required=True) or {}
        policy = parse_policy(body, kind, network, asset)
        existed = await self.enforcer.store.get_policy(kind, owner, network, asset) is not None
        await self.enforcer.put_policy(kind, owner, policy)
        log.info("budget_policy_put", extra={"kind": kind, "owner": owner, "network": network, "asset": asset})
        return json_response(self.bodies.policy_item(kind, owner, policy), 200 if existed else 201)

    async def delete_policy(self, request: Request) -> Response:
        kind, owner, network, asset = policy_target(request)
        if not await self.enforcer.store.delete_policy(kind, owner, network, asset):
            raise AdminError(404, "not_found", f"no policy for {kind} {owner} on {network} {asset}")
        self.enforcer.invalidate()
        log.info("budget_policy_deleted", extra={"kind": kind, "owner": owner, "network": network, "asset": asset})
        return Response(status_code=204)

    async def _owned(self, kind: str, owner: str, network: str | None, asset: str | None) -> list[Policy]:
        return [p for k, o, p in await self.enforcer.store.list_policies()
                if (k, o) == (kind, owner) and (network is None or p.network == network)
                and (asset is None or p.asset == asset)]

    # -- suspension ----------------------------------------------------------------------------

    async def suspend(self, request: Request) -> Response:
        return await self._suspension(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._suspension(request, False)

    async def _suspension(self, request: Request, suspended: bool) -> Response:
        kind, owner = owner_of(request)
        network, asset = parse_suspension(await read_json(request, required=False) or {})
        policies = await self._owned(kind, owner, network, asset.lower() if asset else None)
        if not policies:
            where = f" on {network or 'any network'} {asset or ''}".rstrip() if (network or asset) else ""
            raise AdminError(404, "not_found", f"{kind} {owner} has no policy{where}: give it one first (PUT"
                             f" .../policies/{{network}}/{{asset}}), or make unlisted wallets' default \"deny\"")
        for policy in policies:
            await self.enforcer.store.put_policy(kind, owner, policy.model_copy(update={"suspended": suspended}))
        self.enforcer.invalidate()
        log.info("budget_owner_suspended" if suspended else "budget_owner_resumed",
                 extra={"kind": kind, "owner": owner, "policies": len(policies)})
        changed = [self.bodies.policy_item(kind, owner, p.model_copy(update={"suspended": suspended}))
                   for p in policies]
        return json_response({"kind": kind, "id": owner, "suspended": suspended, "policies": changed})

    # -- usage and ledger ----------------------------------------------------------------------

    async def usage(self, request: Request) -> Response:
        agent = path_param(request, "address")
        asked = parse_usage_query(request.query_params)
        pairs = [asked] if asked else [(p.network, p.asset) for p in await self._owned("agent", agent, None, None)]
        if not pairs:
            raise AdminError(404, "not_found", f"agent {agent} has no policy; pass network and asset to see the"
                             " default budget it would get")
        now = self.enforcer.clock()
        budgets, policies = [], []
        for net, ast in pairs:
            try:
                policy, group, listed = await self.enforcer.policies_for(agent, net, ast)
            except Refusal as refusal:
                raise AdminError(404, refusal.reason, f"{refusal.message} (unlisted wallets are denied on"
                                 f" {net} {ast})") from None
            policies.append(self.bodies.usage_policy(net, ast, policy, group, listed))
            for check in self.enforcer.checks(agent, policy, group, net, ast, now, with_rate=False):
                usage = await self.enforcer.store.usage(check, now=now)
                budgets += [self.bodies.usage_row(net, ast, check, u) for u in usage]
        return json_response({"agent": agent, "budgets": budgets, "suspended": any(p["suspended"] for p in policies),
                              "rate_limit": policies[0]["rate_limit"] if len(policies) == 1 else None,
                              "policies": policies})

    async def ledger(self, request: Request) -> Response:
        q = LedgerQuery.parse(request.query_params, self.enforcer.clock())
        if q.where:  # the store selects by agent and time; the rest narrows its answer, then the limit applies
            found = await self.enforcer.store.ledger(agent=q.agent, start=q.start, end=q.end, limit=LEDGER_MAX)
            entries = [e for e in found if q.matches(e)][:q.limit]
        else:
            entries = await self.enforcer.store.ledger(agent=q.agent, start=q.start, end=q.end, limit=q.limit)
        if q.format == "json":
            return json_response({"entries": [self.bodies.ledger_entry(e) for e in entries]})
        media = "application/x-ndjson" if q.format == "jsonl" else "text/csv; charset=utf-8"
        return StreamingResponse(self.bodies.ledger_lines(entries, q.format), media_type=media,
                                 headers={"Cache-Control": "no-store"})

    async def ledger_summary(self, request: Request) -> Response:
        q = SummaryQuery.parse(request.query_params, self.enforcer.clock())
        led = q.ledger
        found = await self.enforcer.store.ledger(agent=led.agent, start=led.start, end=led.end, limit=SUMMARY_MAX + 1)
        entries = [e for e in found[:SUMMARY_MAX] if led.matches(e)]
        return json_response(self.bodies.ledger_summary(entries, led.start, led.end, q.by, q.bucket_s,
                                                        truncated=len(found) > SUMMARY_MAX))

    # -- reconciliation with the chain ---------------------------------------------------------

    async def reconcile(self, request: Request) -> Response:
        from_block, to_block, network = parse_block_range(request.query_params)
        if self.reconciler is None:
            raise AdminError(404, "reconcile_unavailable", "no chain to reconcile with: give budgets.rpc_urls"
                             " (network -> JSON-RPC URL) or run the facilitator in process")
        try:
            report = await self.reconciler.run(from_block, to_block, network)
        except ReconcileError as exc:
            raise AdminError(400, "reconcile_refused", str(exc)) from None
        except (OSError, TimeoutError, ValueError, KeyError) as exc:  # the node unreachable, or a malformed answer
            raise AdminError(502, "chain_unavailable", f"the chain could not be read ({type(exc).__name__})") from None
        log.info("ledger_reconciled", extra={"network": report.network, "from": from_block, "to": to_block,
                                             "differences": len(report.differences)})
        return json_response(report.to_json())
