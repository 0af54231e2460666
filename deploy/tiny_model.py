"""Build a tiny random-weight Llama model that vLLM can serve on CPU, with no download.

Why: no weights can be fetched here, but the gateway, replay and calibration must run against
real vLLM engines. A randomly initialised Llama with a locally trained byte-level BPE tokenizer
exercises the same serving path (tokenisation, paged KV cache, continuous batching, metrics);
only the text it generates is meaningless, which is fine because the replay fixes output lengths
with `ignore_eos` + `max_tokens`.

The build is deterministic (fixed seed, fixed generated corpus) so two builds of the same size
are byte-identical and engines started from them behave the same.

This file imports only the standard library at module level and runs standalone with any python
that has `transformers`, `tokenizers` and `torch` (the vLLM venv has all three):

    .venv-vllm/bin/python deploy/tiny_model.py OUT_DIR --hidden 128 --layers 2
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

# A minimal chat template so /v1/chat/completions works: transformers no longer ships a default.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model; defaults give the fast engine (about 1 MB of bf16 weights)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 2048
    max_position_embeddings: int = 8192
    seed: int = 0
    corpus_lines: int = 4000


def _corpus(spec: TinyModelSpec) -> list[str]:
    """Deterministic SQL-flavoured text to train the tokenizer on."""
    rng = random.Random(spec.seed)
    words = [
        "SELECT", "FROM", "WHERE", "JOIN", "GROUP", "BY", "ORDER", "LIMIT", "COUNT", "AVG",
        "table", "column", "schema", "question", "answer", "database", "value", "name", "id",
        "customer", "order", "account", "balance", "district", "client", "loan", "card",
        "the", "of", "and", "to", "in", "is", "for", "with", "on", "as", "what", "how", "many",
    ]
    lines = []
    for _ in range(spec.corpus_lines):
        n = rng.randint(5, 25)
        parts = [rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 9999)) for _ in range(n)]
        lines.append(" ".join(parts) + rng.choice([";", ".", "?", ""]))
    return lines


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write config, bf16 safetensors weights and a fast tokenizer to `out_dir`; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # direct module imports: the lazy top-level `from transformers import LlamaConfig` fails in the
    # vLLM CPU venv (it probes torchvision, which that venv removes on purpose)
    from transformers.models.llama.configuration_llama import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaForCausalLM
    from transformers.tokenization_utils_fast import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = spec.max_position_embeddings
    fast.save_pretrained(out)

    torch.manual_seed(spec.seed)
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    (out / "agentsched_tiny_model.json").write_text(json.dumps(asdict(spec), indent=1))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    defaults = TinyModelSpec()
    parser.add_argument("--hidden", type=int, default=defaults.hidden_size)
    parser.add_argument("--layers", type=int, default=defaults.num_layers)
    parser.add_argument("--heads", type=int, default=defaults.num_heads)
    parser.add_argument("--kv-heads", type=int, default=defaults.num_kv_heads)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2 x hidden")
    parser.add_argument("--vocab", type=int, default=defaults.vocab_size)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    spec = TinyModelSpec(
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate or 2 * args.hidden,
        vocab_size=args.vocab,
        seed=args.seed,
    )
    print(build_tiny_model(args.out_dir, spec))


if __name__ == "__main__":
    main()
