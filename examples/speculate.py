"""Speculative decoding from Python: the bundled draft (event image) proposes, the bundled target (8 RGB frames)
verifies, and the answer is token-identical to the target's own greedy answer.

    python examples/speculate.py WORLD/my_egpt_dsec_seq_1s [--sample 0]
"""

import argparse

from specalign.data import open_dataset
from specalign.decode.engine import Engine, prompt_embeds
from specalign.decode.sources import VLMDraft
from specalign.decode.speculative import speculative_decode, target_generate
from specalign.models import load_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", help="a split folder, e.g. worlds/demo/my_egpt_dsec_seq_1s")
    p.add_argument("--sample", type=int, default=0)
    p.add_argument("--gamma", type=int, default=4, help="draft tokens per round")
    args = p.parse_args()

    sample = open_dataset(args.dataset)[args.sample]
    question = sample.question
    target = load_model("mini-target")  # Video-LLaVA architecture; a checkpoint folder works the same way
    draft = load_model("mini-draft")  # EventGPT architecture

    # vision encode + splice the visual tokens into each model's own prompt: embeddings [1, T, D]
    t_embeds, _ = prompt_embeds(target, target.collate([target.prepare(sample, question)]))
    d_embeds, _ = prompt_embeds(draft, draft.collate([draft.prepare(sample, question)]))
    t_engine = Engine(target, max_len=t_embeds.shape[1] + 80)  # static KV caches, sized for prompt + answer
    d_engine = Engine(draft, max_len=d_embeds.shape[1] + 80)

    eos = target.eos_token_id
    alone, _ = target_generate(t_engine, t_embeds, 50, eos)  # the target by itself, on the same engine
    tokens, stats = speculative_decode(t_engine, t_embeds, VLMDraft(d_engine, d_embeds), args.gamma, 50, eos)

    print(f"Q: {question}")
    print(f"A: {target.decode(tokens)}")
    print(f"token-identical to the target alone: {'yes' if tokens == alone else 'no'}")
    print(f"alpha {stats.alpha:.3f} (accepted / drafted), tau {stats.tau:.2f} (tokens per target forward)")


if __name__ == "__main__":
    main()
