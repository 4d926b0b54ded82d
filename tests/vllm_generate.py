"""Child process of tests/test_vllm.py and benchmarks: greedy answers of vLLM on the VQA test questions.

    python tests/vllm_generate.py MODEL_DIR N_QUESTIONS

vLLM loads general plugins once per process and the plugin's pipeline comes from the environment
(GRAPHPRUNE_VLLM_PIPELINE), so each configuration runs in a process of its own. Prints one line
`RESULT {json}`: per question the prompt length vLLM scheduled and the generated token ids.
"""
import json
import sys


def serve(model_dir: str, n: int) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams

    from graphprune.tools import vqa
    from graphprune.tools.vqa_model import load_items

    vocab = vqa.Vocab()
    items = load_items(None, n)
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_num_seqs=4, max_model_len=1024,
              limit_mm_per_prompt={"image": 1}, seed=0)
    # the prompt carries one <image> token; vLLM's processor replaces it with the placeholders
    prompts = [{"prompt_token_ids": vocab.prompt_ids(it.question, 1),
                "multi_modal_data": {"image": Image.fromarray(it.image.permute(1, 2, 0).numpy())}} for it in items]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    return {"prompt_len": [len(o.prompt_token_ids) for o in outs],
            "tokens": [list(o.outputs[0].token_ids) for o in outs]}


if __name__ == "__main__":
    print("RESULT " + json.dumps(serve(sys.argv[1], int(sys.argv[2]))), flush=True)
