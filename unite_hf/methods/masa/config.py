"""MASA's settings (torch-free: the CLI generates ``unite-hf extract --method masa`` options from them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MethodConfig, corpus_problem, option

DEFAULT_CORPORA: tuple[str, ...] = ("wikitext2", "simplebooks")
"""The default alignment text (a local stand-in for the paper's RedPajama)."""
SELECTION_NAMES = ["auto", "dense", "frequent", "shared"]
"""``"auto"`` and ``unite_hf.methods.masa.UNIT_SELECTIONS``."""
NOT_MASA: dict[str, Any] = {"fisher_labels": "none", "fusion": "", "decomposition": "", "n_iter_max": 0}
"""What a MASA gene's ``gene_config.json`` holds in the fields of UNITE's pipeline, which MASA has no part
of: no Fisher (so no label mode), no fusion of experts, no decomposition (so no HOOI iterations). Genes
saved before held GeneConfig's UNITE defaults there (``empirical``, ``fisher``, ``tucker``, 25): they load,
and ``unite-hf info`` reports them, with these values."""


def _parse_rank(value: str) -> int:
    """MASA's rank is one int ``r`` (the gene matrices are ``r x r``): ``"8,8,8"`` is refused here."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MASA's rank is one int r (the gene matrices are r x r), got {value!r}") from None


@dataclass
class MasaExtractionConfig(MethodConfig):
    """How :func:`~unite_hf.extract_masa_gene` trains MASA gene matrices against a frozen source."""

    method = "masa"

    corpora: Any = option(DEFAULT_CORPORA, nargs="+",
                          help="alignment corpora, mixed in equal shares (in Python also any one calibration input)")
    rank: int = option(64, parse=_parse_rank, metavar="R",
                       help="r, the size of every r x r gene matrix (at most the smallest FFN dimension)")
    selection: str = option("auto", choices=SELECTION_NAMES,
                            help="which FFN weights get gene matrices (auto: dense FFNs, else shared experts, else the "
                                 "most routed experts)")
    num_experts: int = option(1, help="experts per MoE layer for selection frequent")
    spectral_weight: float = option(0.1, help="λ of the log-spectral term; 0 turns it off")
    tokens: int = option(262_144, help="alignment budget in tokens (one optimizer step per batch_size x seq_len)")
    seq_len: int = option(256, help="tokens per alignment sequence")
    batch_size: int = option(8, help="sequences per optimizer step")
    learning_rate: float = option(1e-3, help="Adam learning rate of the alignment, decayed linearly to 0")
    seed: int = option(0, help="seed of the alignment windows and of anything drawn at random")

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"masa config: rank must be a positive int (the gene matrices are r x r), got {self.rank!r}")
        for name in ("tokens", "seq_len", "batch_size", "num_experts"):
            self._check_int(name)
        self._check_int("seed", minimum=0)
        self._check_number("spectral_weight")
        self._check_number("learning_rate", strictly=True)
        self._check_choice("selection", SELECTION_NAMES)
        if self.num_experts != 1 and self.selection in ("dense", "shared"):
            raise ValueError(f"masa config: num_experts applies to selection 'frequent' (or 'auto'), not "
                             f"{self.selection!r}")
        if isinstance(self.corpora, list):
            self.corpora = tuple(self.corpora)
        corpora = self.corpora if isinstance(self.corpora, tuple) else (self.corpora,)
        problem = next((f"#{i} {p}" for i, p in enumerate(map(corpus_problem, corpora)) if p), None)
        if problem:  # a recipe's list of numbers would fail only once the source is loaded
            raise ValueError(f"masa config: corpus {problem}; each corpus is a name, a text file, a Hub dataset id "
                             "or a list of strings")
