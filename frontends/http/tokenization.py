"""Tokenizer routes: LMDeploy's ``POST /v1/encode`` and vLLM's ``POST /tokenize`` / ``/detokenize``."""

from __future__ import annotations

from sanic import Request, Sanic
from sanic.response import json as json_response

from lmserve.core.validation import check_token_ids
from lmserve.frontends.http.chat_prompt import chat_prompt_ids
from lmserve.frontends.http.errors import APIError
from lmserve.frontends.http.parsing import parse_body
from lmserve.frontends.http.protocol import DetokenizeRequest, EncodeRequest, TokenizeRequest
from lmserve.frontends.http.served_model import check_model
from lmserve.frontends.http.state import ServerState


def register_tokenization_routes(app: Sanic, state: ServerState) -> None:
    tokenizer = state.tokenizer

    def user_turn_ids(text: str) -> list[int]:
        return chat_prompt_ids(state, [{"role": "user", "content": text}],
                               lambda messages: state.chat_template.render(messages, add_generation_prompt=True))

    async def encode(request: Request):
        body = parse_body(request, EncodeRequest)
        texts = [body.input] if isinstance(body.input, str) else body.input
        ids = []
        for text in texts:
            if body.do_preprocess:  # the template spells out BOS itself where the model wants one
                ids.append(user_turn_ids(text))
            else:
                ids.append(tokenizer.encode(text, add_bos=body.add_bos))
        if isinstance(body.input, str):
            return json_response({"input_ids": ids[0], "length": len(ids[0])})
        return json_response({"input_ids": ids, "length": [len(item) for item in ids]})

    async def tokenize(request: Request):
        body = parse_body(request, TokenizeRequest)
        if body.model is not None:
            check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "Send exactly one of prompt and messages.", "prompt")
        if body.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
            ids = chat_prompt_ids(state, messages, lambda messages: state.chat_template.render(
                messages, add_generation_prompt=body.add_generation_prompt))
        else:
            ids = tokenizer.encode(body.prompt, add_bos=None if body.add_special_tokens else False)
        return json_response({"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids})

    async def detokenize(request: Request):
        body = parse_body(request, DetokenizeRequest)
        if body.model is not None:
            check_model(state, body.model)
        check_token_ids(body.tokens, tokenizer.vocab_size, "tokens")
        return json_response({"prompt": tokenizer.decode(body.tokens)})

    app.add_route(encode, "/v1/encode", methods=["POST"], name="encode")
    app.add_route(tokenize, "/tokenize", methods=["POST"], name="tokenize")
    app.add_route(detokenize, "/detokenize", methods=["POST"], name="detokenize")
