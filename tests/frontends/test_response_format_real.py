"""Structured outputs and forced tool calls on the real model.

Five JSON schemas (nested objects, arrays, enums, bounded numbers, required
fields), 20 seeded requests each, half streamed, all sent at once together with
free requests so constrained and free rows share batches: every reply validates
(jsonschema). A regex_schema likewise. ``tool_choice: "required"`` and a named
function return calls whose arguments validate against the tool's parameters,
streamed and not.
"""

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.real_model

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
REQUESTS_PER_SCHEMA = 20

SCHEMAS = {
    "person": (
        "Describe a fictional person as JSON.",
        {"type": "object",
         "properties": {"name": {"type": "string", "maxLength": 40},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "email": {"type": "string", "maxLength": 60}},
         "required": ["name", "age"], "additionalProperties": False},
    ),
    "order": (
        "Write a pizza order as JSON.",
        {"type": "object",
         "properties": {"size": {"enum": ["small", "medium", "large"]},
                        "toppings": {"type": "array", "items": {"type": "string", "maxLength": 20},
                                     "minItems": 1, "maxItems": 4},
                        "price": {"type": "number", "minimum": 5, "maximum": 50}},
         "required": ["size", "toppings", "price"], "additionalProperties": False},
    ),
    "address_book": (
        "Give a contact with an address as JSON.",
        {"type": "object",
         "properties": {"contact": {"type": "object",
                                    "properties": {"name": {"type": "string", "maxLength": 40},
                                                   "address": {"type": "object",
                                                               "properties": {"city": {"type": "string", "maxLength": 30},
                                                                              "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                                               "required": ["city", "zip"], "additionalProperties": False}},
                                    "required": ["name", "address"], "additionalProperties": False}},
         "required": ["contact"], "additionalProperties": False},
    ),
    "weather": (
        "Report the weather in Paris as JSON.",
        {"type": "object",
         "properties": {"city": {"type": "string", "maxLength": 30},
                        "temperature_c": {"type": "number", "minimum": -50, "maximum": 60},
                        "conditions": {"enum": ["sunny", "cloudy", "rain", "snow"]},
                        "humid": {"type": "boolean"}},
         "required": ["city", "temperature_c", "conditions", "humid"], "additionalProperties": False},
    ),
    "scores": (
        "List three players and their scores as JSON.",
        {"type": "object",
         "properties": {"players": {"type": "array", "minItems": 1, "maxItems": 3,
                                    "items": {"type": "object",
                                              "properties": {"name": {"type": "string", "maxLength": 20},
                                                             "score": {"type": "integer", "minimum": 0, "maximum": 100}},
                                              "required": ["name", "score"], "additionalProperties": False}}},
         "required": ["players"], "additionalProperties": False},
    ),
}

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 40},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
                   "required": ["timezone"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
TOOL_PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


async def _send(client: httpx.AsyncClient, body: dict) -> dict:
    """The reply of a request, streamed or not, as (content, tool calls, finish_reason)."""
    if not body.get("stream"):
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        return {"content": choice["message"]["content"] or "", "finish_reason": choice["finish_reason"],
                "tool_calls": [(c["function"]["name"], c["function"]["arguments"])
                               for c in choice["message"].get("tool_calls") or []]}
    content, calls, finish = "", {}, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk["choices"]:
                content += choice["delta"]["content"]
                for call in choice["delta"].get("tool_calls") or []:
                    name, arguments = calls.get(call["index"], ("", ""))
                    calls[call["index"]] = (name + call["function"].get("name", ""),
                                            arguments + call["function"]["arguments"])
                finish = choice["finish_reason"] or finish
    return {"content": content, "finish_reason": finish, "tool_calls": [calls[i] for i in sorted(calls)]}


def _run(server, bodies: list[dict]) -> list[dict]:
    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=600) as client:
            return await asyncio.gather(*(_send(client, body) for body in bodies))
    return asyncio.run(run())


def _body(prompt: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 200,
            "temperature": 0.8, **extra}


def test_every_schema_reply_validates_in_batch_with_free_requests(smollm2_server):
    bodies, expected = [], []
    for name, (prompt, schema) in SCHEMAS.items():
        format_ = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
        for seed in range(REQUESTS_PER_SCHEMA):
            bodies.append(_body(prompt, seed=seed, stream=seed % 2 == 1, response_format=format_))
            expected.append(schema)
    bodies += [_body("Tell me a short story.", seed=seed, max_tokens=40) for seed in range(8)]  # free rows
    replies = _run(smollm2_server, bodies)
    for body, schema, reply in zip(bodies, expected, replies):
        assert reply["finish_reason"] == "stop", (body["seed"], reply)
        jsonschema.validate(json.loads(reply["content"]), schema)
    assert all(reply["content"] for reply in replies[len(expected):])


def test_a_regex_schema_holds_on_the_real_model(smollm2_server):
    pattern = r"(Mon|Tue|Wed|Thu|Fri) [0-2][0-9]:[0-5][0-9]"
    format_ = {"type": "regex_schema", "regex_schema": pattern}
    bodies = [_body("When shall we meet?", seed=seed, stream=seed % 2 == 1, response_format=format_, max_tokens=20)
              for seed in range(REQUESTS_PER_SCHEMA)]
    for reply in _run(smollm2_server, bodies):
        assert re.fullmatch(pattern, reply["content"]), reply


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}],
                         ids=["required", "named"])
def test_forced_tool_calls_return_valid_arguments(smollm2_server, tool_choice):
    bodies = [_body("What is the weather in Paris and the time in Tokyo?", seed=seed, stream=seed % 2 == 1,
                    tools=TOOLS, tool_choice=tool_choice) for seed in range(10)]
    for reply in _run(smollm2_server, bodies):
        assert reply["finish_reason"] == "tool_calls" and reply["tool_calls"], reply
        for name, arguments in reply["tool_calls"]:
            if isinstance(tool_choice, dict):
                assert name == "get_time"
            jsonschema.validate(json.loads(arguments), TOOL_PARAMETERS[name])
