"""STAND-IN for KTransformers' legacy HTTP server (it needs CUDA, which cannot exist on this box).

It answers with the response shapes recorded from the real server's source at the release named by KT_TAG
(ktransformers/server/api/openai/endpoints/chat.py, schemas/endpoints/chat.py, schemas/assistants/streaming.py,
api/openai/legacy/completions.py at that tag; kt_versions.VERSIONS holds which release has which):
- v0.2.0-0.2.1: `GET /v1/models` -> [{"id": "0", "name": "ktranformers-model"}]; stream lines `data:{json}` (no
  space), every chunk `{"choices": [{"index": 0, "delta": {"content": tok, "role": "assistant"}, "logprobs": null,
  "finish_reason": null}], "object": "chat.completion.chunk", "model": "not implmented", "usage": null}`, then
  `event: done\\ndata: [DONE]`; non-stream `object: "chat.completion.chunk"`, usage null; request fields: messages,
  model, stream (max_tokens and sampling ignored: it generates --max_new_tokens tokens); content must be a string.
- v0.3+: OpenAI list; `data: {json}`; the usage chunk (choices []) when generation ends, then a "stop" chunk,
  then `data: [DONE]`; max_tokens honoured (finish_reason "length").
Before serving, it runs the real release's argument parser (KT_TREE: that release's files, see kt_source.py) on its
own argv, as `ktransformers` would, and exits with its status if the parser rejects the command.

KT_TAG=sglang: the same for `python -m sglang.launch_server` (kt-sglang): SGLang's real argparse setup
(sglang_args.py) checks the argv; answers as sglang/srt/entrypoints/openai/serving_chat.py (sglang 0.5.9) does —
`GET /health`, tokens, a finish chunk with an empty delta, the usage chunk (choices []) when
stream_options.include_usage, `data: [DONE]`.
"""

import asyncio
import json
import os
import sys
import time
import uuid

TAG = os.environ.get("KT_TAG", "v0.2.1")
OLD = TAG in ("v0.2.0", "v0.2.1")
REPLY = ["Let", " me", " think", ".", "</think>", "\n\n", "Hello", " there", "!"]


def parse_argv():
    tree = os.environ.get("KT_TREE")
    if not tree:
        raise SystemExit("KT_TREE not set")
    sys.path.insert(0, tree)
    from ktransformers.server.args import ArgumentParser
    from ktransformers.server.config.config import Config

    cfg = Config()
    args = ArgumentParser(cfg).parse_args()  # the real parser: exits 2 with its usage line on a bad argv
    return args, cfg


def tokens(n):
    out = list(REPLY)
    while len(out) < n:
        out.append(f" w{len(out)}")
    return out[:n]


def main():
    args, cfg = parse_argv()
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    max_new = int(args.max_new_tokens)
    model_name = getattr(cfg, "model_name", "")

    async def models(request: Request):
        if OLD:
            return JSONResponse([{"id": "0", "name": "ktranformers-model"}])
        return JSONResponse({"data": [{"id": model_name, "name": model_name}], "object": "list"})

    async def chat(request: Request):
        body = await request.json()
        msgs = body.get("messages")
        if not isinstance(msgs, list) or any(not isinstance(m.get("content"), str) for m in msgs):
            return JSONResponse({"detail": [{"type": "string_type", "loc": ["body", "messages", 0, "content"],
                                             "msg": "Input should be a valid string"}]}, status_code=422)
        limit = max_new if OLD else min(max_new, body.get("max_tokens") or max_new)
        toks = tokens(limit)
        reason = "length" if not OLD and body.get("max_tokens") and body["max_tokens"] <= len(toks) else "stop"
        cid = str(uuid.uuid4())
        prompt_tokens = sum(len(m["content"].split()) for m in msgs) + 4
        if not body.get("stream"):
            if OLD:
                return JSONResponse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                     "model": "not implmented", "system_fingerprint": "not implmented", "usage": None,
                                     "choices": [{"index": 0, "message": {"content": "".join(toks), "role": "assistant",
                                                                          "name": None},
                                                  "logprobs": None, "finish_reason": None}]})
            return JSONResponse({"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(toks)},
                                              "finish_reason": reason}],
                                 "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(toks),
                                           "total_tokens": prompt_tokens + len(toks)}})

        async def gen():
            for t in toks:
                if await request.is_disconnected():  # check_client_link: stops when the client goes away
                    return
                if OLD:
                    chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": "not implmented", "system_fingerprint": "not implmented", "usage": None,
                             "choices": [{"index": 0, "delta": {"content": t, "role": "assistant", "name": None},
                                          "logprobs": None, "finish_reason": None}]}
                    yield f"data:{json.dumps(chunk)}\n\n"
                else:
                    chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                             "model": model_name, "choices": [{"index": 0, "delta": {"content": t, "role": "assistant"},
                                                               "finish_reason": None}], "usage": None}
                    yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.005)
            if OLD:
                yield "event: done\ndata: [DONE]\n\n"
                return
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(toks),
                     "total_tokens": prompt_tokens + len(toks)}
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                         "model": model_name, "choices": [], "usage": usage}) + "\n\n"
            yield "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                         "model": model_name, "choices": [{"index": 0, "delta": {"content": ""},
                                                                           "finish_reason": reason}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/models", models), Route("/v1/chat/completions", chat, methods=["POST"])])
    print(f"stand-in KTransformers {TAG} server on {args.host}:{args.port} (backend {cfg.backend_type})", flush=True)
    uvicorn.run(app, host=args.host, port=int(args.port), log_level="warning")


def main_sglang():
    from pathlib import Path

    import sglang_args
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    argv = sys.argv[1:]
    assert argv[:2] == ["-m", "sglang.launch_server"], argv
    r = sglang_args.parse(os.environ.get("SGLANG_FLAVOR", "sglang-kt"), argv[2:], Path(os.environ["SGLANG_TREES"]))
    if r["exit"] != 0:
        sys.stderr.write(r["stderr"])
        raise SystemExit(r["exit"])
    a = r["args"]
    name = a.get("served_model_name") or a["model_path"]

    async def health(request: Request):
        return JSONResponse({})

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "sglang"}]})

    async def chat(request: Request):
        body = await request.json()
        limit = body.get("max_tokens") or 16
        toks = tokens(limit)
        reason = "length" if len(toks) >= limit and body.get("max_tokens") else "stop"
        usage = {"prompt_tokens": 11, "completion_tokens": len(toks), "total_tokens": 11 + len(toks)}
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": int(time.time()), "model": name}
        if not body.get("stream"):
            return JSONResponse({**base, "object": "chat.completion", "usage": usage,
                                 "choices": [{"index": 0, "finish_reason": reason,
                                              "message": {"role": "assistant", "content": "".join(toks)}}]})

        async def gen():
            for i, t in enumerate(toks):
                delta = {"role": "assistant", "content": t} if i == 0 else {"content": t}
                yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
                                             "usage": None}) + "\n\n"
                await asyncio.sleep(0.005)
            yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}],
                                         "usage": None}) + "\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                yield "data: " + json.dumps({**base, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                            Route("/v1/chat/completions", chat, methods=["POST"])])
    print(f"stand-in SGLang server on {a['host']}:{a['port']} (kt-method {a['kt_method']})", flush=True)
    uvicorn.run(app, host=a["host"], port=int(a["port"]), log_level="warning")


if __name__ == "__main__":
    main_sglang() if TAG == "sglang" else main()
