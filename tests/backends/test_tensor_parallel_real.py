"""SmolLM2-135M-Instruct split over 3 ranks (its 9 heads, 3 per rank; one kv head each) computes what one rank does."""

import pytest

from lmserve.core.types import EngineRequest, SamplingParams
from test_backend_real import NEW_TOKENS, PROMPTS
from test_tensor_parallel import logprob_values, run, tokens

pytestmark = pytest.mark.real_model


def test_three_ranks_give_one_rank_s_greedy_tokens_and_logprobs(smollm2_gguf, hf_smollm2_tokenizer):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=2)
    prompts = [hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
               for messages in PROMPTS]
    requests = [EngineRequest(f"p{i}", tuple(hf_smollm2_tokenizer(prompt, add_special_tokens=False)["input_ids"]),
                              params) for i, prompt in enumerate(prompts)]
    # float32 float weights: the split changes only the order of the all-reduced sums
    single = run(smollm2_gguf, 1, requests, quantization="none")
    split = run(smollm2_gguf, 3, requests, quantization="none")
    for request in requests:
        assert tokens(split[request.request_id]) == tokens(single[request.request_id])
        expected, got = logprob_values(single[request.request_id]), logprob_values(split[request.request_id])
        assert len(got) == len(expected) > 100
        worst = max(abs(a - b) / max(abs(b), 1e-1) for a, b in zip(got, expected))
        assert worst <= 1e-4, worst
