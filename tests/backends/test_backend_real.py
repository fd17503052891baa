"""Greedy generation through lmserve (bus + torch backend) equals HF transformers."""

import asyncio

import pytest
import torch

from lmserve.core.bus import RequestBus
from lmserve.core.config import ServeConfig
from lmserve.core.model_source import ModelSource
from lmserve.core.types import FinishReason, GenerationRequest, SamplingParams
from lmserve.plugins.tokenizer_files import tokenizer_from_gguf

pytestmark = pytest.mark.real_model

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "def fibonacci(n):"}],
    [{"role": "user", "content": "Translate to French: I like cheese and bread."}],
    [{"role": "user", "content": "List three prime numbers and explain why they are prime, step by step."}],
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def lmserve_bus(smollm2_gguf):
    from lmserve.backends.torch.plugin import lmserve_make_backend

    # float32 float weights like the reference: --dtype auto picks bfloat16 on CPUs with
    # native bf16 matmul, --quantization auto int4 for this Q4_1 file
    config = ServeConfig(model=str(smollm2_gguf), session_len=1024, dtype="float32",
                         options={"quantization": "none", "enforce_eager": True})
    backend = lmserve_make_backend(config, ModelSource("smollm2", smollm2_gguf, "gguf", "test"), model_families=[])
    return backend, tokenizer_from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf(hf_smollm2_model, hf_smollm2_tokenizer):
    return hf_smollm2_model, hf_smollm2_tokenizer


def hf_greedy(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids])
    out = []
    with torch.no_grad():
        past = None
        step_input = ids
        for _ in range(n):
            result = model(input_ids=step_input, past_key_values=past, use_cache=True)
            past = result.past_key_values
            token = int(result.logits[0, -1].argmax())
            out.append(token)
            step_input = torch.tensor([[token]])
    return out


def test_greedy_ids_through_the_bus_equal_transformers(lmserve_bus, hf):
    backend, tokenizer = lmserve_bus
    hf_model, hf_tokenizer = hf

    async def run_all():
        bus = RequestBus(backend, tokenizer)
        bus.start()
        results = []
        for messages in PROMPTS:
            prompt = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer.encode(prompt, add_bos=False)
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            outs = [o async for o in bus.generate(GenerationRequest(tuple(ids), params))]
            results.append((ids, outs))
        return results

    results = asyncio.run(run_all())
    for ids, outs in results:
        got = [t for o in outs for t in o.token_ids]
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert got == hf_greedy(hf_model, ids, NEW_TOKENS)
        assert "".join(o.text for o in outs) == hf_tokenizer.decode(got, skip_special_tokens=True)
