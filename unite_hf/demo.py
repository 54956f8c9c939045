"""``unite-hf demo``: the whole extraction on an embedded default, in a minute on a laptop CPU.

The default source is a small random Mixtral built from the config below (no download), calibrated
on WikiText-2 with the GPT-2 tokenizer. A random model carries no knowledge; the demo shows the
pipeline and checks its own numbers (the gene's rebuilt experts against a hand-fused average, and
a save/load round trip).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .calibration import find_local_data_dir

DEMO_SOURCE_CONFIG = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512, tie_word_embeddings=False,
)
DEMO_CALIBRATION = dict(num_sequences=32, seq_len=128, seed=0, batch_size=8)
DEMO_RANK = (4, 48, 32)
LOCAL_TOKENIZER = "tokenizers/gpt2_tokenizer.json"


def _demo_tokenizer(data_dir: Path | None):
    """GPT-2 tokenizer: the local copy if there is one, else the Hub; None if neither is reachable."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if data_dir is not None and (data_dir / LOCAL_TOKENIZER).is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(data_dir / LOCAL_TOKENIZER), eos_token="<|endoftext|>"), "GPT-2 (local)"
    try:
        return AutoTokenizer.from_pretrained("openai-community/gpt2"), "GPT-2 (Hub)"
    except OSError:
        return None, None


def run_demo(out: str | os.PathLike = "runs/demo", data_dir: str | os.PathLike | None = None) -> dict:
    from transformers import MixtralConfig, MixtralForCausalLM

    from .fusion import fuse_block
    from .gene import UniteGene
    from .methods.unite import extract_universal_knowledge
    from .sources import get_source

    started = time.perf_counter()
    if data_dir is not None:
        os.environ["UNITE_HF_DATA_DIR"] = str(data_dir)
    local = find_local_data_dir()
    tokenizer, tokenizer_name = _demo_tokenizer(local)
    if tokenizer is None:
        print("demo: no GPT-2 tokenizer locally or on the Hub; calibrating on RANDOM token ids instead.")
        vocab, calibration = 50257, torch.randint(0, 50257, (DEMO_CALIBRATION["num_sequences"], DEMO_CALIBRATION["seq_len"]),
                                                  generator=torch.Generator().manual_seed(0))
    else:
        vocab, calibration = len(tokenizer), "wikitext2"
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=vocab, **DEMO_SOURCE_CONFIG)).eval()
    print(f"demo: source = random tiny Mixtral ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{DEMO_SOURCE_CONFIG['num_hidden_layers']} layers x {DEMO_SOURCE_CONFIG['num_local_experts']} experts), "
          f"tokenizer = {tokenizer_name or 'none'}")

    gene = extract_universal_knowledge(model, tokenizer, calibration, rank=DEMO_RANK, source_id="demo/tiny-mixtral-random",
                                       **DEMO_CALIBRATION)
    gene_dir = Path(out) / "gene"
    gene.save_pretrained(gene_dir)
    loaded = UniteGene.from_pretrained(gene_dir)

    # independent check: the full-rank reconstruction target is the hand-fused average
    source = get_source(model)
    first = source.blocks[0]
    fisher_row = loaded.importance[0].double()
    hand_fused = sum(w * first.expert(i).up.detach().double() for i, w in enumerate(fisher_row / fisher_row.sum()))
    direct = fuse_block(first, _importance_of(loaded, source), "fisher")["up"][0]
    summary = {
        "gene": str(gene_dir),
        "calibration": loaded.config.calibration,
        "moe_layers": loaded.moe_layers,
        "ranks": loaded.config.ranks,
        "relative_error": {k: round(v, 4) for k, v in loaded.config.relative_error.items()},
        "retained_energy_out": {k: round(v["out"], 4) for k, v in loaded.config.retained_energy.items()},
        "fisher_layer0": [round(float(v), 6) for v in loaded.importance[0]],
        "hand_fused_max_abs_diff": float((direct.double() - hand_fused).abs().max()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print("demo summary:")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return summary


def _importance_of(gene, source):
    from .importance import ExpertImportance

    return ExpertImportance(moe_layers=source.moe_layers, fisher=gene.importance.double(),
                            frequency=gene.frequency.double(), num_sequences=gene.config.num_sequences)
