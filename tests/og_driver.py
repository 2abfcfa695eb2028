"""OpenGradient's SDK as its users run it, against our gateway (run with .venv-og's python, see
scripts/og-venv.sh; it imports nothing from this project).

    og_driver.py GATEWAY_URL PRIVATE_KEY MODEL CALLS...    (each call: "chat" or "stream")

Before importing the SDK, BASE_MAINNET_RPC must point at a dev chain started with
`--chain-id 8453` (the SDK pays only on Base and hard-codes OPG's Base address). The driver first
calls `ensure_opg_approval` (the SDK's documented prerequisite), then makes the calls on one client,
as an application would, and prints one JSON line per step.
"""

from __future__ import annotations

import asyncio
import json
import sys

import opengradient as og

PROMPT = [{"role": "user", "content": "hello from the OpenGradient SDK"}]


def emit(**doc: object) -> None:
    print(json.dumps(doc), flush=True)


async def main(url: str, key: str, model: str, calls: list[str]) -> None:
    llm = og.LLM.from_url(private_key=key, llm_server_url=url)
    approval = llm.ensure_opg_approval(min_allowance=10)
    emit(step="approval", before=approval.allowance_before, after=approval.allowance_after, tx=approval.tx_hash)
    try:
        for kind in calls:
            if kind == "chat":
                out = await llm.chat(model=og.TEE_LLM(model), messages=PROMPT, max_tokens=64)
                emit(step="chat", content=out.chat_output.get("content"), usage=out.usage,
                     finish_reason=out.finish_reason)
            else:
                stream = await llm.chat(model=og.TEE_LLM(model), messages=PROMPT, max_tokens=64, stream=True)
                chunks = [chunk async for chunk in stream]
                final = chunks[-1] if chunks else None
                emit(step="stream", content="".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
                     chunks=len(chunks), final=bool(final and final.is_final),
                     usage=None if final is None or final.usage is None else vars(final.usage))
    finally:
        await llm.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
