"""Extract a UNITE gene from any MoE causal LM and look inside it.

    python examples/extract_gene.py --source Qwen/Qwen1.5-MoE-A2.7B --rank 512 --out qwen-moe-gene

Without --source it builds a small random OLMoE from a config, so it runs anywhere in seconds.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

from unite_hf import UniteGene, extract_universal_knowledge


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default=None, help="Hub id or path of a MoE causal LM")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--out", default="runs/example-gene")
    args = parser.parse_args()

    if args.source:
        model = AutoModelForCausalLM.from_pretrained(args.source, dtype=torch.bfloat16)
        tokenizer, calibration = AutoTokenizer.from_pretrained(args.source), "wikitext2"
    else:
        config = OlmoeConfig(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
                             eos_token_id=2, pad_token_id=1)
        model, tokenizer = OlmoeForCausalLM(config).eval(), None
        calibration = torch.randint(0, 1000, (16, 64), generator=torch.Generator().manual_seed(0))

    gene = extract_universal_knowledge(model, tokenizer, calibration, rank=args.rank, num_sequences=64, seq_len=256)
    gene.save_pretrained(args.out)
    gene = UniteGene.from_pretrained(args.out)

    layer = gene.moe_layers[0]
    print(gene)
    print("Fisher importance of layer", layer, gene.importance[0].tolist())
    print("fused up projection of layer", layer, tuple(gene.fused_weight(layer, "up").shape))
    for proj, energy in gene.spectral_energy.items():
        rank = gene.ranks[proj][1]
        print(f"{proj}: rank {rank} keeps {float(energy['out'][rank - 1]):.1%} of the output-mode energy")


if __name__ == "__main__":
    main()
